"""OpenVLA's fused MLP projector: vision features -> LLM embedding space."""

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.models.dense import Linear


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
    custom_vjp: bool = True  # ExecutionConfig.dense_custom_vjp

    def _dense(self, features, in_axis, out_axis, name):
        return Linear((features,), (in_axis, out_axis), (out_axis,), kernel_init=nn.initializers.lecun_normal(),
                      dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
                      custom_vjp=self.custom_vjp, name=name)

    @nn.compact
    def __call__(self, x):
        x = self._dense(4 * self.vision_dim, "vision_in", "mlp", "fc1")(x)
        x = nn.gelu(x, approximate=False)
        x = self._dense(self.llm_dim, "mlp", "embed", "fc2")(x)
        x = nn.gelu(x, approximate=False)
        return self._dense(self.llm_dim, "mlp", "embed", "fc3")(x)
