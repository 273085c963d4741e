"""`dense` with a hand-written backward (`ExecutionConfig.dense_custom_vjp`), for XLA:CPU training speed.

The forward is the plain contraction of `vla_jax.models.dense.dense`: x [*batch, *in] . kernel
[*in, *out] -> [*batch, *out] (float32 if accumulate_fp32, else x.dtype). The backward is written
out instead of derived:

    dx      = g . kernel   over the *out axes        -> [*batch, *in]
    dkernel = x . g        over the *batch axes      -> [*in, *out], in the kernel's own axis order

Why: JAX's derived rule computes the kernel gradient as `(g . x)` in [*out, *in] order followed by
a transpose. XLA:CPU folds that transpose into the dot and then materialises a transposed copy of
the [tokens, out] cotangent; the copy is fused into the elementwise producer (e.g. SwiGLU's
backward), which then reads its inputs with a stride of a whole row (a large share of a train step;
BENCHMARKS.md, "dense backward"). The values are the same dots, so results match the derived
gradient to float rounding (tests/models/test_dense.py checks the rule against torch autograd).

Mixed precision: x and kernel arrive in the compute dtype; with `accumulate_fp32` the backward
contracts the cotangent in the compute dtype with float32 accumulation, returning each gradient in
its operand's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _contract(a, b, a_axes, b_axes, out_dtype):
    return jax.lax.dot_general(a, b, ((tuple(a_axes), tuple(b_axes)), ((), ())), preferred_element_type=out_dtype)


def _forward(x, kernel, n_in, accumulate_fp32):
    out = jnp.float32 if accumulate_fp32 else None
    return _contract(x, kernel, range(x.ndim - n_in, x.ndim), range(n_in), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x, kernel, n_in: int = 1, accumulate_fp32: bool = False):
    """x [*batch, *in] . kernel [*in, *out] -> [*batch, *out] (shapes checked by the caller)."""
    return _forward(x, kernel, n_in, accumulate_fp32)


def _dense_fwd(x, kernel, n_in, accumulate_fp32):
    return _forward(x, kernel, n_in, accumulate_fp32), (x, kernel)


def _dense_bwd(n_in, accumulate_fp32, res, g):
    x, kernel = res
    n_batch, n_out = x.ndim - n_in, kernel.ndim - n_in
    g = g.astype(x.dtype)
    acc = jnp.float32 if accumulate_fp32 or x.dtype != jnp.float32 else None
    dx = _contract(g, kernel, range(n_batch, n_batch + n_out), range(n_in, n_in + n_out), acc)
    # The kernel gradient as [in, N] @ [N, out] on 2-D views, with the transpose of x explicit and x
    # behind a barrier: XLA:CPU's GEMMs take the contracted axis last on the left, so x^T must be
    # materialised; as its own op that is a tiled transpose, whereas fused into x's producer (what
    # XLA does otherwise) it reads every input with a row-sized stride.
    k_in, k_out = kernel.shape[:n_in], kernel.shape[n_in:]
    x2 = jax.lax.optimization_barrier(x.reshape(-1, math.prod(k_in)))
    dk = _contract(x2.T, g.reshape(-1, math.prod(k_out)), (1,), (0,), acc).reshape(kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)
