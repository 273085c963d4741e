"""The Llama's scaled dot-product attention cores: grouped-query heads, fp32 scores and softmax.

Shapes: B batch, R query rows, S key slots, T sequence length, H query heads, KVH key/value heads
(H % KVH == 0; the query heads are grouped over them), hd head dim.

`attend` scores queries against keys under an explicit mask (the KV-cache paths: prefill, decode).
`causal_attend` is causal self-attention over a whole sequence (training, scoring): a [T, T] mask,
or, per `ExecutionConfig.attention_query_block`, the same values computed in blocks of query rows
(`execution.blocked_attention`, an XLA:CPU speed strategy).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from vla_jax.models.execution import blocked_attention


def attend(q, k, v, mask, dtype):
    """q [B, R, H, hd], k/v [B, S, KVH, hd], mask bool [B or 1, R, S] (True = may attend)
    -> [B, R, H, hd] in `dtype`. Scores are accumulated and softmaxed in fp32, scaled by hd^-0.5."""
    B, R, H, hd = q.shape
    KVH = k.shape[2]
    qg = q.reshape(B, R, KVH, H // KVH, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, R, H, hd)


def causal_attend(q, k, v, dtype, query_block: Optional[int] = None):
    """q [B, T, H, hd], k/v [B, T, KVH, hd] -> [B, T, H, hd]: row t attends to keys 0..t.

    query_block: `ExecutionConfig.attention_query_block` (None = the backend's default)."""
    T = q.shape[1]
    size = blocked_attention.query_block(query_block)
    if 0 < size < T:
        return blocked_attention.blocked_causal_attend(q, k, v, dtype, size)
    mask = jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]  # [1, T, T]
    return attend(q, k, v, mask, dtype)
