"""Checks a policy trained by the debug config (too slow for the unit tests: ~1500 steps are needed
before the tiny from-scratch model fits the Bridge debug frames).

    python bench/trained_debug_policy.py [--workdir=/tmp/vla_debug_trained] [--steps=1500]

Trains `python train.py --config=configs/debug.py --workdir=W --config.num_steps=STEPS` unless W
already holds that step (a shorter run resumes), then:
1. black, white and noise images must give pairwise different actions;
2. offline evaluation (eval.py's code) on the training frames: the L1 error must be well under the
   mean-action baseline and the gripper must be right on most frames.
Prints a JSON summary, writes bench/results/trained_debug_policy.json and W/eval_<split>/report.md;
exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DATA_DIR = os.path.join(REPO, "tests", "fixtures", "data", "bridge_debug")
INSTRUCTION = "put carrot on plate"


def latest_step(workdir: str) -> int:
    root = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    return max(steps, default=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/vla_debug_trained")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--data_dir", default=DATA_DIR)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "trained_debug_policy.json"))
    args = p.parse_args(argv)
    if latest_step(args.workdir) < args.steps:
        subprocess.run([sys.executable, os.path.join(REPO, "train.py"), "--config=configs/debug.py",
                        f"--workdir={args.workdir}", f"--config.num_steps={args.steps}", "--config.log.progress=False"],
                       cwd=REPO, check=True)
    from vla_jax.evaluation import run_offline
    from vla_jax.policy import Policy

    policy = Policy.load(args.workdir)
    s = 64
    images = {"black": np.zeros((s, s, 3), np.uint8), "white": np.full((s, s, 3), 255, np.uint8),
              "noise": np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)}
    actions = dict(zip(images, policy.predict_actions(list(images.values()), INSTRUCTION)))
    diffs = {f"{a}-{b}": float(np.abs(actions[a] - actions[b]).max())
             for a, b in [("black", "white"), ("black", "noise"), ("white", "noise")]}
    summary = {"checkpoint": args.workdir, "step": latest_step(args.workdir),
               "actions": {k: v.tolist() for k, v in actions.items()}, "max_abs_diff": diffs}
    for split in ("train", "val"):
        rep = run_offline(policy, checkpoint=args.workdir, data_dir=args.data_dir, dataset="bridge_dataset",
                          out_dir=os.path.join(args.workdir, f"eval_{split}"), split=split, progress=False)
        m = rep["overall"]
        summary[split] = {k: m[k] for k in ("frames", "action_token_accuracy", "l1_normalized", "gripper_accuracy")}
        summary[split]["baseline_l1_normalized"] = m["baseline_mean_action"]["l1_normalized"]
        summary[split]["report"] = os.path.join(args.workdir, f"eval_{split}", "report.md")
    t = summary["train"]
    checks = {"images_give_different_actions": min(diffs.values()) > 0,
              "l1_under_half_the_baseline": t["l1_normalized"] < 0.5 * t["baseline_l1_normalized"],
              "gripper_accuracy_over_0.9": t["gripper_accuracy"] > 0.9}
    summary["checks"] = checks
    print(json.dumps(summary, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
