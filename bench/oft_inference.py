"""OpenVLA-OFT parallel decoding vs autoregressive decoding vs the PyTorch OFT wiring, one process.

    python bench/oft_inference.py [--preset=mid] [--batches=1,8] [--chunk=8] [--rounds=10]

Model level, fp32, the same random weights on every side (pre-resized uint8 224 px images, a
20-token prompt; speed does not depend on the values):
  * ar:        `decode.greedy_decode` jitted as Policy does (prefill + 6 cached steps -> 7 tokens =
               1 action per row);
  * oft:       `parallel_decode.parallel_decode` jitted, chunk K, the L1 head (one forward -> K
               actions per row);
  * torch_oft: the PyTorch OFT wiring of the parity tests (`tests/oft_torch_reference.py`: timm
               towers, transformers' Llama through SDPA with the OFT fork's bidirectional mask, the
               MLPResNet head), torch threads = the cores this process may use (XLA:CPU's pool size).
The calls alternate within each round, so every side sees the same machine load; a ratio is the
median of the per-round ratios. Before timing, the JAX and torch chunks are compared (same weights).

At batch 1 the round also times the pieces, for where the time goes: the towers + projector alone,
the autoregressive prefill alone (greedy_decode with 1 token), the OFT pass without its L1 head.
Derived: one cached decode step = (ar - prefill) / 6, the head = oft - (oft without head). With the
FLOPs of each pass from the geometry (`oft_limits`) this gives the ratio the arithmetic allows.

Writes bench/results/oft_inference.json with the top-level `oft_speedup_vs_autoregressive`
(actions/s ratio at batch 1) and `oft_speedup_vs_torch_oft` (the same against the PyTorch wiring).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for _p in (REPO, BENCH):
    if _p not in sys.path:
        sys.path.insert(0, _p)
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901, 29871]
AR_STEPS = 6  # cached steps after the prefill: 7 tokens = one 7-D action


def median(xs):
    return statistics.median(xs)


def build(preset: str, chunk: int):
    """-> (ar_cfg, oft_cfg, torch OFT wiring, JAX params with the L1 head) from one set of torch weights."""
    import jax
    import torch

    from tests.oft_torch_reference import TorchMLPResNet, TorchOFT, head_params
    from tests.torch_reference import TorchOpenVLA
    from vla_jax.hf import keys_openvla as hf_keys
    from vla_jax.models.config import get_preset, with_dtypes

    ar_cfg = with_dtypes(get_preset(preset), "float32")
    oft_cfg = dataclasses.replace(ar_cfg, parallel_decoding=True, chunk_size=chunk, action_head="l1")
    torch.manual_seed(0)
    base = TorchOpenVLA(ar_cfg).randomize(seed=0)
    h, d = ar_cfg.llama.hidden_size, ar_cfg.action_dim
    head = TorchMLPResNet(2, d * h, h, d).randomize(seed=1)
    params = dict(hf_keys.hf_to_params(base.hf_state_dict(), ar_cfg), action_head=head_params(head))
    return ar_cfg, oft_cfg, TorchOFT(base, chunk, d, head), jax.device_put(params)


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "oft_inference.json"))
    args = ap.parse_args(argv)

    import jax
    import torch

    from tests.oft_torch_reference import oft_rows
    from vla_jax.models.decode import greedy_decode, split_layers
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.models.parallel_decode import build_inputs, parallel_decode

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    load_start = load_average()
    ar_cfg, oft_cfg, torch_oft, oft_params = build(args.preset, args.chunk)
    k, a, s = args.chunk, oft_cfg.num_action_slots, ar_cfg.image_size
    ar_model, oft_model = OpenVLA(ar_cfg), OpenVLA(oft_cfg)
    ar_params = split_layers({n: v for n, v in oft_params.items() if n != "action_head"})
    ar_decode = jax.jit(functools.partial(greedy_decode, ar_model, num_tokens=ar_cfg.action_dim))
    prefill = jax.jit(functools.partial(greedy_decode, ar_model, num_tokens=1))
    oft_decode = jax.jit(functools.partial(parallel_decode, oft_model))
    towers = jax.jit(lambda p, x: oft_model.apply({"params": p}, x, method=OpenVLA.encode_image))

    @jax.jit
    def oft_no_head(p, x, prompts, lengths):
        ids, attn, slots = build_inputs(prompts, lengths, a, oft_cfg.eos_token_id, oft_cfg.pad_token_id)
        return oft_model.apply({"params": p}, x, ids, attn, slots, method=OpenVLA.parallel_hidden)

    rows, pieces = [], None
    for b in [int(x) for x in args.batches.split(",")]:
        images = np.random.default_rng(b).integers(0, 256, (b, s, s, 3), dtype=np.uint8)
        prompts = np.array([PROMPT] * b, np.int32)
        lengths = np.full((b,), len(PROMPT), np.int32)
        t_ids, t_mask, t_lens = oft_rows([PROMPT] * b, a, oft_cfg.eos_token_id, oft_cfg.pad_token_id)
        calls = {"ar": lambda: ar_decode(ar_params, images, prompts, lengths).block_until_ready(),
                 "oft": lambda: oft_decode(oft_params, images, prompts, lengths).block_until_ready(),
                 "torch_oft": lambda: torch_oft.l1_actions(images, t_ids, t_mask, t_lens)}
        if b == 1:
            calls.update({
                "ar_prefill": lambda: prefill(ar_params, images, prompts, lengths).block_until_ready(),
                "towers": lambda: towers(oft_params, images).block_until_ready(),
                "oft_no_head": lambda: oft_no_head(oft_params, images, prompts, lengths).block_until_ready()})
        first_s = {}
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            first_s[name] = round(time.perf_counter() - t0, 2)
        chunk_diff = float(np.abs(np.asarray(calls["oft"]()) - calls["torch_oft"]()).max())
        if not chunk_diff < 1e-3:
            raise RuntimeError(f"batch {b}: the JAX and PyTorch OFT chunks differ by {chunk_diff} (same weights "
                               f"expected to agree to fp32 rounding): the comparison would not be like for like")
        times = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        rate = {"ar": [b / t for t in times["ar"]],
                "oft": [b * k / t for t in times["oft"]], "torch_oft": [b * k / t for t in times["torch_oft"]]}
        row = {"batch": b, **{f"{n}_ms_per_call": round(1e3 * median(t), 1) for n, t in times.items()},
               **{f"{n}_actions_per_s": round(median(r), 2) for n, r in rate.items()},
               "oft_vs_ar": round(median([o / r for o, r in zip(rate["oft"], rate["ar"])]), 2),
               "oft_vs_torch_oft": round(median([o / r for o, r in zip(rate["oft"], rate["torch_oft"])]), 2),
               "torch_oft_vs_ar": round(median([o / r for o, r in zip(rate["torch_oft"], rate["ar"])]), 2),
               "max_abs_chunk_diff_vs_torch": chunk_diff, "first_call_s (compile + run)": first_s,
               "jax_compiles": {"ar": ar_decode._cache_size(), "oft": oft_decode._cache_size()}}
        if b == 1:
            pieces = breakdown(times, ar_cfg, oft_cfg, ar_params, len(PROMPT))
        rows.append(row)
        print(f"{args.preset} batch {b}: AR {row['ar_actions_per_s']} actions/s ({row['ar_ms_per_call']} ms/call), "
              f"OFT K={k} L1 {row['oft_actions_per_s']} actions/s ({row['oft_ms_per_call']} ms/call), "
              f"PyTorch OFT {row['torch_oft_actions_per_s']} actions/s ({row['torch_oft_ms_per_call']} ms/call); "
              f"OFT/AR {row['oft_vs_ar']}x, OFT/PyTorch OFT {row['oft_vs_torch_oft']}x", flush=True)
    one = next((r for r in rows if r["batch"] == 1), None)
    result = {"preset": args.preset, "chunk_size": k, "action_head": "l1", "dtype": "float32",
              "prompt_tokens": len(PROMPT), "rounds": args.rounds, "rows": rows, "batch1_breakdown": pieces,
              "oft_speedup_vs_autoregressive": one and one["oft_vs_ar"],
              "oft_speedup_vs_torch_oft": one and one["oft_vs_torch_oft"],
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": threads,
                          "torch_threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
                          "backend": jax.default_backend(), "load_average_start": load_start,
                          "load_average_end": load_average()},
              "commit": commit()}
    if pieces:
        print(json.dumps(pieces, indent=1), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def breakdown(times, ar_cfg, oft_cfg, ar_params, prompt_len: int) -> dict:
    """Batch-1 pieces (medians of per-round values, ms) and the ratio the arithmetic allows.

    With P the prefill, s one cached step and O the OFT pass: OFT/AR actions/s = K (P + 6 s) / O.
    The OFT pass does everything the prefill does (same towers, the same prompt rows, and more rows),
    so O >= P and the ratio is at most K (1 + 6 s / P); if both passes run at the same FLOP rate,
    O = P f with f = OFT FLOPs / prefill FLOPs, and the ratio is K (P + 6 s) / (P f)."""
    import jax
    from oft_limits import oft_pass_flops, prefill_flops

    med = lambda xs: 1e3 * median(xs)  # noqa: E731
    diff = lambda x, y: 1e3 * median([u - v for u, v in zip(times[x], times[y])])  # noqa: E731
    p, o = med(times["ar_prefill"]), med(times["oft"])
    step = diff("ar", "ar_prefill") / AR_STEPS
    k = oft_cfg.chunk_size
    f_oft, f_pre = oft_pass_flops(oft_cfg, prompt_len), prefill_flops(ar_cfg, prompt_len)
    f = sum(f_oft.values()) / sum(f_pre.values())
    shared = ar_params["shared"]["llm"]
    step_bytes = sum(x.nbytes for x in jax.tree.leaves(ar_params["layers"])) + sum(
        x.nbytes for n, x in jax.tree_util.tree_flatten_with_path(shared)[0] if "embed_tokens" not in str(n))
    return {"ar_ms": round(med(times["ar"]), 1), "ar_prefill_ms": round(p, 1), "decode_step_ms": round(step, 2),
            "towers_projector_ms": round(med(times["towers"]), 1),
            "llama_prefill_ms": round(diff("ar_prefill", "towers"), 1),
            "oft_ms": round(o, 1), "oft_no_head_ms": round(med(times["oft_no_head"]), 1),
            "llama_oft_ms": round(diff("oft_no_head", "towers"), 1), "l1_head_ms": round(diff("oft", "oft_no_head"), 2),
            "oft_over_prefill_time": round(o / p, 3),
            "prefill_gflop": round(sum(f_pre.values()) / 1e9, 3), "oft_gflop": round(sum(f_oft.values()) / 1e9, 3),
            "prefill_gflop_by_part": {n: round(v / 1e9, 3) for n, v in f_pre.items()},
            "oft_gflop_by_part": {n: round(v / 1e9, 3) for n, v in f_oft.items()},
            "oft_over_prefill_flops": round(f, 3), "decode_step_weight_mb": round(step_bytes / 1e6, 1),
            "decode_steps_over_prefill": round(AR_STEPS * step / p, 3),
            "ratio_if_oft_costs_prefill_flops_ratio": round(k * (p + AR_STEPS * step) / (p * f), 2),
            "ratio_upper_bound_oft_as_cheap_as_prefill": round(k * (1 + AR_STEPS * step / p), 2),
            "decode_step_over_prefill_needed_for_20x": round((20 / k * f - 1) / AR_STEPS, 3)}


if __name__ == "__main__":
    main()
