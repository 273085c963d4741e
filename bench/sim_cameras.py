"""Render cost and look of Meta-World cameras at the demo's image size.

`python bench/sim_cameras.py [--size=64] [--frames=30] [--sheet=PATH.png]`

For each of the demo's six tasks: one environment, the scripted expert stepped 30 steps (so the
gripper is near the object), then every camera rendered `--frames` times with the project's fast
settings (vla_jax.sim.rendering.SceneRenderer). Prints ms per frame per camera and task (median over
frames), writes bench/results/sim_cameras.json, and with --sheet a PNG with one row per task and one
column per camera (what the choice of the second camera was made from). Runs in this process:
do not import TensorFlow here (see vla_jax/sim/rendering.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("LP_NUM_THREADS", "1")  # as the simulator workers run

from vla_jax.sim.demos import DEMO_TASKS  # noqa: E402
from vla_jax.sim.metaworld_env import MetaWorldEnv  # noqa: E402
from vla_jax.sim.rendering import SceneRenderer, import_mujoco  # noqa: E402

CAMERAS = ("corner", "gripperPOV", "behindGripper", "corner2", "corner3", "topview")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--sheet", default="")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sim_cameras.json"))
    args = p.parse_args()
    mujoco = import_mujoco()
    ms = {cam: {} for cam in CAMERAS}
    rows = []
    for task in DEMO_TASKS:
        env = MetaWorldEnv(task, render=False)
        env.reset("heldout", 0, render=False)
        for _ in range(30):
            env.step(env.expert_action(), render=False)
        model = env.unwrapped.model
        names = {mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)}
        row = []
        for cam in CAMERAS:
            if cam not in names:
                raise ValueError(f"camera {cam!r} is not in {task}'s model; its cameras are {sorted(names)}")
            r = SceneRenderer(model, args.size, cam, site_scale={"goal": 2.5})
            img = r.render(env.unwrapped.data)  # first frame: GL warm-up, not timed
            times = []
            for _ in range(args.frames):
                t0 = time.perf_counter()
                r.render(env.unwrapped.data)
                times.append(time.perf_counter() - t0)
            r.close()
            ms[cam][task] = round(1e3 * float(np.median(times)), 2)
            row.append(np.pad(img, ((1, 1), (1, 1), (0, 0))))
        rows.append(np.concatenate(row, 1))
        env.close()
        print(task, {cam: ms[cam][task] for cam in CAMERAS}, flush=True)
    summary = {cam: round(float(np.mean(list(v.values()))), 2) for cam, v in ms.items()}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ""
    result = {"size": args.size, "frames": args.frames, "ms_per_frame_by_task": ms,
              "ms_per_frame_mean": summary, "lp_num_threads": os.environ["LP_NUM_THREADS"],
              "mujoco_gl": os.environ["MUJOCO_GL"], "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "commit": commit}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("mean ms per frame:", summary)
    if args.sheet:
        from PIL import Image

        Image.fromarray(np.concatenate(rows, 0)).save(args.sheet)
        print("wrote", args.sheet)


if __name__ == "__main__":
    main()
