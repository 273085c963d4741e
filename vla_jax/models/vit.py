"""The two OpenVLA vision towers (DINOv2-reg ViT-L/14 and SigLIP So400m/14) as one timm-style ViT.

`VisionTower` returns what OpenVLA feeds its projector: the patch tokens after the second-to-last
block (block index depth-2), with no final norm and the prefix tokens (CLS + registers) dropped.
The last block, the final `norm` and SigLIP's MAP head (`attn_pool`) are never run in a normal
apply; their parameters are still created at init so that checkpoints round-trip losslessly.

The rename table between a timm `VisionTransformer` state_dict and these params is
`vla_jax.hf.keys_vit`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vla_jax.models.config import ViTConfig
from vla_jax.models.dense import Linear
from vla_jax.models.execution import ExecutionConfig, layer_stack

_ACT = ("act_batch", "act_len", "act_embed")
# timm uses trunc_normal_(std=.02) with cut-offs at +-2, i.e. 100 sigma: effectively a plain normal.
_NORMAL_02 = nn.initializers.normal(0.02)
# DINOv2's LayerScale init (timm init_values); pretrained weights overwrite it anyway.
_LAYER_SCALE_INIT = 1e-5


def _param(mod: nn.Module, name: str, init, shape: Sequence[int], names: Sequence[Any], dtype):
    return mod.param(name, nn.with_logical_partitioning(init, tuple(names)), tuple(shape), dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in fp32 (two-pass variance, like torch); result in the compute dtype.

    Params `scale` [D], `bias` [D].
    """

    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones, (d,), ("embed",), self.param_dtype)
        bias = _param(self, "bias", nn.initializers.zeros, (d,), ("embed",), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class LayerScale(nn.Module):
    """Per-channel gain on a residual branch (DINOv2): `x * scale`, scale [D]."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.constant(_LAYER_SCALE_INIT), (x.shape[-1],), ("embed",),
                       self.param_dtype)
        return x * scale.astype(self.dtype)


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2. [..., D] -> [..., D]."""

    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_vjp: bool = True  # ExecutionConfig.dense_custom_vjp

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp)
        h = Linear((self.hidden,), ("embed", "mlp"), ("mlp",), name="fc1", **kw)(x)
        # timm uses torch's exact GELU; flax's default is the tanh approximation.
        h = nn.gelu(h, approximate=False)
        return Linear((x.shape[-1],), ("mlp", "embed"), ("embed",), name="fc2", **kw)(h)


