"""Generate the Meta-World demo dataset: `python -m vla_jax.sim.make_demo_data --out=DIR [options]`.

Writes an RLDS dataset of successful scripted-expert episodes plus `dataset_config.json` (see
vla_jax/sim/demos.py). Train on it with the training config's data section:
    data.data_dir=DIR  data.mixture=metaworld_demo  data.dataset_configs=DIR/dataset_config.json
Re-running with the same options reuses a complete DIR (a cache); other options need another DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Nothing here imports TensorFlow or MuJoCo at module level: the simulator workers must stay free of
# TensorFlow (see vla_jax/sim/rendering.py), and `--help` stays fast.
from vla_jax.sim.demos import DEMO_TASKS, DemoSpec, generate


def default_out_dir() -> str:
    """$VLA_JAX_CACHE_DIR/demo_data (default ~/.cache/vla_jax/demo_data)."""
    root = os.environ.get("VLA_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vla_jax"))
    return os.path.join(root, "demo_data")


def default_data_dir(spec: DemoSpec) -> str:
    """Where a spec's dataset goes by default: <default_out_dir>/<name>_<image_size>[_<wrist camera>][_proprio]
    (`python -m vla_jax.demo` reads the same folder)."""
    extra = (f"_{spec.wrist_camera}" if spec.wrist_camera else "") + ("_proprio" if spec.proprio else "")
    return os.path.join(default_out_dir(), f"{spec.name}_{spec.image_size}{extra}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m vla_jax.sim.make_demo_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: %s/<name>_<image_size>)" % default_out_dir())
    p.add_argument("--tasks", default=",".join(DEMO_TASKS), help="comma-separated Meta-World tasks")
    p.add_argument("--episodes_per_task", type=int, default=50, help="successful training episodes per task")
    p.add_argument("--val_episodes_per_task", type=int, default=5, help="held-out episodes per task in 'val'")
    p.add_argument("--image_size", type=int, default=128, help="stored image side in pixels")
    p.add_argument("--max_steps", type=int, default=200, help="episode step limit")
    p.add_argument("--name", default="metaworld_demo", help="dataset (builder and registry) name")
    p.add_argument("--wrist_camera", default="", help="second Meta-World camera stored as 'wrist_image' "
                   "(e.g. gripperPOV; default: none)")
    p.add_argument("--proprio", action="store_true", help="store the 4-D proprio state (hand xyz, gripper "
                   "opening) as 'state'")
    p.add_argument("--workers", type=int, default=2, help="simulator worker processes")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = DemoSpec(tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                    episodes_per_task=args.episodes_per_task, val_episodes_per_task=args.val_episodes_per_task,
                    image_size=args.image_size, max_steps=args.max_steps, name=args.name,
                    wrist_camera=args.wrist_camera, proprio=args.proprio)
    out = args.out or default_data_dir(spec)
    summary = generate(out, spec, workers=args.workers, say=lambda m: print(m, flush=True))
    print(json.dumps({k: summary[k] for k in ("data_dir", "mixture", "dataset_configs", "episodes", "seconds")}))
    return summary


if __name__ == "__main__":
    main()
