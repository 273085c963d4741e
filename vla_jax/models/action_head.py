"""OpenVLA-OFT's continuous action head: an MLPResNet that regresses a chunk of normalized actions.

Layout (OFT_REFERENCE.md §6b, upstream `L1RegressionActionHead` wrapping `MLPResNet(num_blocks=2)`):

    x [B, K, D * H]                 the D readout hidden states of chunk step k, concatenated
    -> LayerNorm(D * H) -> Linear(D * H -> W) -> ReLU
    -> num_blocks x [x + ReLU(Linear(W -> W)(LayerNorm(x)))]      (pre-norm residual blocks)
    -> LayerNorm(W) -> Linear(W -> D)
    -> [B, K, D]

H is the LLM width, W the head width (= H upstream: 4096 at 7B, 151.12M parameters for D = 7),
D the action dimension. LayerNorms use torch's defaults (eps 1e-5, weight 1, bias 0); every Linear
has a bias. Upstream runs the head in bf16; here it runs in the module's compute dtype (fp32 params).
Submodule names follow upstream's state dict (`layer_norm1`, `fc1`, `mlp_resnet_blocks_{i}` with
`layer_norm` / `fc` = `ffn.0` / `ffn.1`, `layer_norm2`, `fc2`) so a key table maps them one to one.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.models.dense import Linear

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which upstream uses

# Logical axis names (rules in vla_jax.sharding.LOGICAL_RULES): the concatenated D * H input, the head
# width on a matrix's input side and on its output side, and the D outputs.
IN_AXIS, EMBED_AXIS, HIDDEN_AXIS, OUT_AXIS = "action_in", "action_embed", "action_hidden", "action_out"


def _layer_norm(axis: str, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis,)))


def _kernel_init():
    # torch's default Linear init (kaiming-uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class MLPResNetBlock(nn.Module):
    """x [..., W] -> x + ReLU(Linear(LayerNorm(x))) [..., W]."""

    width: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _layer_norm(EMBED_AXIS, self.dtype, self.param_dtype, "layer_norm")(x)
        h = Linear((self.width,), (EMBED_AXIS, HIDDEN_AXIS), (HIDDEN_AXIS,), kernel_init=_kernel_init(),
                   dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(h)
        return x + nn.relu(h)


class L1ActionHead(nn.Module):
    """hidden [B, K * D, H] (the readout states, chunk-major) -> normalized actions [B, K, D] float32.

    action_dim: D; width: W (the LLM width upstream); num_blocks: residual blocks (2 upstream).
    """

    action_dim: int
    width: int
    num_blocks: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden):
        b, n, h = hidden.shape
        d = self.action_dim
        if n % d:
            raise ValueError(f"L1ActionHead: {n} readout states do not split into chunk steps of action_dim={d} "
                             f"(hidden shape {hidden.shape})")
        # Row-major: chunk step k reads the states of slots k*D .. k*D + D - 1, concatenated.
        x = hidden.reshape(b, n // d, d * h)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _layer_norm(IN_AXIS, name="layer_norm1", **kw)(x)
        x = Linear((self.width,), (IN_AXIS, HIDDEN_AXIS), (HIDDEN_AXIS,), kernel_init=_kernel_init(), name="fc1",
                   **kw)(x)
        x = nn.relu(x)
        for i in range(self.num_blocks):
            x = MLPResNetBlock(self.width, name=f"mlp_resnet_blocks_{i}", **kw)(x)
        x = _layer_norm(EMBED_AXIS, name="layer_norm2", **kw)(x)
        x = Linear((d,), (EMBED_AXIS, OUT_AXIS), (OUT_AXIS,), kernel_init=_kernel_init(), name="fc2", **kw)(x)
        return x.astype(jnp.float32)
