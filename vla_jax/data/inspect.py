"""Dataset validator: look at a registered dataset the way the pipeline will see it.

    python -m vla_jax.data.inspect --data_dir=D --dataset=NAME --out=DIR [--split=all]

Prints episode and frame counts, a sample of instructions, the action statistics table and
warnings (NaN/inf actions, constant dimensions, empty instructions, missing keys); writes
`DIR/{NAME}_frames.png` (a grid of standardized frames, each with its instruction and action) and
`DIR/{NAME}_report.json`. Exit status 1 when the dataset cannot be read or lacks a needed key.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import textwrap
from typing import List, Optional

import numpy as np


def _grid(frames: List[dict], out_path: str, cell: int = 160, cols: int = 4) -> None:
    """frames: {'image': uint8 [H, W, 3], 'caption': str}. Writes a PNG grid with captions."""
    from PIL import Image, ImageDraw

    text_h = 84
    rows = max(1, (len(frames) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, f in enumerate(frames):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        img = Image.fromarray(f["image"]).resize((cell, cell), Image.NEAREST)  # show pixels as they are
        sheet.paste(img, (x, y))
        lines = textwrap.wrap(f["caption"], width=cell // 6)[:7]
        draw.multiline_text((x + 2, y + cell + 2), "\n".join(lines), fill="black", spacing=1)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    sheet.save(out_path)


def _name_corrupt_files(ds, cfg, dataset: str, split: str):
    """Iterates `ds` as numpy; a read failure becomes the ValueError training raises, naming the
    damaged TFRecord file(s) (vla_jax.data.rlds.corrupt_data_error)."""
    import tensorflow as tf

    from vla_jax.data import pipeline, rlds

    try:
        yield from ds.as_numpy_iterator()
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        src = next(s for s in pipeline._open_sources(cfg) if s.cfg.name == dataset)
        raise rlds.corrupt_data_error(src.builder, split, e) from None


def inspect_dataset(data_dir: str, dataset: str, out: str, split: str = "all", num_frames: int = 16,
                    max_episodes: Optional[int] = None, dataset_configs: Optional[str] = None,
                    stats_cache_dir: Optional[str] = None) -> dict:
    """Runs every check and returns the report (also printed and written under `out`)."""
    import tensorflow as tf

    from vla_jax.data import normalization, pipeline, transforms

    cfg = pipeline.DataConfig(data_dir=data_dir, mixture=dataset, dataset_configs=dataset_configs,
                              stats_cache_dir=stats_cache_dir)
    warnings_: List[str] = []
    ds = pipeline.standardized_trajectories(cfg, dataset=dataset, split=split)
    if max_episodes:
        ds = ds.take(max_episodes)
    trajectories = _name_corrupt_files(ds, cfg, dataset, split)
    n_ep = n_frames = n_nonfinite = n_empty = n_unlabeled = n_empty_frames = 0
    instructions = collections.Counter()
    episode_lengths = []
    samples = []
    first_actions = []
    for ep_i, traj in enumerate(trajectories):
        n_ep += 1
        a, instr = traj["action"], traj["language_instruction"]
        t = a.shape[0]
        n_frames += t
        episode_lengths.append(t)
        if t == 0:
            n_empty += 1
            continue
        if not np.isfinite(a).all():
            n_nonfinite += 1
        blank = np.array([len(s) == 0 for s in instr])
        n_empty_frames += int(blank.sum())
        if blank.all():
            n_unlabeled += 1
        instructions.update(s.decode("utf-8", "replace") for s in set(instr.tolist()))
        first_actions.append(a)
        if len(samples) < num_frames:
            for step in sorted({0, t // 2})[: num_frames - len(samples)]:
                samples.append((ep_i, step, traj["image"][step], instr[step].decode("utf-8", "replace"), a[step]))
    if n_ep == 0:
        raise ValueError(f"dataset {dataset!r} split {split!r} has no episodes under {data_dir}")

    # Statistics over all splits, as training uses them (cached).
    stats = pipeline.dataset_statistics(cfg)
    entry = stats[dataset]
    act = entry["action"]
    dims = len(act["mean"])
    constant = [d for d in range(dims) if act["min"][d] == act["max"][d]]

    if n_nonfinite:
        warnings_.append(f"{n_nonfinite} episodes have NaN/inf actions (the pipeline drops them)")
    if n_empty:
        warnings_.append(f"{n_empty} episodes have no steps after standardization (dropped)")
    if n_unlabeled:
        warnings_.append(f"{n_unlabeled} episodes have no instruction at any step (skipped in training)")
    if n_empty_frames:
        warnings_.append(f"{n_empty_frames} frames have an empty instruction")
    if constant:
        warnings_.append(f"action dims {constant} are constant (min == max): normalized to 0 in training")
    if act["mask"][-1] and dims == 7:
        warnings_.append("the gripper dim is normalized (mask True): OpenVLA leaves it raw")
    if first_actions:
        g = np.concatenate(first_actions)[:, -1]
        g = g[np.isfinite(g)]
        if g.size and not np.all(np.isin(g, [0.0, 1.0])):
            warnings_.append(f"gripper values outside {{0, 1}} (range {g.min():.3g}..{g.max():.3g}); "
                             "OpenVLA expects an absolute gripper, 1 = open")

    frames = []
    for ep_i, step, enc, text, a in samples:
        img = np.asarray(transforms.resize_image(tf.io.decode_image(enc, channels=3, expand_animations=False), 160))
        frames.append({"image": img, "caption": f"ep {ep_i} t {step}: {text or '<EMPTY>'} | "
                       f"a=[{', '.join(f'{v:.3g}' for v in a)}]"})
    os.makedirs(out, exist_ok=True)
    png = os.path.join(out, f"{dataset}_frames.png")
    _grid(frames, png)

    report = {
        "dataset": dataset, "data_dir": data_dir, "split": split, "episodes": n_ep, "frames": n_frames,
        "episode_length": {"min": int(min(episode_lengths)), "max": int(max(episode_lengths)),
                           "mean": float(np.mean(episode_lengths))},
        "distinct_instructions": len(instructions), "instruction_sample": instructions.most_common(10),
        "statistics": normalization.export_entry(entry), "warnings": warnings_, "frames_png": png,
    }
    with open(os.path.join(out, f"{dataset}_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    _print(report)
    return report


def _print(r: dict) -> None:
    print(f"dataset {r['dataset']} ({r['data_dir']}, split {r['split']})")
    el = r["episode_length"]
    print(f"  episodes {r['episodes']}, frames {r['frames']} (after standardization; length "
          f"{el['min']}..{el['max']}, mean {el['mean']:.1f})")
    print(f"  {r['distinct_instructions']} distinct instructions; most common:")
    for text, n in r["instruction_sample"]:
        print(f"    {n:6d}  {text!r}")
    a = r["statistics"]["action"]
    print(f"  action statistics over all splits ({r['statistics']['num_trajectories']} trajectories, "
          f"{r['statistics']['num_transitions']} transitions):")
    print("    dim  " + "".join(f"{k:>11s}" for k in ("mean", "std", "min", "max", "q01", "q99")) + "  normalized")
    for d in range(len(a["mean"])):
        row = "".join(f"{a[k][d]:11.4g}" for k in ("mean", "std", "min", "max", "q01", "q99"))
        print(f"    {d:3d}  {row}  {a['mask'][d]}")
    for w in r["warnings"]:
        print(f"  WARNING: {w}")
    print(f"  frames: {r['frames_png']}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla_jax.data.inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="folder holding the TFDS builder folders")
    p.add_argument("--dataset", required=True, help="registered dataset name (e.g. bridge_orig)")
    p.add_argument("--out", required=True, help="folder for the PNG grid and the JSON report")
    p.add_argument("--split", default="all", help="train / val / all (default)")
    p.add_argument("--num_frames", type=int, default=16)
    p.add_argument("--max_episodes", type=int, default=None, help="count only the first N episodes")
    p.add_argument("--dataset_configs", default=None, help=".json/.py file registering extra datasets")
    p.add_argument("--stats_cache_dir", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        inspect_dataset(args.data_dir, args.dataset, args.out, args.split, args.num_frames, args.max_episodes,
                        args.dataset_configs, args.stats_cache_dir)
    except ValueError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
