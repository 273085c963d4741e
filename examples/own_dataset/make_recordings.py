"""Fake but plausible robot recordings, as a team's logger might leave them: one .npz per episode.

    python examples/own_dataset/make_recordings.py --out=RAW [--train=12 --val=4 --steps=20 --seed=0]

Each episode: a 64x64 top-down camera over a grey table with one coloured block (red, green or
blue) and the gripper (a dark square, smaller once closed); the gripper moves to the block, closes
and lifts. Per step t:
  image  uint8 [64, 64, 3]
  state  float32 [7]  end-effector x, y, z, roll, pitch, yaw (metres, radians) and the gripper opening
  action float32 [7]  end-effector deltas dx, dy, dz, droll, dpitch, dyaw, then the gripper command
                      in this robot's own convention: 1 = close, 0 = open ('absolute_inverted')
  instruction         "pick up the red block", ...
Replace this file with your own logs; the builder (my_robot_dataset/) only needs the keys above.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

COLORS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200)}
SIZE = 64
WORKSPACE = 0.3  # metres covered by the image side


def _pixel(xy: np.ndarray) -> np.ndarray:
    return np.clip(((xy / WORKSPACE) + 0.5) * SIZE, 4, SIZE - 5).astype(int)


def _render(block_xy, color, grip_xy, z, closed) -> np.ndarray:
    img = np.full((SIZE, SIZE, 3), 150, np.uint8)
    bx, by = _pixel(block_xy)
    img[by - 4:by + 4, bx - 4:bx + 4] = COLORS[color]
    gx, gy = _pixel(grip_xy)
    half = 2 if closed else 4 + int(10 * z)  # higher = larger in a top-down view
    img[max(gy - half, 0):gy + half, max(gx - half, 0):gx + half] = (30, 30, 30)
    return img


def episode(rng: np.random.Generator, steps: int) -> dict:
    """One pick-up episode: reach (first half), close, lift."""
    color = str(rng.choice(sorted(COLORS)))
    block = rng.uniform(-0.1, 0.1, 2)
    pose = np.concatenate([rng.uniform(-0.1, 0.1, 2), [0.2], np.zeros(3)])  # x, y, z, roll, pitch, yaw
    reach, close_at = steps // 2, steps // 2 + 2
    images, states, actions = [], [], []
    closed = False
    for t in range(steps):
        if t < reach:  # move above the block and down
            target = np.array([block[0], block[1], 0.05])
            delta = (target - pose[:3]) / (reach - t)
        elif t < close_at:
            delta = np.zeros(3)
        else:  # lift
            delta = np.array([0.0, 0.0, 0.02])
        delta = delta + rng.normal(0, 0.002, 3)
        rot = rng.normal(0, 0.01, 3)
        close_cmd = 1.0 if t >= reach else 0.0  # this robot: 1 = close, 0 = open
        images.append(_render(block, color, pose[:2], pose[2], closed))
        states.append(np.concatenate([pose, [0.0 if closed else 0.08]]).astype(np.float32))
        actions.append(np.concatenate([delta, rot, [close_cmd]]).astype(np.float32))
        pose = pose + np.concatenate([delta, rot])
        closed = close_cmd == 1.0
    return {"image": np.stack(images), "state": np.stack(states), "action": np.stack(actions),
            "instruction": f"pick up the {color} block"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for train/*.npz and val/*.npz")
    p.add_argument("--train", type=int, default=12)
    p.add_argument("--val", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    for split, n in (("train", args.train), ("val", args.val)):
        os.makedirs(os.path.join(args.out, split), exist_ok=True)
        for i in range(n):
            np.savez_compressed(os.path.join(args.out, split, f"episode_{i:04d}.npz"), **episode(rng, args.steps))
    print(f"wrote {args.train} train and {args.val} val episodes of {args.steps} steps to {args.out}")


if __name__ == "__main__":
    main()
