"""The one learned linear map of every model here: `Linear`, and `dense`, its contraction.

`dense(x, kernel, n_in)` contracts the last `n_in` axes of x [*batch, *in] with the leading `n_in`
axes of kernel [*in, *out] -> [*batch, *out]. Its backward is written by hand instead of derived:

    dx      = g . kernel   over the *out axes        -> [*batch, *in]
    dkernel = x . g        over the *batch axes      -> [*in, *out], in the kernel's own axis order

Why: JAX's derived rule computes the kernel gradient as `(g . x)` in [*out, *in] order followed by
a transpose. XLA:CPU folds that transpose into the dot and then materialises a transposed copy of
the [tokens, out] cotangent; the copy is fused into the elementwise producer (e.g. SwiGLU's
backward), which then reads its inputs with a stride of a whole row. At the 'mid' preset those
copies took ~20% of a train step (`bench/dense_backward.py`, BENCHMARKS.md). The values are the
same dots, so results match the derived gradient to float rounding (tests/test_dense.py checks the
rule against torch autograd).

Mixed precision: x and kernel arrive in the compute dtype; `accumulate_fp32` makes the forward
output float32 (logits), and the backward then contracts the cotangent in the compute dtype with
float32 accumulation, returning each gradient in its operand's dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Names of the adapter params a Linear picks up from its own params scope (set by lora.per_layer_params).
LORA_A, LORA_B = "lora_A", "lora_B"


def _contract(a, b, a_axes, b_axes, out_dtype):
    return jax.lax.dot_general(a, b, ((tuple(a_axes), tuple(b_axes)), ((), ())), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense(x, kernel, n_in: int = 1, accumulate_fp32: bool = False):
    """x [*batch, *in] . kernel [*in, *out] -> [*batch, *out]; float32 if accumulate_fp32 else x.dtype."""
    return _forward(x, kernel, n_in, accumulate_fp32)


def _forward(x, kernel, n_in, accumulate_fp32):
    if x.shape[x.ndim - n_in:] != kernel.shape[:n_in]:
        raise ValueError(f"dense: input axes {x.shape[x.ndim - n_in:]} of x {x.shape} do not match the kernel's "
                         f"leading {n_in} axes {kernel.shape[:n_in]} (kernel {kernel.shape})")
    out = jnp.float32 if accumulate_fp32 else None
    return _contract(x, kernel, range(x.ndim - n_in, x.ndim), range(n_in), out)


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
    # XLA does otherwise) it reads every input with a row-sized stride (~15-20% of the 'demo' step).
    k_in, k_out = kernel.shape[:n_in], kernel.shape[n_in:]
    x2 = jax.lax.optimization_barrier(x.reshape(-1, math.prod(k_in)))
    dk = _contract(x2.T, g.reshape(-1, math.prod(k_out)), (1,), (0,), acc).reshape(kernel.shape)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nn.Module):
    """`[..., *in] @ kernel [*in, *features] (+ bias [*features])`, contracting the last `n_in` axes.

    Params: `kernel` (logical names `kernel_axes`, one per axis of [*in, *features]) and, when
    `bias_axes` is given, `bias` (zeros init). When the applied params also hold `lora_A` [*in, r] and
    `lora_B` [r, *features] beside the kernel (never created by init; see lora.per_layer_params),
    the output gains the low-rank term `(x @ lora_A) @ lora_B`. Inputs and kernel are cast to `dtype`; with
    `accumulate_fp32` the output is float32 (used for logits).
    """

    features: Sequence[int]
    kernel_axes: Sequence[Any]
    bias_axes: Optional[Sequence[Any]] = None
    n_in: int = 1
    kernel_init: Callable = nn.initializers.normal(0.02)
    accumulate_fp32: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        in_shape = tuple(x.shape[x.ndim - self.n_in:])
        shape = in_shape + tuple(self.features)
        if len(self.kernel_axes) != len(shape):
            raise ValueError(f"{self.name}: kernel_axes {tuple(self.kernel_axes)} name {len(self.kernel_axes)} axes "
                             f"but the kernel {shape} has {len(shape)}")
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.kernel_axes)),
                            shape, self.param_dtype)
        x = x.astype(self.dtype)
        y = dense(x, jnp.asarray(kernel, self.dtype), self.n_in, self.accumulate_fp32)
        if self.has_variable("params", LORA_A):
            y = y + self._adapter(x).astype(y.dtype)
        if self.bias_axes is None:
            return y
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, tuple(self.bias_axes)),
                          tuple(self.features), self.param_dtype)
        return y + bias.astype(y.dtype)

    def _adapter(self, x):
        """Per-layer LoRA (`vla_jax.models.lora.per_layer_params` puts the adapters beside the kernel):
        (x @ A) @ B with A [*in, r] and B [r, *features] already scaled by alpha / r, both cast to the
        compute dtype, so that no merged [*in, *features] kernel is ever formed."""
        a = jnp.asarray(nn.meta.unbox(self.get_variable("params", LORA_A)), self.dtype)
        b = jnp.asarray(nn.meta.unbox(self.get_variable("params", LORA_B)), self.dtype)
        return dense(dense(x, a, self.n_in), b, 1, self.accumulate_fp32)
