"""OpenVLA's fused MLP projector: vision features -> LLM embedding space."""

import flax.linen as nn
import jax.numpy as jnp


class FusedProjector(nn.Module):
    """fc1 (vision_dim -> 4*vision_dim) -> GELU -> fc2 (-> llm_dim) -> GELU -> fc3 (-> llm_dim).

    Three Linear layers with biases and exact (erf) GELUs, as `prismatic/util/nn_utils.py`
    `FusedMLPProjector` (the paper calls it a 2-layer MLP; the code has three).
    Input `[B, N, vision_dim]` (DINOv2 and SigLIP patch features concatenated on channels),
    output `[B, N, llm_dim]`.
    """

    vision_dim: int
    llm_dim: int
    dtype: str = "bfloat16"
    param_dtype: str = "float32"

    def _dense(self, features, in_axis, out_axis, name):
        return nn.Dense(
            features, use_bias=True, dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), (in_axis, out_axis)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (out_axis,)), name=name)

    @nn.compact
    def __call__(self, x):
        x = self._dense(4 * self.vision_dim, "vision_in", "mlp", "fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = self._dense(self.llm_dim, "mlp", "embed", "fc2")(x)
        x = nn.gelu(x, approximate=False)
        return self._dense(self.llm_dim, "mlp", "embed", "fc3")(x)
