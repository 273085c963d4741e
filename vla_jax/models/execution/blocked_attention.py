"""Blocked causal self-attention with a hand-written backward (`ExecutionConfig.attention_query_block`).

Shapes: B batch, T sequence length, H query heads, KVH key/value heads (H % KVH == 0), G = H / KVH,
hd head dim.

`causal_attend` (the plain path, `vla_jax.models.attention`) scores every query row against every
key and masks the later ones. Here the rows are computed in blocks: rows [i, i + block) are scored
against keys [0, i + block) only. Keys after a row are masked anyway (their softmax weight is exactly
0 in fp32), so the blocks give the same values while skipping the masked part of the score and
probability work and keeping each block's [rows, keys] tensors small. The backward recomputes each
block's probabilities instead of storing them. Exists for XLA:CPU training speed (BENCHMARKS.md,
"blocked causal attention"); the KV-cache paths (prefill, decode) stay unblocked.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Query rows per block on the CPU backend when the config leaves the block size unset.
CPU_QUERY_BLOCK = 64


def query_block(configured: Optional[int]) -> int:
    """The block size to use: `configured` (0 = one block, i.e. the plain path), or when None
    CPU_QUERY_BLOCK on the CPU backend and one block elsewhere."""
    if configured is None:
        return CPU_QUERY_BLOCK if jax.default_backend() == "cpu" else 0
    return configured


def blocked_causal_attend(q, k, v, dtype, size: int):
    """q [B, T, H, hd], k/v [B, T, KVH, hd] -> [B, T, H, hd] in `dtype`, in blocks of `size` query rows
    (0 < size < T); the same values as the plain causal attention."""
    return _blocked_causal(q, k, v, size, jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------------
# FlashAttention's recipe in blocks of query rows: the forward keeps q, k, v, the output and each
# row's log-sum-exp of scores; the backward recomputes a block's probabilities from them
# (P = exp(S - lse)) and accumulates the key/value gradients of all blocks in place into one buffer.
# Why by hand: letting JAX differentiate the blocks (a checkpoint per block) sums each key/value
# gradient from its padded per-block pieces, with a layout transpose fused into every sum (slower on
# XLA:CPU; BENCHMARKS.md). Internally the heads are moved in front of the rows once
# ([B, KVH, G, T, hd]), so a block's keys are a contiguous slice.


def _head_major(q, k, v):
    """[B, T, H, hd], [B, T, KVH, hd] x2 -> q [B, KVH, G, T, hd], k/v [B, KVH, T, hd]."""
    B, T, H, hd = q.shape
    KVH = k.shape[2]
    return (q.reshape(B, T, KVH, H // KVH, hd).transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3),
            v.transpose(0, 2, 1, 3))


def _row_major(o):
    """[B, KVH, G, T, hd] -> [B, T, KVH * G, hd]."""
    B, KVH, G, T, hd = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, KVH * G, hd)


def _block_scores(qb, kb, start):
    """qb [B, KVH, G, R, hd] (rows start..start+R-1), kb [B, KVH, S, hd] (keys 0..S-1) ->
    scaled fp32 scores [B, KVH, G, R, S], keys after a row set to the fp32 minimum."""
    R, S = qb.shape[3], kb.shape[2]
    scores = jnp.einsum("bkgtd,bksd->bkgts", qb, kb, preferred_element_type=jnp.float32) * (qb.shape[-1] ** -0.5)
    mask = jnp.arange(S)[None, :] <= jnp.arange(start, start + R)[:, None]  # [R, S]
    return jnp.where(mask, scores, jnp.finfo(jnp.float32).min)


def _blocks(T, size):
    return [(start, min(T, start + size)) for start in range(0, T, size)]


def _blocked_forward(qh, kh, vh, size, dtype):
    """Head-major q/k/v -> (out [B, KVH, G, T, hd] in dtype, lse [B, KVH, G, T] fp32). The softmax is
    jax.nn.softmax's: exp(s - rowmax) / sum."""
    outs, lses = [], []
    for start, end in _blocks(qh.shape[3], size):
        s = _block_scores(qh[:, :, :, start:end], kh[:, :, :end], start)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        total = jnp.sum(e, axis=-1, keepdims=True)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", (e / total).astype(dtype), vh[:, :, :end]))
        lses.append((m + jnp.log(total))[..., 0])
    return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _blocked_causal(q, k, v, size, dtype):
    """q [B, T, H, hd], k/v [B, T, KVH, hd] -> [B, T, H, hd] in dtype, in blocks of `size` query rows."""
    out, _ = _blocked_forward(*_head_major(q, k, v), size, dtype)
    return _row_major(out)


def _blocked_causal_fwd(q, k, v, size, dtype):
    qh, kh, vh = _head_major(q, k, v)
    out, lse = _blocked_forward(qh, kh, vh, size, dtype)
    return _row_major(out), (qh, kh, vh, out, lse)


def _blocked_causal_bwd(size, dtype, residuals, d_out):
    qh, kh, vh, out, lse = residuals
    B, KVH, G, T, hd = qh.shape
    scale = hd ** -0.5
    do = d_out.reshape(B, T, KVH, G, hd).transpose(0, 2, 3, 1, 4)  # [B, KVH, G, T, hd]
    # dS = P * (dP - rowsum(dO * O)), the softmax backward with the row sum taken once for all blocks.
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, KVH, G, T]
    dq = []
    dk = jnp.zeros((B, KVH, T, hd), jnp.float32)
    dv = jnp.zeros((B, KVH, T, hd), jnp.float32)
    for start, end in _blocks(T, size):
        qb, dob = qh[:, :, :, start:end], do[:, :, :, start:end]
        p = jnp.exp(_block_scores(qb, kh[:, :, :end], start) - lse[:, :, :, start:end, None])
        dp = jnp.einsum("bkgtd,bksd->bkgts", dob, vh[:, :, :end], preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[:, :, :, start:end, None])).astype(dtype)
        dq.append(jnp.einsum("bkgts,bksd->bkgtd", ds, kh[:, :, :end], preferred_element_type=jnp.float32) * scale)
        # Summed over the G query heads that share a key/value head (grouped-query attention).
        dk = dk.at[:, :, :end].add(jnp.einsum("bkgts,bkgtd->bksd", ds, qb, preferred_element_type=jnp.float32)
                                   * scale)
        dv = dv.at[:, :, :end].add(jnp.einsum("bkgts,bkgtd->bksd", p.astype(dtype), dob,
                                              preferred_element_type=jnp.float32))
    dq = _row_major(jnp.concatenate(dq, axis=3))
    return (dq.astype(qh.dtype), dk.transpose(0, 2, 1, 3).astype(kh.dtype), dv.transpose(0, 2, 1, 3).astype(vh.dtype))


_blocked_causal.defvjp(_blocked_causal_fwd, _blocked_causal_bwd)
