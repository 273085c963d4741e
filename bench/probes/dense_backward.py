"""XLA:CPU cost of the kernel-gradient layout: JAX's derived backward of a dense layer vs
`vla_jax.models.dense` (kernel gradient as x^T g with an explicit transpose).

    python bench/dense_backward.py [--reps=10]

Workload: forward + backward of a scanned 4-layer SwiGLU stack at the 'mid' shapes (batch 8 x 320
tokens, width 512, MLP 1376) and of a 3-layer GELU MLP at the 'demo' shapes (batch 64 x 36 tokens,
width 256, MLP 1024), fp32, one CPU device. Both variants run alternately in one process; the
gradients are checked equal first. Also the fp32 GFLOP/s of one GEMM of the mid MLP's shape, XLA vs torch.
Prints one JSON line and writes bench/results/dense_backward.json.
"""

import argparse
import functools
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=1"])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from vla_jax.models.dense import dense  # noqa: E402


def derived(x, kernel):
    """The plain contraction; JAX derives its backward."""
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def swiglu_stack(linear, params, x):
    def layer(h, p):
        return h + linear(jax.nn.silu(linear(h, p["gate"])) * linear(h, p["up"]), p["down"]), None
    return jnp.sum(jax.lax.scan(layer, x, params)[0] ** 2)


def gelu_mlp(linear, params, x):
    for p in params:
        x = x + linear(jax.nn.gelu(linear(x, p["fc1"]), approximate=False), p["fc2"])
    return jnp.sum(x ** 2)


def workloads():
    k = iter(jax.random.split(jax.random.PRNGKey(0), 16))
    n = lambda shape: jax.random.normal(next(k), shape) * 0.02  # noqa: E731
    L, D, F = 4, 512, 1376
    mid = ({"gate": n((L, D, F)), "up": n((L, D, F)), "down": n((L, F, D))}, jax.random.normal(next(k), (8, 320, D)))
    demo = ([{"fc1": n((256, 1024)), "fc2": n((1024, 256))} for _ in range(3)], jax.random.normal(next(k), (64, 36, 256)))
    return {"mid_swiglu_4x": (swiglu_stack, mid), "demo_gelu_mlp_3x": (gelu_mlp, demo)}


def gemm_rates(reps: int) -> dict:
    """fp32 GFLOP/s of one [2560, 512] x [512, 1376] GEMM (the mid MLP's shape): XLA, and torch with
    its CPU BLAS on the same threads (torch is a benchmark dependency only)."""
    import torch

    m, k, n = 2560, 512, 1376
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    mm = jax.jit(jnp.matmul)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    torch.set_num_threads(os.cpu_count())
    fns = {"xla": lambda: mm(ja, jb).block_until_ready(), "torch": lambda: ta @ tb}
    times = {v: [] for v in fns}
    for f in fns.values():
        f()
    for _ in range(max(reps, 10)):
        for v, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[v].append(time.perf_counter() - t0)
    return {f"{v}_gflop_per_s": round(2 * m * k * n / statistics.median(t) / 1e9, 1) for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "dense_backward.json"))
    a = p.parse_args()
    load_start = os.getloadavg()
    results = {}
    for name, (model, (params, x)) in workloads().items():
        fns = {v: jax.jit(jax.grad(functools.partial(model, lin), argnums=(0, 1)))
               for v, lin in (("derived", derived), ("vla_jax", functools.partial(dense, n_in=1)))}
        grads = {v: jax.block_until_ready(f(params, x)) for v, f in fns.items()}
        diff = max(float(jnp.max(jnp.abs(u - w))) / float(jnp.max(jnp.abs(w)))
                   for u, w in zip(jax.tree.leaves(grads["vla_jax"]), jax.tree.leaves(grads["derived"])))
        assert diff < 1e-4, f"{name}: gradients differ (max relative {diff:.2e})"
        times = {v: [] for v in fns}
        for _ in range(a.reps):  # alternate, so drifting machine speed hits both alike
            for v, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(params, x))
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        results[name] = {"derived_ms": round(med["derived"], 1), "vla_jax_ms": round(med["vla_jax"], 1),
                         "speedup": round(med["derived"] / med["vla_jax"], 2), "max_rel_grad_diff": diff}
    results["gemm_2560x512x1376"] = gemm_rates(a.reps)
    out = {"benchmark": "dense_backward", "reps": a.reps, "jax": jax.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "loadavg_start": load_start,
           "results": results}
    pathlib.Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
