"""Where the batch-1 action latency goes on an accelerator, and which layer layout removes it.

    python bench/gpu_decode_probe.py --out=probe.json                    # 7B geometry, bf16, one GPU
    python bench/gpu_decode_probe.py --preset=tiny --dtype=float32 --reps=2   # CPU smoke run

Same random bf16 weights and inputs as `bench/gpu_suite.py`'s inference part (--batch rows, default
1, prompt of 24 tokens padded to 32). Variants, each timed as one jitted call that ends with the tokens on the host:

- `scan`: greedy decoding on the stacked layout (`OpenVLA.prefill` / `decode_step`: the layers as
  one `nn.scan` over [L, ...] weights; what Policy ran before this probe);
- `prefill`: only its prefill (towers, projector, 288 tokens through the LLM, first token), so
  (scan - prefill) / 6 is the cost of one cached decode step (`decode_step_ms_scan`);
- `per_layer`: `vla_jax.models.decode.greedy_decode` (what Policy runs now): each layer's weights and
  KV cache separate arrays (`split_layers`, once, outside the timed call) and the layers unrolled in
  the program. Inside a scan every step's layer weights are a dynamic slice of the stacked array.
  Since commit 6c35df7 its prefill also runs the last layer only at each row's last real token, so
  its prefill differs from `prefill`'s (the H200 results in bench/results/gpu_decode_probe_h200_*.json
  predate that and also report `decode_step_ms_per_layer` = (per_layer - prefill) / 6).

Tokens of every variant are compared with `scan`'s. One JSON (stdout and --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import gpu_suite  # noqa: E402  (random_params, model_config: the suite's weights and geometry)
from compare_setup import time_calls  # noqa: E402

NUM_TOKENS = gpu_suite.NUM_TOKENS


def stacked_decoder(model, num_tokens: int):
    """-> jitted fn(params, pixel_values, input_ids, lengths) -> tokens [B, num_tokens]: greedy
    decoding on the stacked layout (`OpenVLA.prefill` / `decode_step`, the layers as one scan over
    [L, ...] weights and an [L, ...] KV cache): what `greedy_decode` did before the split layout."""
    import jax
    import jax.numpy as jnp

    from vla_jax.models.llama import init_cache
    from vla_jax.models.openvla import OpenVLA

    cfg = model.config

    def decode(params, pixel_values, input_ids, lengths):
        b, t = input_ids.shape
        cache = init_cache(cfg.llama, b, t + cfg.num_patches + num_tokens)
        logits, cache = model.apply({"params": params}, pixel_values, input_ids, lengths, cache,
                                    method=OpenVLA.prefill)
        tokens = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(jnp.argmax(logits, -1).astype(jnp.int32))
        start = lengths.astype(jnp.int32) + cfg.num_patches

        def body(i, carry):
            tokens, cache = carry
            logits, cache = model.apply({"params": params}, tokens[:, i - 1], start + i - 1, cache,
                                        method=OpenVLA.decode_step)
            return tokens.at[:, i].set(jnp.argmax(logits, -1).astype(jnp.int32)), cache

        return jax.lax.fori_loop(1, num_tokens, body, (tokens, cache))[0]

    return jax.jit(decode)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="openvla-7b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--variants", default="scan,prefill,per_layer")
    p.add_argument("--prompt-len", type=int, default=24)
    p.add_argument("--prompt-bucket", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="")
    a = p.parse_args(argv)
    import jax

    from vla_jax.models.decode import make_greedy_decoder, split_layers
    from vla_jax.models.llama import init_cache
    from vla_jax.models.openvla import OpenVLA

    cfg = gpu_suite.model_config(a.preset, a.dtype, a.dtype, remat=False)
    model = OpenVLA(cfg)
    params = gpu_suite.random_params(model, cfg)
    rng = np.random.default_rng(0)
    b = a.batch
    inputs = gpu_suite.decode_inputs(cfg, b, a.prompt_len, a.prompt_bucket, rng)
    report = {"benchmark": "gpu_decode_probe", "device": jax.devices()[0].device_kind, "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "preset": a.preset, "dtype": a.dtype, "batch": b}
    ref = None
    for name in a.variants.split(","):
        if name == "scan":
            fn, args = stacked_decoder(model, NUM_TOKENS), (params, *inputs)
        elif name == "prefill":
            def prefill(params, px, ids, lengths):
                cache = init_cache(cfg.llama, ids.shape[0], ids.shape[1] + cfg.num_patches + NUM_TOKENS)
                return model.apply({"params": params}, px, ids, lengths, cache, method=OpenVLA.prefill)[0].argmax(-1)
            fn, args = jax.jit(prefill), (params, *inputs)
        elif name == "per_layer":
            fn, args = make_greedy_decoder(model, NUM_TOKENS), (split_layers(params), *inputs)
        else:
            raise ValueError(f"unknown variant {name!r}; expected scan, prefill or per_layer")
        t0 = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - t0
        tokens = np.asarray(compiled(*args))
        t = time_calls(lambda: np.asarray(compiled(*args)), a.reps)
        t["compile_s"] = round(compile_s, 1)
        if name != "prefill":
            ref = tokens if ref is None else ref
            t["tokens"], t["tokens_equal_first_variant"] = tokens.tolist(), bool(np.array_equal(tokens, ref))
        report[name] = t
        print(name, t["median_ms"], "ms", flush=True)
    if "scan" in report and "prefill" in report:
        report["decode_step_ms_scan"] = round((report["scan"]["median_ms"] - report["prefill"]["median_ms"]) / 6, 3)
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return report


if __name__ == "__main__":
    main()
