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
3509 -> 3316 ms) and the recomputation another ~5% (3056 -> 2910, 3125 -> 2985 ms; BENCHMARKS.md).
The same blocking of a prefill (forward only) measured no gain on CPU (batch 8: 882 vs 922 ms), so
the cache paths stay unblocked. On accelerators it is off unless configured: not measured there.
"""

from __future__ import annotations

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
    [0, i + block) only, and their probabilities are recomputed in the backward, not stored."""
    T = q.shape[1]
    size = query_block(block)
    one_block = size == 0 or size >= T
    # Blocks keep only q/k/v for the backward and recompute their scores and probabilities there, as
    # FlashAttention does: the layer scan would otherwise stack every block's fp32 probabilities into
    # zero-filled [L, ...] buffers (measured on the mid step: 2910 vs 3056 and 2985 vs 3125 ms).
    # prevent_cse=False: the Llama's layers always run inside nn.scan, which already blocks CSE.
    block_fn = attend if one_block else jax.checkpoint(attend, static_argnums=(4,), prevent_cse=False)
    size = T if one_block else size
    outs = []
    for start in range(0, T, size):
        end = min(T, start + size)
        mask = jnp.arange(end)[None, None, :] <= jnp.arange(start, end)[None, :, None]  # [1, rows, end]
        outs.append(block_fn(q[:, start:end], k[:, :end], v[:, :end], mask, dtype))
    return outs[0] if one_block else jnp.concatenate(outs, axis=1)
