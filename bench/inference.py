"""Inference speed of `vla_jax.policy.Policy` on this machine: ms per action at batch 1 and
actions/s at batch 8 and 32, compile time reported separately.

    python bench/inference.py [--presets=debug,mid] [--repeats=20] [--tokenizer=PATH]

Random weights (speed does not depend on the values), fp32 on CPU. Each timing is the median of
`--repeats` calls after one warm call, end to end (uint8 camera image -> resize -> prefill ->
7 greedy steps -> float64 action); the decoder alone (pre-resized pixels) is timed over a
quarter as many calls (at least 5). Prints one
summary line per preset and writes bench/results/inference.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from compare_setup import time_calls  # noqa: E402  (bench/: timing shared by the benches)

# preset -> image size: 'debug' as configs/debug.py trains it, 'mid' at OpenVLA's 224 px.
CONFIGS = {"debug": 112, "mid": 224, "tiny": 224}
INSTRUCTION = "put the carrot on the plate"


def random_params(cfg, seed: int = 0) -> dict:
    import flax.linen as nn
    import jax
    from flax import traverse_util

    from vla_jax.models.openvla import OpenVLA

    s = cfg.image_size
    shapes = jax.eval_shape(lambda: OpenVLA(cfg).init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8),
                                                      np.ones((1, 4), np.int32)))["params"]
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes))
    out = {p: (np.ones(x.shape, np.float32) if p[-1] == "scale" else
               (0.02 * rng.standard_normal(x.shape)).astype(np.float32)) for p, x in flat.items()}
    return jax.device_put(traverse_util.unflatten_dict(out))


def make_policy(preset: str, tokenizer: str):
    from vla_jax.models.config import get_preset, with_dtypes
    from vla_jax.policy import Policy
    from vla_jax.tokenizer import VLATokenizer

    cfg = with_dtypes(get_preset(preset), "float32")
    size = CONFIGS[preset]
    cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=size),
                              siglip=dataclasses.replace(cfg.siglip, image_size=size))
    q01, q99 = [-0.02] * 6 + [0.0], [0.02] * 6 + [1.0]
    stats = {"bench": {"action": {"q01": q01, "q99": q99, "mask": [True] * 6 + [False],
                                  "mean": [0.0] * 7, "std": [1.0] * 7, "min": q01, "max": q99}}}
    return Policy(cfg, random_params(cfg), VLATokenizer.from_file(tokenizer), stats, source=f"random {preset}")


def bench_preset(preset: str, tokenizer: str, repeats: int, batches=(1, 8, 32), camera: int = 256) -> dict:
    from vla_jax.models.openvla import OpenVLA  # noqa: F401 (import cost outside the timings)

    t0 = time.perf_counter()
    policy = make_policy(preset, tokenizer)
    setup_s = time.perf_counter() - t0
    prompt_len = len(policy.prompt_ids(INSTRUCTION))
    compiled = policy.warmup(batch_sizes=batches, prompt_lengths=(prompt_len,))
    rng = np.random.default_rng(0)
    out = {"preset": preset, "image_size": policy.config.image_size, "camera_image": [camera, camera, 3],
           "params": int(sum(np.prod(x.shape) for x in __import__("jax").tree.leaves(policy.decode_params))),
           "setup_s": round(setup_s, 2), "prompt_tokens": prompt_len,
           "compile_s": {f"batch{k[1]}_len{k[2]}": round(v, 2) for k, v in compiled.items()}, "batches": {}}
    for b in batches:
        images = [rng.integers(0, 256, (camera, camera, 3), dtype=np.uint8) for _ in range(b)]
        pixels = policy.preprocess(images)
        prompts = [policy.prompt_ids(INSTRUCTION)] * b
        e2e = time_calls(lambda: policy.predict_actions(images, [INSTRUCTION] * b), repeats)["median_ms"]
        dec = time_calls(lambda: policy.decode_tokens(pixels, prompts, 7), max(5, repeats // 4))["median_ms"]
        out["batches"][b] = {"ms_per_call": round(e2e, 2), "ms_per_action": round(e2e / b, 2),
                             "actions_per_s": round(1e3 * b / e2e, 1), "decode_only_ms": round(dec, 2),
                             "decode_only_actions_per_s": round(1e3 * b / dec, 1)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="debug,mid")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--tokenizer", default=os.path.join(REPO, "tests", "fixtures", "data", "llama2_tokenizer",
                                                       "tokenizer.model"))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "inference.json"))
    args = p.parse_args(argv)
    import jax

    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                           "device": str(jax.devices()[0]), "dtype": "float32"},
               "repeats": args.repeats, "results": []}
    for preset in args.presets.split(","):
        r = bench_preset(preset.strip(), args.tokenizer, args.repeats)
        results["results"].append(r)
        b = r["batches"]
        print(f"{preset}: {r['params']:,} params @{r['image_size']}px | batch 1: {b[1]['ms_per_action']} ms/action | "
              f"batch 8: {b[8]['actions_per_s']} actions/s | batch 32: {b[32]['actions_per_s']} actions/s | "
              f"compile {sum(r['compile_s'].values()):.1f} s ({len(r['compile_s'])} buckets)", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
