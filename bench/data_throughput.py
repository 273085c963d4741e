"""Input-pipeline benchmark: frames/s and peak RSS of the full pipeline (read, standardize,
normalize, shuffle, decode, lanczos3 resize to 224, optional augmentation, batch, tokenize) on the
Bridge debug episodes shipped in tests/fixtures/data, plus the cost of the two resume methods.

    python bench/data_throughput.py [--data_dir=tests/fixtures/data/bridge_debug] [--batches=60]

Each configuration runs in a fresh process (so its peak RSS is its own). Prints one summary line
and writes bench/results/data_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO / "tests" / "fixtures" / "data"  # the real data shipped with the repository


def _cfg(args, **kw):
    from vla_jax.data.pipeline import DataConfig

    base = dict(data_dir=args.data_dir, mixture="bridge_dataset", batch_size=args.batch_size, resize_size=224,
                shuffle_buffer=args.shuffle_buffer, seed=0, max_seq_len=64, stats_cache_dir=args.cache_dir)
    base.update(kw)
    return DataConfig(**base)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_throughput(args, image_aug: bool) -> dict:
    from vla_jax.data.pipeline import make_train_iterator

    t0 = time.perf_counter()
    it = make_train_iterator(_cfg(args, image_aug=image_aug), args.tokenizer, 0, 1)
    next(it)  # fills the shuffle buffer, warms autotune
    first = time.perf_counter() - t0
    for _ in range(5):
        next(it)
    windows, window = [], 10  # frames/s per window of 10 batches; the median resists load spikes
    t_all = time.perf_counter()
    for _ in range(max(1, args.batches // window)):
        t1 = time.perf_counter()
        for _ in range(window):
            b = next(it)
        windows.append(window * args.batch_size / (time.perf_counter() - t1))
    overall = len(windows) * window * args.batch_size / (time.perf_counter() - t_all)
    assert b["pixel_values"].shape == (args.batch_size, 224, 224, 3)
    return {"image_aug": image_aug, "frames_per_s": sorted(windows)[len(windows) // 2], "frames_per_s_overall": overall,
            "first_batch_s": first, "peak_rss_mb": _peak_rss_mb()}


def run_resume(args) -> dict:
    """Cost of the two resume methods: replaying the encoded stream (skip) and tf.data checkpoints."""
    import numpy as np

    from vla_jax.data import pipeline

    cfg = _cfg(args, resize_size=224)
    sources = pipeline._open_sources(cfg)
    stats = pipeline.dataset_statistics(cfg)

    def first_batch_s(skip: int) -> float:
        t = time.perf_counter()
        ds, _ = pipeline.make_dataset(cfg, skip_frames=skip)
        next(iter(ds))
        return time.perf_counter() - t

    first_batch_s(0)  # warm caches
    base = min(first_batch_s(0) for _ in range(2))
    skip_s = first_batch_s(args.skip_frames) - base
    skip_fps = args.skip_frames / max(skip_s, 1e-9)
    # Mean encoded image bytes per frame of this dataset.
    enc = pipeline._encoded_frames(cfg, sources, {k: v for k, v in stats.items()}, 0, 1)
    img_bytes = float(np.mean([len(f["image"]) for f in enc.take(500).as_numpy_iterator()]))
    # tf.data checkpoint size as a function of the shuffle buffer.
    sizes = {}
    for buf in (1000, 4000):
        itr = pipeline.make_train_iterator(_cfg(args, shuffle_buffer=buf, resize_size=32), args.tokenizer, 0, 1)
        next(itr)
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            itr.save(d)
            save_s = time.perf_counter() - t
            size = sum(p.stat().st_size for p in pathlib.Path(d).rglob("*") if p.is_file())
        sizes[buf] = {"bytes": size, "save_s": save_s}
    per_frame = (sizes[4000]["bytes"] - sizes[1000]["bytes"]) / 3000.0
    return {"skip_frames_per_s": skip_fps, "encoded_image_bytes_per_frame": img_bytes,
            "ckpt": {str(k): v for k, v in sizes.items()}, "ckpt_bytes_per_buffered_frame": per_frame,
            "ckpt_256k_buffer_gb_this_data": per_frame * 256_000 / 1e9,
            "peak_rss_mb": _peak_rss_mb()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data_dir", default=str(SHARED / "bridge_debug"))
    p.add_argument("--tokenizer", default=str(SHARED / "llama2_tokenizer" / "tokenizer.model"))
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--shuffle_buffer", type=int, default=2000)
    p.add_argument("--skip_frames", type=int, default=20000)
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.cache_dir is None:
        args.cache_dir = tempfile.mkdtemp(prefix="vla_jax_bench_stats_")
    if args.child:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
        out = {"plain": lambda: run_throughput(args, False), "aug": lambda: run_throughput(args, True),
               "resume": lambda: run_resume(args)}[args.child]()
        print("RESULT " + json.dumps(out))
        return
    results = {}
    for child in ("plain", "aug", "resume"):
        cmd = [sys.executable, __file__, f"--child={child}"] + [a for a in sys.argv[1:] if not a.startswith("--child")]
        cmd += [f"--cache_dir={args.cache_dir}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"benchmark child {child} failed (rc {proc.returncode})")
        results[child] = json.loads(line[0][len("RESULT "):])
    results["machine"] = {"cpus": os.cpu_count(), "batch_size": args.batch_size, "batches": args.batches,
                          "shuffle_buffer": args.shuffle_buffer, "resize": 224,
                          "data": "bridge_debug (64x64 JPEG, 25 episodes x 10 steps per split)"}
    out = REPO / "bench" / "results" / "data_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    r = results
    print(f"data_throughput: 224px {r['plain']['frames_per_s']:.0f} frames/s (peak RSS {r['plain']['peak_rss_mb']:.0f} MB), "
          f"with aug {r['aug']['frames_per_s']:.0f} frames/s (peak RSS {r['aug']['peak_rss_mb']:.0f} MB); "
          f"skip-resume {r['resume']['skip_frames_per_s']:.0f} frames/s; tf.data ckpt "
          f"{r['resume']['ckpt_bytes_per_buffered_frame']:.0f} B/buffered frame; {os.cpu_count()} CPUs -> {out}")


if __name__ == "__main__":
    main()
