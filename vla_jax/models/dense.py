"""The one learned linear map of every model here: `Linear`, and `dense`, its contraction.

`dense(x, kernel, n_in)` contracts the last `n_in` axes of x [*batch, *in] with the leading `n_in`
axes of kernel [*in, *out] -> [*batch, *out]. With `custom_vjp` (`ExecutionConfig.dense_custom_vjp`,
on by default) the same contraction runs through `execution.dense_vjp`, whose hand-written kernel
gradient is faster on XLA:CPU; the values are the same.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vla_jax.models.execution import dense_vjp

# Names of the adapter params a Linear picks up from its own params scope (set by lora.per_layer_params).
LORA_A, LORA_B = "lora_A", "lora_B"


def dense(x, kernel, n_in: int = 1, accumulate_fp32: bool = False, custom_vjp: bool = True):
    """x [*batch, *in] . kernel [*in, *out] -> [*batch, *out]; float32 if accumulate_fp32 else x.dtype."""
    if x.shape[x.ndim - n_in:] != kernel.shape[:n_in]:
        raise ValueError(f"dense: input axes {x.shape[x.ndim - n_in:]} of x {x.shape} do not match the kernel's "
                         f"leading {n_in} axes {kernel.shape[:n_in]} (kernel {kernel.shape})")
    if custom_vjp:
        return dense_vjp.dense(x, kernel, n_in, accumulate_fp32)
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, kernel, dims, preferred_element_type=jnp.float32 if accumulate_fp32 else None)


class Linear(nn.Module):
    """`[..., *in] @ kernel [*in, *features] (+ bias [*features])`, contracting the last `n_in` axes.

    Params: `kernel` (logical names `kernel_axes`, one per axis of [*in, *features]) and, when
    `bias_axes` is given, `bias` (zeros init). When the applied params also hold `lora_A` [*in, r] and
    `lora_B` [r, *features] beside the kernel (never created by init; see lora.per_layer_params),
    the output gains the low-rank term `(x @ lora_A) @ lora_B`. Inputs and kernel are cast to `dtype`; with
    `accumulate_fp32` the output is float32 (used for logits). `custom_vjp`: see `dense`.
    """

    features: Sequence[int]
    kernel_axes: Sequence[Any]
    bias_axes: Optional[Sequence[Any]] = None
    n_in: int = 1
    kernel_init: Callable = nn.initializers.normal(0.02)
    accumulate_fp32: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_vjp: bool = True  # ExecutionConfig.dense_custom_vjp

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
        y = dense(x, jnp.asarray(kernel, self.dtype), self.n_in, self.accumulate_fp32, self.custom_vjp)
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
        return dense(dense(x, a, self.n_in, False, self.custom_vjp), b, 1, self.accumulate_fp32, self.custom_vjp)
