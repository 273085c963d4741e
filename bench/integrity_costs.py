"""Cost of the integrity checks on a large synthetic dataset / checkpoint-sized folder:

- the dataset-statistics cache key per data file (`normalization.file_fingerprint`: size, mtime and
  SHA-256 of the whole file up to 64 MiB, of 16 sampled 64 KiB blocks beyond), against the old key
  (file sizes only) and a full SHA-256 of every file;
- checkpoint checksums (`checkpoint_integrity.write_checksums` / `verify`: a full SHA-256 pass).

    python bench/integrity_costs.py [--gb=4] [--file_mb=256] [--dir=/tmp]

Writes --gb of random-content files of --file_mb each into a temporary folder under --dir (deleted
afterwards). The page cache holds what was just written, so the timings are warm-cache unless the
folder is larger than free memory; the sampled key reads 1 MiB per file either way. Prints a JSON
summary and writes bench/results/integrity_costs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=4.0)
    p.add_argument("--file_mb", type=int, default=256)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args(argv)

    from vla_jax import checkpoint_integrity as integrity
    from vla_jax.data import normalization

    root = tempfile.mkdtemp(prefix="vla_jax_integrity_bench_", dir=args.dir)
    try:
        n_files = max(1, int(args.gb * 1024 // args.file_mb))
        block = os.urandom(1 << 20)
        files = []
        t = time.perf_counter()
        for i in range(n_files):
            path = os.path.join(root, f"data.tfrecord-{i:05d}-of-{n_files:05d}")
            with open(path, "wb") as f:
                for j in range(args.file_mb):
                    f.write(block[j % 7:] + block[:j % 7])  # distinct 1 MiB blocks
            files.append(path)
        write_s = time.perf_counter() - t
        total = sum(os.path.getsize(f) for f in files)

        _, sizes_s = _timed(lambda: [os.path.getsize(f) for f in files])
        _, sampled_s = _timed(lambda: [normalization.file_fingerprint(f) for f in files])
        _, full_s = _timed(lambda: [integrity.file_digest(f) for f in files])
        _, write_ck_s = _timed(lambda: integrity.write_checksums(root, True))
        reason, verify_s = _timed(lambda: integrity.verify(root))
        assert reason is None, reason
        result = {
            "files": n_files, "bytes": total, "write_s": round(write_s, 2),
            "old_key_sizes_only_s": round(sizes_s, 4),
            "new_key_sampled_s": round(sampled_s, 4),
            "full_sha256_s": round(full_s, 2), "full_sha256_GBps": round(total / full_s / 1e9, 2),
            "checkpoint_write_checksums_s": round(write_ck_s, 2), "checkpoint_verify_s": round(verify_s, 2),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))
    out = REPO / "bench" / "results" / "integrity_costs.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
