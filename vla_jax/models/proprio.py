"""OpenVLA-OFT's proprio projector: the robot state vector -> one token in the LLM's embedding space.

Layout (OFT_REFERENCE.md §7, upstream `ProprioProjector`): Linear(P -> H) -> exact (erf) GELU ->
Linear(H -> H), both with biases, H the LLM width (4096 at 7B: 16.82M parameters for LIBERO's P = 8).
Submodule names `fc1` / `fc2` are upstream's state-dict names (`module.fc1.*`, `module.fc2.*` in
`proprio_projector--STEP_checkpoint.pt`), so the released weights map one to one (torch's [out, in]
weight -> our [in, out] kernel). Kernels start as torch's default Linear init; upstream trains the
module in full (no adapters, `lora.FULLY_TRAINED`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.models.dense import Linear

# Logical axis names (rules in vla_jax.sharding.LOGICAL_RULES): the P inputs (too few to shard), the
# LLM width on a matrix's input side (fsdp) and on its output side (tensor), as the L1 head does.
IN_AXIS, EMBED_AXIS, HIDDEN_AXIS = "proprio_in", "proprio_embed", "proprio_hidden"


def _kernel_init():
    # torch's default Linear init (kaiming-uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class ProprioProjector(nn.Module):
    """proprio [B, P] (normalized state) -> [B, H] (one embedding per example, compute dtype).

    llm_dim: H. The input is cast to the compute dtype like every Linear here (upstream runs it under
    bf16 autocast in training and in bf16 at inference)."""

    llm_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_vjp: bool = True  # ExecutionConfig.dense_custom_vjp

    @nn.compact
    def __call__(self, proprio):
        kw = dict(kernel_init=_kernel_init(), dtype=self.dtype, param_dtype=self.param_dtype,
                  custom_vjp=self.custom_vjp)
        x = Linear((self.llm_dim,), (IN_AXIS, HIDDEN_AXIS), (HIDDEN_AXIS,), name="fc1", **kw)(proprio)
        x = nn.gelu(x, approximate=False)
        return Linear((self.llm_dim,), (EMBED_AXIS, HIDDEN_AXIS), (HIDDEN_AXIS,), name="fc2", **kw)(x)
