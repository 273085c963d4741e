"""OpenVLA-OFT+'s FiLM: the task's language conditions every block of both vision towers.

OFT_REFERENCE.md §8. Each tower block (of DINOv2 and of SigLIP) gets its own pair of linears,
`scale` and `shift`, both Linear(H -> D_vit) with bias (H the LLM width, D_vit the tower width), applied
to one language vector per example:

    gamma = scale(lang), beta = shift(lang)                    [B, D_vit] each
    block:  x = x + ls1(attn(norm1(x)))
            x = x * (1 + gamma) + beta                         broadcast over every token
            x = x + ls2(mlp(norm2(x)))

`lang` [B, H] is the mean of the RAW token-embedding lookups (before the action slots are zeroed)
over the non-action positions of the text (BOS, prompt, 29871, </s>); `language_vector` computes it.
Pads: upstream's training batch averages over right-pad tokens too (its mask keeps them); here pads
are excluded everywhere (training and inference), so a padded training row sees the same vector it
would see alone at inference (batch 1 has no pads: identical to upstream there). With N cameras every
image gets the same gamma/beta.

Parameters live in params['film'] (not inside the towers, so the LoRA and trainable-parameter code
treats them like the other OFT modules: no adapters, trained in full):

    film/{dino,siglip}/blocks/{scale,shift}/{kernel [L-1, H, D_vit], bias [L-1, D_vit]}   blocks 0..L-2
    film/{dino,siglip}/last_block/{scale,shift}/{kernel [H, D_vit], bias [D_vit]}          block L-1

Only blocks 0..L-2 run (the towers' features come from block L-2, `vit.VisionTower`); the last
block's FiLM exists so that released checkpoints round-trip, and gets no gradient, like upstream's.
Kernels start as torch's default Linear init (upstream has no zero init: near-identity comes from
the 1 + gamma form); biases start at zero here (torch draws them uniformly: any small value works).
"""

from __future__ import annotations

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from vla_jax.models.config import OpenVLAConfig, ViTConfig

# Logical axis names (rules in vla_jax.sharding.LOGICAL_RULES): the LLM width (input side) and the
# tower width (output side) of each FiLM linear; the stacked blocks use 'layers' like the towers.
IN_AXIS, OUT_AXIS = "film_in", "film_out"
NAMES = ("scale", "shift")


def _kernel_init(stacked: bool):
    # torch's default Linear init (kaiming-uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
    if stacked:
        return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1,
                                                batch_axis=(0,))
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def language_vector(raw_embeddings, keep):
    """raw_embeddings [B, T, H] (the token-embedding lookups, action slots NOT zeroed), keep bool [B, T]
    (True at the positions to average: non-action, non-pad) -> float32 [B, H], the mean over them.
    A row with nothing to keep gives zeros (never NaN)."""
    keep = keep.astype(jnp.float32)[..., None]
    total = jnp.sum(raw_embeddings.astype(jnp.float32) * keep, axis=1)
    return total / jnp.maximum(jnp.sum(keep, axis=1), 1.0)


class _Linear(nn.Module):
    """One FiLM linear's params: kernel [(L,) H, D] and bias [(L,) D], stacked over L blocks when L > 0."""

    stacked: int
    width: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: int):
        lead = (self.stacked,) if self.stacked else ()
        names = (("layers",) if self.stacked else ()) + (IN_AXIS, OUT_AXIS)
        kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init(bool(self.stacked)), names),
                            lead + (h, self.width), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, names[:-2] + (OUT_AXIS,)),
                          lead + (self.width,), self.param_dtype)
        return kernel, bias


class _Pair(nn.Module):
    """`scale` and `shift` of one block (stacked=0) or of L stacked blocks."""

    stacked: int
    width: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: int):
        return tuple(_Linear(self.stacked, self.width, self.param_dtype, name=n)(h) for n in NAMES)


class TowerFiLM(nn.Module):
    """The FiLM linears of one tower: lang [B, H] -> (gamma, beta), each [L-1, B, D_vit] in the compute
    dtype (one row per block that runs, L = tower depth). At init it also creates the last block's pair."""

    tower: ViTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lang) -> Tuple[Any, Any]:
        h, d = lang.shape[-1], self.tower.width
        x = lang.astype(self.dtype)
        pairs = _Pair(self.tower.depth - 1, d, self.param_dtype, name="blocks")(h)
        if self.is_initializing():
            _Pair(0, d, self.param_dtype, name="last_block")(h)
        gamma, beta = (jnp.einsum("bh,lhd->lbd", x, k.astype(self.dtype)) + b.astype(self.dtype)[:, None]
                       for k, b in pairs)
        return gamma, beta


class FiLM(nn.Module):
    """Both towers' FiLM linears (params['film']['dino'], params['film']['siglip']).

    lang [B, H] -> {'dino': (gamma, beta), 'siglip': (gamma, beta)}, each [L_tower - 1, B, D_tower]."""

    config: OpenVLAConfig

    @nn.compact
    def __call__(self, lang):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        return {"dino": TowerFiLM(cfg.dino, name="dino", **kw)(lang),
                "siglip": TowerFiLM(cfg.siglip, name="siglip", **kw)(lang)}
