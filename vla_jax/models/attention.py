"""The Llama's scaled dot-product attention cores: grouped-query heads, fp32 scores and softmax.

Shapes: B batch, R query rows, S key slots, T sequence length, H query heads, KVH key/value heads
(H % KVH == 0; the query heads are grouped over them), hd head dim.

`attend` scores queries against keys under an explicit mask (the KV-cache paths: prefill, decode).
`causal_attend` is plain causal self-attention over a whole sequence (training, scoring); it
computes the scores in blocks of query rows, each block against only the keys up to its last row.
Keys after a row are masked anyway (their softmax weight is exactly 0 in fp32), so the blocks give
the same values while skipping about 40% of the score/probability work (5 blocks of 64 at 320
tokens) and keeping each block's [rows, keys] tensors small; the backward recomputes each block's
probabilities instead of storing them. On XLA:CPU the blocks made the 'mid' train step 4-9% faster
(medians of 12 alternating steps in one process, three runs: 3297 -> 2992, 3462 -> 3332,
3509 -> 3316 ms), the recomputation another ~5% (3056 -> 2910, 3125 -> 2985 ms), and the
hand-written backward of `_blocked_causal` another ~3% (BENCHMARKS.md).
The same blocking of a prefill (forward only) measured no gain on CPU (batch 8: 882 vs 922 ms), so
the cache paths stay unblocked. On accelerators it is off unless configured: not measured there.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

# Query rows per block of `causal_attend` on the CPU backend when the config leaves it unset.
CPU_QUERY_BLOCK = 64


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


def query_block(configured: Optional[int]) -> int:
    """The block size `causal_attend` uses: `configured` (0 = one block), or when None
    CPU_QUERY_BLOCK on the CPU backend and one block elsewhere."""
    if configured is None:
        return CPU_QUERY_BLOCK if jax.default_backend() == "cpu" else 0
    if configured < 0:
        raise ValueError(f"LlamaConfig.attention_query_block={configured}: expected None (automatic), 0 (one "
                         f"block) or a positive number of query rows")
    return configured


def causal_attend(q, k, v, dtype, block: Optional[int] = None):
    """q [B, T, H, hd], k/v [B, T, KVH, hd] -> [B, T, H, hd]: row t attends to keys 0..t.

    block: query rows per block (see `query_block`); rows [i, i + block) are scored against keys
    [0, i + block) only, and the backward recomputes their probabilities (`_blocked_causal`)."""
    T = q.shape[1]
    size = query_block(block)
    if size == 0 or size >= T:
        mask = jnp.arange(T)[None, None, :] <= jnp.arange(T)[None, :, None]  # [1, T, T]
        return attend(q, k, v, mask, dtype)
    return _blocked_causal(q, k, v, size, jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------------
# Blocked causal attention with a hand-written backward, FlashAttention's recipe in blocks of query
# rows: the forward keeps q, k, v, the output and each row's log-sum-exp of scores; the backward
# recomputes a block's probabilities from them (P = exp(S - lse)) and accumulates the key/value
# gradients of all blocks in place into one buffer. Letting JAX differentiate the blocks instead
# (a checkpoint per block) summed each key/value gradient from its padded per-block pieces with a
# layout transpose fused in (12-21 ms per sum on the 'mid' step, two per layer). Internally the heads
# are moved in front of the rows once ([B, KVH, G, T, hd]), so a block's keys are a contiguous slice.
# Measured on the 'mid' train step (median of per-round ratios, 16 alternating steps in one process,
# an experimental copy of this algorithm): 0.967x the time of the checkpointed blocks (BENCHMARKS.md).


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
