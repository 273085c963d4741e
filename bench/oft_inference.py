"""OpenVLA-OFT parallel decoding vs autoregressive decoding, same model size, one process.

    python bench/oft_inference.py [--preset=mid] [--batches=1,8] [--chunk=8] [--rounds=10]

Model level (pre-resized uint8 224 px images, a 20-token prompt, random fp32 weights: speed does
not depend on the values): the autoregressive side is `decode.greedy_decode` jitted as Policy does (prefill +
6 cached steps -> 7 tokens = 1 action per row); the OFT side is `parallel_decode.make_parallel_decoder`
with chunk_size K and the L1 head (one forward pass -> K actions per row). Calls alternate AR, OFT in
each round so both see the same machine load; the ratio is the median of per-round actions/s ratios.
Compile time is reported separately. Writes bench/results/oft_inference.json with the top-level field
`oft_speedup_vs_autoregressive` (actions/s ratio at batch 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901, 29871]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()

    import jax
    from inference import random_params  # bench/inference.py (this folder is on sys.path)

    from vla_jax.models.config import get_preset, with_dtypes
    from vla_jax.models.decode import greedy_decode, split_layers
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.models.parallel_decode import make_parallel_decoder

    ar_cfg = with_dtypes(get_preset(args.preset), "float32")
    oft_cfg = dataclasses.replace(ar_cfg, parallel_decoding=True, chunk_size=args.chunk, action_head="l1")
    s = ar_cfg.image_size
    oft_model = OpenVLA(oft_cfg)
    oft_params = random_params(oft_cfg)  # bench/inference.py's: N(0, 0.02), norms 1
    ar_params = split_layers({k: v for k, v in oft_params.items() if k != "action_head"})
    ar_decode = jax.jit(functools.partial(greedy_decode, OpenVLA(ar_cfg), num_tokens=ar_cfg.action_dim))
    oft_decode = make_parallel_decoder(oft_model)

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        rng = np.random.default_rng(b)
        images = rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8)
        prompts = np.array([PROMPT] * b, np.int32)
        lengths = np.full((b,), len(PROMPT), np.int32)
        calls = {"ar": lambda: ar_decode(ar_params, images, prompts, lengths).block_until_ready(),
                 "oft": lambda: oft_decode(oft_params, images, prompts, lengths).block_until_ready()}
        compile_s = {}
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            compile_s[name] = round(time.perf_counter() - t0, 2)
        times = {"ar": [], "oft": []}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        ar_rate = [b / t for t in times["ar"]]  # one action per row
        oft_rate = [b * args.chunk / t for t in times["oft"]]  # K actions per row
        row = {"batch": b,
               "ar_ms_per_call": round(1e3 * statistics.median(times["ar"]), 1),
               "oft_ms_per_call": round(1e3 * statistics.median(times["oft"]), 1),
               "ar_actions_per_s": round(statistics.median(ar_rate), 2),
               "oft_actions_per_s": round(statistics.median(oft_rate), 2),
               "speedup": round(statistics.median([o / a for o, a in zip(oft_rate, ar_rate)]), 2),
               "first_call_s (compile + run)": compile_s}
        rows.append(row)
        print(f"{args.preset} batch {b}: AR {row['ar_actions_per_s']} actions/s ({row['ar_ms_per_call']} ms/call), "
              f"OFT K={args.chunk} L1 {row['oft_actions_per_s']} actions/s ({row['oft_ms_per_call']} ms/call), "
              f"ratio {row['speedup']}x", flush=True)
    result = {"preset": args.preset, "chunk_size": args.chunk, "action_head": "l1", "dtype": "float32",
              "rounds": args.rounds, "rows": rows,
              "oft_speedup_vs_autoregressive": next((r["speedup"] for r in rows if r["batch"] == 1), None),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} {jax.default_backend()}"}
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "oft_inference.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
