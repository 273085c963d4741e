"""One causal attention core at the 'mid' Llama shape, forward and forward+backward, JAX vs torch.

    python bench/attention_core.py [--batch=8] [--tokens=320] [--heads=8] [--head-dim=64] [--reps=20]

The core is what sits between the q/k/v projections and o_proj: scores, causal mask, fp32 softmax,
weighted sum (no projections, no RoPE). Each side runs in its own process pinned to the same cores
(taskset), fp32, median of --reps calls after one warm-up (JAX: jitted, compile excluded):
- jax `model_one_block`: vla_jax's code (`vla_jax.models.attention.causal_attend`, [B, T, H, hd]
  einsums with the head axis inside, masked fp32 softmax) as one block, gradients derived by JAX;
- jax `model_blocked`: the same function in blocks of 64 query rows (its default on CPU), with its
  hand-written backward (`vla_jax.models.execution.blocked_attention`; results/attention_core.json predates it);
- jax `head_major`: the same on [B, H, T, hd] inputs (a clean batched matmul for XLA);
- jax `dot_product_attention`: `jax.nn.dot_product_attention(is_causal=True)` (implementation 'xla');
- torch `sdpa`: `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`, which calls
  torch's fused flash-attention kernel for CPU (what transformers' Llama runs by default).
Writes bench/results/attention_core.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def jax_side(b: int, t: int, h: int, d: int, reps: int) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from vla_jax.models.attention import causal_attend

    neg = jnp.finfo(jnp.float32).min
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, S]

    def model_one_block(q, k, v):  # [B, T, H, hd]
        return causal_attend(q, k, v, jnp.float32, query_block=0)

    def model_blocked(q, k, v):
        return causal_attend(q, k, v, jnp.float32, query_block=64)

    def head_major(q, k, v):  # [B, H, T, hd]
        s = jnp.einsum("bhtd,bhsd->bhts", q, k) * d ** -0.5
        p = jax.nn.softmax(jnp.where(causal, s, neg), axis=-1)
        return jnp.einsum("bhts,bhsd->bhtd", p, v)

    def dpa(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)

    keys = jax.random.split(jax.random.key(0), 4)
    btdh = [jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in keys]
    bhtd = [jnp.transpose(x, (0, 2, 1, 3)) for x in btdh]
    out = {"side": "jax", "jax": jax.__version__}
    for name, fn, args in (("model_one_block", model_one_block, btdh), ("model_blocked", model_blocked, btdh),
                           ("head_major", head_major, bhtd), ("dot_product_attention", dpa, btdh)):
        fwd = jax.jit(fn)
        w = args[3]
        grad = jax.jit(jax.grad(lambda q, k, v, w=w, fn=fn: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))
        out[name] = {"forward_ms": _median_ms(lambda: fwd(*args[:3]).block_until_ready(), reps),
                     "forward_backward_ms": _median_ms(lambda: jax.block_until_ready(grad(*args[:3])), reps)}
    return out


def torch_side(b: int, t: int, h: int, d: int, reps: int) -> dict:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    torch.manual_seed(0)
    q, k, v, w = (torch.randn(b, h, t, d) for _ in range(4))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def fwd_bwd():
        (sdpa(qg, kg, vg, is_causal=True) * w).sum().backward()

    with torch.no_grad():
        fwd = _median_ms(lambda: sdpa(q, k, v, is_causal=True), reps)
    return {"side": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "sdpa": {"forward_ms": fwd, "forward_backward_ms": _median_ms(fwd_bwd, reps)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("side", nargs="?", default="both", choices=("both", "jax", "torch"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=320)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "attention_core.json"))
    a = p.parse_args(argv)
    shape = (a.batch, a.tokens, a.heads, a.head_dim)
    if a.side != "both":
        print(json.dumps((jax_side if a.side == "jax" else torch_side)(*shape, a.reps)))
        return 0
    flops = 2 * 2 * a.batch * a.heads * a.tokens * a.tokens * a.head_dim  # two matmuls, mask not skipped
    report = {"benchmark": "attention_core", "shape_b_t_h_hd": list(shape), "forward_gflop_dense": flops / 1e9,
              "cores": a.cores}
    for side, env in (("jax", {}), ("torch", {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})):
        cmd = ["taskset", "-c", a.cores, sys.executable, os.path.abspath(__file__), side, f"--batch={a.batch}",
               f"--tokens={a.tokens}", f"--heads={a.heads}", f"--head-dim={a.head_dim}", f"--reps={a.reps}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO, **env))
        if proc.returncode != 0:
            raise RuntimeError(f"{side} side failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        report[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"causal attention core, [B, T, H, hd] = {list(shape)}, fp32 (ms, median of {a.reps}):")
    rows = [(f"jax {n}", report["jax"][n]) for n in ("model_one_block", "model_blocked", "head_major",
                                                     "dot_product_attention")]
    rows.append(("torch sdpa", report["torch"]["sdpa"]))
    for name, r in rows:
        print(f"  {name:28} forward {r['forward_ms']:8.2f}   forward+backward {r['forward_backward_ms']:8.2f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
