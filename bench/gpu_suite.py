"""Accelerator suite: OpenVLA-7B-geometry inference and train steps on one GPU, next to the hardware limit.

    python bench/gpu_suite.py                        # one H100/H200 (236 s on an H200), prints one JSON
    python bench/gpu_suite.py --preset=tiny --dtype=float32 --train-layers=0 --quick   # CPU smoke run

Random weights (speed does not depend on the values). Three parts, each skipped (and recorded as
such) once --budget-s seconds have passed, so the whole run fits a lent machine's time:

1. inference: `vla_jax.models.decode.greedy_decode` (jitted prefill into a static KV cache + 6
   cached greedy steps = 7 action tokens; per-layer weight layout, as Policy holds it) with bf16
   weights, as OpenVLA serves them. ms/action at
   batch 1, actions/s at batch 8 and 32 (each call ends with the tokens on the host). The batch-1
   hardware limit: prefill FLOPs / peak FLOP/s + 6 x (LLM weight bytes without the embedding table)
   / memory bandwidth (H100 SXM: 989 TFLOP/s, 3.35 TB/s: ~4.1 TFLOP + 6 x 13.2 GB = ~28 ms).
2. train_full: vla_jax's real train step (fp32 master weights, bf16 compute, remat, AdamW, all
   parameters trained) on the 7B geometry with --train-layers Llama layers (full towers, projector,
   vocabulary): tokens/s and MFU (model FLOPs of `vla_jax.training.metrics`, lm_head at the 8
   supervised positions, remat not counted) against --peak-tflops.
3. train_lora: the full 32-layer 7B with LoRA r=32 on bf16 base weights (OpenVLA's fine-tuning
   recipe): tokens/s and MFU the same way.
4. torch_generate: the baseline on the same device: what OpenVLA users run today (timm towers +
   transformers `LlamaForCausalLM.generate` with KV cache and SDPA attention, `bench/torch_side.py`'s
   code), the same geometry, dtype, prompt length and batch sizes. It runs in a child process so that
   JAX's and torch's GPU memory pools never share one process. `speedup_vs_torch` divides torch's
   batch-1 ms/action by vla_jax's.

Memory: the device's peak bytes in use after each part (`device.memory_stats()`; None on CPU) and
the host's peak RSS. The JSON goes to stdout (and --out if given).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from compare_setup import summarize, time_calls  # noqa: E402  (timing statistics shared by the benches)

H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_PER_S = 3.35e12
NUM_TOKENS = 7
NUM_SUPERVISED = 8  # 7 action tokens + EOS


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="openvla-7b")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (inference weights are stored in it too)")
    p.add_argument("--batches", default="1,8,32", help="inference batch sizes (the first is the latency one)")
    p.add_argument("--prompt-len", type=int, default=24, help="real prompt tokens (BOS .. 29871)")
    p.add_argument("--prompt-bucket", type=int, default=32, help="padded prompt length (Policy's buckets)")
    p.add_argument("--infer-reps", type=int, default=20)
    p.add_argument("--batch-reps", type=int, default=5)
    p.add_argument("--train-layers", type=int, default=4, help="Llama layers of the full train step (0: the preset's)")
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--lora-batch", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64, help="text tokens per training example")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--parts", default="inference,train_full,train_lora,torch_generate")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_FLOPS / 1e12)
    p.add_argument("--peak-tbps", type=float, default=H100_HBM_BYTES_PER_S / 1e12, help="memory bandwidth, TB/s")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 2 reps, 2 steps, batches 1,2")
    p.add_argument("--out", default="")
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)  # set by torch_generate
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.infer_reps, a.batch_reps, a.train_steps = "1,2", 2, 1, 2
        a.train_batch, a.lora_batch = 2, 2
    return a


def model_config(preset: str, dtype: str, param_dtype: str, remat: bool, layers: int = 0):
    from vla_jax.models.config import get_preset, with_dtypes

    cfg = with_dtypes(get_preset(preset), dtype, param_dtype, remat=remat)
    if layers:
        cfg = dataclasses.replace(cfg, llama=dataclasses.replace(cfg.llama, num_layers=layers))
    return cfg


def count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def random_params(model, cfg, seed: int = 0):
    """Params filled on the device in their param dtype: uniform in [-0.02, 0.02) from an integer hash
    of (leaf, index) (norm/LayerScale scales 1). Speed does not depend on the values; threefry draws
    for every leaf made this one jit compile for 40 s on a 2-core CPU."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    s = cfg.image_size
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8),
                                                             np.ones((1, 4), np.int32)))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    def fill():
        out = []
        for i, (path, x) in enumerate(leaves):
            if str(path[-1].key) == "scale":
                out.append(jnp.ones(x.shape, x.dtype))
                continue
            h = jnp.arange(math.prod(x.shape), dtype=jnp.uint32) * np.uint32(2654435761) + np.uint32(
                (seed * 7919 + i * 40503) % 2**32)
            h = (h ^ (h >> 15)) * np.uint32(2246822519)
            h = h ^ (h >> 13)
            u = (h >> 8).astype(jnp.float32) * (1.0 / 2**24)  # [0, 1)
            out.append((0.04 * (u - 0.5)).reshape(x.shape).astype(x.dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(fill)()


def memory(part: str) -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return {"after": part, "device_peak_gb": None if peak is None else round(peak / 2**30, 2),
            "device_limit_gb": round(stats["bytes_limit"] / 2**30, 2) if "bytes_limit" in stats else None,
            "host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def hardware_limit(cfg, prompt_len: int, peak_flops: float, bandwidth: float) -> dict:
    """Batch-1 lower bound: prefill at peak FLOP/s + each cached step reading the LLM weights once."""
    from vla_jax.training import metrics as mlib

    prefill = sum(mlib.forward_flops(cfg, prompt_len, 1).values())
    lc = cfg.llama
    llm_params = (lc.num_layers * (lc.hidden_size * lc.head_dim * (2 * lc.num_heads + 2 * lc.kv_heads)
                                   + 3 * lc.hidden_size * lc.intermediate_size + 2 * lc.hidden_size)
                  + lc.hidden_size + lc.hidden_size * lc.vocab_size)  # layers, final norm, lm_head (no embedding)
    step_bytes = llm_params * np.dtype(jax_dtype(cfg.param_dtype)).itemsize
    ms = 1e3 * (prefill / peak_flops + (NUM_TOKENS - 1) * step_bytes / bandwidth)
    return {"prefill_tflop": round(prefill / 1e12, 6), "decode_step_gb": round(step_bytes / 1e9, 6),
            "limit_ms_per_action": round(ms, 4), "limit_hz": round(1e3 / ms, 1)}


def jax_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)


def decode_inputs(cfg, batch: int, prompt_len: int, bucket: int, rng) -> tuple:
    """(uint8 images [B, S, S, 3], ids int32 [B, bucket]: BOS + random text ids, right-padded, lengths [B])."""
    ids = np.full((batch, bucket), cfg.pad_token_id, np.int32)
    ids[:, 0] = cfg.bos_token_id
    ids[:, 1:prompt_len] = rng.integers(3, cfg.base_vocab_size, (batch, prompt_len - 1))
    images = rng.integers(0, 256, (batch, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    return images, ids, np.full((batch,), prompt_len, np.int32)


def inference_part(a) -> dict:
    import functools

    import jax

    from vla_jax.models.decode import greedy_decode, split_layers
    from vla_jax.models.openvla import OpenVLA

    cfg = model_config(a.preset, a.dtype, a.dtype, remat=False)
    model = OpenVLA(cfg)
    t0 = time.perf_counter()
    params = split_layers(random_params(model, cfg), consume=True)  # the decoding layout, as Policy holds it
    jax.block_until_ready(params)
    out = {"params": count(params), "param_dtype": a.dtype, "init_s": round(time.perf_counter() - t0, 1),
           "limit": hardware_limit(cfg, a.prompt_len, a.peak_tflops * 1e12, a.peak_tbps * 1e12)}
    decoder = jax.jit(functools.partial(greedy_decode, model, num_tokens=NUM_TOKENS))  # what Policy compiles
    rng = np.random.default_rng(0)
    batches = [int(b) for b in a.batches.split(",")]
    inputs = {b: decode_inputs(cfg, b, a.prompt_len, a.prompt_bucket, rng) for b in batches}
    t0 = time.perf_counter()
    lowered = [decoder.lower(params, *inputs[b]) for b in batches]
    with ThreadPoolExecutor(len(lowered)) as pool:  # XLA compiles the buckets in parallel
        compiled = dict(zip(batches, pool.map(lambda low: low.compile(), lowered)))
    out["compile_s_all_buckets"] = round(time.perf_counter() - t0, 1)
    for b in batches:
        fn = lambda: np.asarray(compiled[b](params, *inputs[b]))  # noqa: E731 (tokens on the host)
        t = time_calls(fn, a.infer_reps if b == batches[0] else a.batch_reps)
        t.update(ms_per_action=round(t["median_ms"] / b, 3), actions_per_s=round(1e3 * b / t["median_ms"], 2))
        out[f"batch{b}"] = t
    first = out[f"batch{batches[0]}"]
    out["ms_per_action_batch1"] = first["median_ms"]
    out["fraction_of_limit"] = round(out["limit"]["limit_ms_per_action"] / first["median_ms"], 6)
    out["memory"] = memory("inference")
    del params, compiled, lowered
    gc.collect()
    return out


def train_part(a, lora: bool) -> dict:
    import jax

    from vla_jax import sharding as shd
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.spec import BatchSpec
    from vla_jax.training import metrics as mlib
    from vla_jax.training import run, state as st
    from vla_jax.training import step as sp
    from vla_jax.training.synthetic import SyntheticBatches

    layers = 0 if lora else a.train_layers
    # LoRA: bf16 base weights (frozen), fp32 adapters; full: fp32 master weights. bf16 compute, remat.
    cfg = model_config(a.preset, a.dtype, a.dtype if lora else "float32", remat=True, layers=layers)
    model = OpenVLA(cfg)
    batch_size = a.lora_batch if lora else a.train_batch
    hooks = st.ParamHooks()
    if lora:
        from vla_jax.models import lora as lora_lib

        hooks = st.ParamHooks(**lora_lib.hook_functions(lora_lib.LoraConfig(rank=32, alpha=16.0)))
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    tx, schedule = st.make_optimizer(st.OptimConfig(2e-5, 0.0, 0.9, 0.999, 1e-8, 1.0), 1000)
    spec = BatchSpec.for_model(cfg, a.text_len)
    example = run.example_inputs(spec)
    abstract_params = st.abstract_params(model, example, hooks)
    mask = hooks.trainable(abstract_params) if hooks.trainable else st.trainable_mask(abstract_params)
    t0 = time.perf_counter()
    state, shardings, abstract = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask, hooks)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    data = SyntheticBatches(batch_size, spec)
    host = spec.select(next(data))
    loss_cfg = sp.LossConfig.for_model(cfg, spec)
    step = sp.jit_train_step(sp.make_train_step(model, tx, schedule, loss_cfg, mask, 1, hooks, mesh=mesh), mesh,
                             shardings, {k: v.shape for k, v in host.items()})
    t0 = time.perf_counter()
    compiled = step.lower(abstract, shd.host_batch_to_global(host, mesh)).compile()
    compile_s = time.perf_counter() - t0
    batch = shd.host_batch_to_global(host, mesh)
    times, losses = [], []
    for i in range(a.train_steps + 2):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(np.asarray(metrics["loss"])))  # the host sync ends the step
        if i >= 2:
            times.append(time.perf_counter() - t0)
    stats = summarize(times)
    med = stats["median_ms"] / 1e3
    tokens = batch_size * (a.text_len + cfg.num_inserted_tokens)
    flops = batch_size * mlib.train_flops_per_example(cfg, a.text_len, NUM_SUPERVISED, mlib.parts_trainable(mask))
    out = {"llama_layers": cfg.llama.num_layers, "lora": lora, "params": count(state.params),
           "trainable": st.param_summary(state.params, mask)["trainable"], "batch": batch_size,
           "tokens_per_example": a.text_len + cfg.num_inserted_tokens, "init_s": round(init_s, 1),
           "compile_s": round(compile_s, 1), "step_median_ms": stats["median_ms"], "step_p90_ms": stats["p90_ms"],
           "tokens_per_s": round(tokens / med, 1), "model_tflop_per_step": round(flops / 1e12, 6),
           "achieved_tflops": round(flops / med / 1e12, 6), "mfu": round(flops / med / (a.peak_tflops * 1e12), 8),
           "loss_first": losses[0], "loss_last": losses[-1], "finite": bool(np.all(np.isfinite(losses)))}
    out["memory"] = memory("train_lora" if lora else "train_full")
    del state, compiled, batch
    gc.collect()
    return out


def torch_part(a) -> dict:
    """Runs in the child process (--torch-child): the PyTorch generate baseline, no JAX imported."""
    import torch
    from torch_side import build_model, generate_tokens

    cfg = model_config(a.preset, a.dtype, a.dtype, remat=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(dev):  # default inits (random) made on the device, then cast: values do not matter
        model = build_model(cfg, "sdpa").to(getattr(torch, a.dtype)).eval()
    out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
           "params": sum(p.numel() for p in model.parameters()), "init_s": round(time.perf_counter() - t0, 1)}
    rng = np.random.default_rng(0)
    prompt = [cfg.bos_token_id] + rng.integers(3, cfg.base_vocab_size, a.prompt_len - 1).tolist()
    batches = [int(b) for b in a.batches.split(",")]
    for b in batches:
        px = rng.integers(0, 256, (b, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
        t = time_calls(lambda: generate_tokens(model, px, prompt), a.infer_reps if b == batches[0] else a.batch_reps)
        t.update(ms_per_action=round(t["median_ms"] / b, 3), actions_per_s=round(1e3 * b / t["median_ms"], 2))
        out[f"batch{b}"] = t
    out["ms_per_action_batch1"] = out[f"batch{batches[0]}"]["median_ms"]
    if dev == "cuda":
        out["device_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def torch_in_child(a) -> dict:
    """torch_part in a fresh process (JAX already holds this process's GPU memory pool)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "torch.json")
        argv = [sys.executable, os.path.abspath(__file__), "--torch-child", f"--out={path}", f"--preset={a.preset}",
                f"--dtype={a.dtype}", f"--batches={a.batches}", f"--prompt-len={a.prompt_len}",
                f"--infer-reps={a.infer_reps}", f"--batch-reps={a.batch_reps}"]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"torch child exited {proc.returncode}: {proc.stderr[-800:]}")
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> dict:
    a = parse(argv)
    if a.torch_child:
        return json.loads(save(torch_part(a), a.out))
    t_start = time.perf_counter()
    import jax

    import flax
    import optax

    dev = jax.devices()[0]
    from vla_jax.training.metrics import device_peak_flops

    report = {"benchmark": "gpu_suite", "preset": a.preset, "dtype": a.dtype, "device": dev.device_kind,
              "platform": dev.platform, "jax": jax.__version__, "flax": flax.__version__,
              "optax": optax.__version__, "device_count": jax.device_count(),
              "peak_tflops_used": a.peak_tflops, "peak_tbps_used": a.peak_tbps,
              "device_table_peak_tflops": (device_peak_flops(dev.device_kind) or 0) / 1e12 or None,
              "reference_hz": {"openvla_pytorch_rtx4090": 6.0, "openvla_pytorch_a100": 4.2}, "skipped": []}
    parts = {"inference": lambda: inference_part(a), "train_full": lambda: train_part(a, lora=False),
             "train_lora": lambda: train_part(a, lora=True), "torch_generate": lambda: torch_in_child(a)}
    for name in a.parts.split(","):
        if time.perf_counter() - t_start > a.budget_s:
            report["skipped"].append(name)
            continue
        t0 = time.perf_counter()
        try:
            report[name] = parts[name]()
        except Exception as e:  # one failing part (e.g. out of memory) must not lose the others
            report[name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
        report[name]["wall_s"] = round(time.perf_counter() - t0, 1)
        save(report, a.out)  # a lease that ends mid-run still leaves the parts measured so far
    ours, theirs = report.get("inference", {}), report.get("torch_generate", {})
    if "ms_per_action_batch1" in ours and "ms_per_action_batch1" in theirs:
        report["speedup_vs_torch"] = round(theirs["ms_per_action_batch1"] / ours["ms_per_action_batch1"], 3)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(save(report, a.out), flush=True)
    return report


def save(report: dict, path: str) -> str:
    """Writes the report as JSON to path (if any) through a temporary file; returns the text."""
    text = json.dumps(report, indent=2)
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return text


if __name__ == "__main__":
    main()