def _attend(q, k, v, dtype):
    """q [B,Lq,H,hd], k/v [B,Lk,H,hd] -> [B,Lq,H,hd]; logits scaled and softmaxed in fp32."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out. [B, L, D] -> [B, L, D]."""

    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    custom_vjp: bool = True  # ExecutionConfig.dense_custom_vjp

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, custom_vjp=self.custom_vjp)
        shape = (self.num_heads, d // self.num_heads)
        q, k, v = (Linear(shape, ("embed", "heads", "kv"), ("heads", "kv"), name=n, **kw)(x)
                   for n in ("query", "key", "value"))
        y = _attend(q, k, v, self.dtype)
        return Linear((d,), ("heads", "kv", "embed"), ("embed",), n_in=2, name="out", **kw)(y)


class Block(nn.Module):
    """Pre-norm ViT block: `x += ls1(attn(norm1(x)))`, `x += ls2(mlp(norm2(x)))`. [B, L, D] -> [B, L, D].

    `film`: None, or OFT+'s FiLM for this block, (gamma, beta) each [B, D] (`vla_jax.models.film`):
    then `x = x * (1 + gamma) + beta` (broadcast over the tokens) between the attention and the MLP.
    Returns `(x, None)` so that it can be the body of `nn.scan`.
    """

    config: ViTConfig
    execution: ExecutionConfig = ExecutionConfig()

    @nn.compact
    def __call__(self, x, film=None):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        lin = dict(kw, custom_vjp=self.execution.dense_custom_vjp)
        x = nn.with_logical_constraint(x, _ACT)
        y = Attention(cfg.num_heads, name="attn", **lin)(LayerNorm(cfg.ln_eps, name="norm1", **kw)(x))
        if cfg.layer_scale:
            y = LayerScale(name="ls1", **kw)(y)
        x = x + y
        if film is not None:
            gamma, beta = film
            x = x * (1 + gamma[:, None, :].astype(x.dtype)) + beta[:, None, :].astype(x.dtype)
        y = Mlp(cfg.mlp_dim, name="mlp", **lin)(LayerNorm(cfg.ln_eps, name="norm2", **kw)(x))
        if cfg.layer_scale:
            y = LayerScale(name="ls2", **kw)(y)
        return nn.with_logical_constraint(x + y, _ACT), None


class MAPHead(nn.Module):
    """timm's `AttentionPoolLatent` (SigLIP's unused head): one latent query attends over the tokens.

    [B, L, D] -> [B, D]. Parameters keep timm's flat layout (q [D, D], kv [D, 2D]).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        b, n, d = x.shape
        h, hd = cfg.num_heads, cfg.head_dim
        latent = _param(self, "latent", _NORMAL_02, (1, 1, d), (None, None, "embed"), kw["param_dtype"])
        q = Linear((d,), ("embed", None), (None,), name="q", **kw)(latent.astype(kw["dtype"]))
        kv = Linear((2 * d,), ("embed", None), (None,), name="kv", **kw)(x)
        kv = kv.reshape(b, n, 2, h, hd)
        y = _attend(jnp.broadcast_to(q.reshape(1, 1, h, hd), (b, 1, h, hd)), kv[:, :, 0], kv[:, :, 1], kw["dtype"])
        y = Linear((d,), ("embed", None), (None,), name="proj", **kw)(y.reshape(b, 1, d))
        y = y + Mlp(cfg.mlp_dim, name="mlp", **kw)(LayerNorm(cfg.ln_eps, name="norm", **kw)(y))
        return y[:, 0]


class VisionTower(nn.Module):
    """timm-style ViT returning OpenVLA's features: the output of block depth-2, prefix tokens dropped.

    `pixels`: [B, H, W, 3] float, already normalized with the tower's mean/std, H == W == image_size.
    `film` (OFT+, optional): (gamma, beta) each [depth-1, B, width], one row per block that runs.
    Returns [B, num_patches, width] in the compute dtype. Blocks 0..depth-2 are stacked (`blocks`,
    leading 'layers' axis; scanned, or unrolled per `execution.unroll_layers`); `last_block`, `norm`
    and `attn_pool` exist only as parameters.
    """

    config: ViTConfig
    execution: ExecutionConfig = ExecutionConfig()

    @nn.compact
    def __call__(self, pixels, film=None):
        """film: None, or (gamma, beta) each [depth-1, B, width]: OFT+'s FiLM of blocks 0..depth-2."""
        cfg = self.config
        if cfg.depth < 2:
            raise ValueError(f"ViTConfig.depth must be >= 2 (features come from block depth-2), got {cfg.depth}")
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"pixels must have shape [B, {cfg.image_size}, {cfg.image_size}, 3], "
                             f"got {tuple(pixels.shape)}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        b, d, p, g = pixels.shape[0], cfg.width, cfg.patch_size, cfg.grid

        # Conv with kernel == stride == patch, written as a matmul over row-major patches
        # (token index = row * grid + col, as timm's flatten(2)). Pixels past grid * patch are
        # dropped, as a strided conv would.
        x = pixels[:, :g * p, :g * p].astype(dtype).reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        x = Linear((d,), (None, None, None, "embed"), ("embed",), n_in=3, dtype=dtype, param_dtype=pdtype,
                   custom_vjp=self.execution.dense_custom_vjp, name="patch_embed")(x).reshape(b, g * g, d)

        prefix = []
        if cfg.class_token:
            prefix.append(_param(self, "cls_token", nn.initializers.normal(1e-6), (1, 1, d), (None, None, "embed"),
                                 pdtype))
        if cfg.num_registers:
            prefix.append(_param(self, "reg_token", nn.initializers.normal(1e-6), (1, cfg.num_registers, d),
                                 (None, None, "embed"), pdtype))
        n_pos = cfg.num_patches + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
        pos = _param(self, "pos_embed", _NORMAL_02, (1, n_pos, d), (None, None, "embed"), pdtype).astype(dtype)
        prefix = [jnp.broadcast_to(t.astype(dtype), (b,) + t.shape[1:]) for t in prefix]
        if cfg.no_embed_class:  # DINOv2: positions for patches only, prefix tokens get none
            x = jnp.concatenate(prefix + [x + pos], axis=1)
        else:
            x = jnp.concatenate(prefix + [x], axis=1) + pos
        x = nn.with_logical_constraint(x, _ACT)

        if layer_stack.unroll(self.execution.unroll_layers) and not self.is_initializing():
            # The same stacked params as an unrolled loop (layer_stack): the same values as the scan.
            x = layer_stack.run_unrolled(Block(cfg, self.execution, parent=None), self.variables["params"]["blocks"],
                                         x, remat=cfg.remat, xs=film)
        else:
            block = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth - 1,
                           metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.execution, name="blocks")(x, film)
        feats = x[:, cfg.num_prefix_tokens:]

        if self.is_initializing():
            # Create the parameters OpenVLA never runs (checkpoint round trips need them).
            y, _ = Block(cfg, self.execution, name="last_block")(x)
            y = LayerNorm(cfg.ln_eps, dtype=dtype, param_dtype=pdtype, name="norm")(y)
            if cfg.map_head:
                MAPHead(cfg, name="attn_pool")(y)  # timm pools the whole normed sequence
        return feats
