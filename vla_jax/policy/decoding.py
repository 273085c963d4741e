"""Pure helpers of the policy's decoding: the bucket sizes calls are padded to, and upstream's early-EOS ids.

Rows are padded to a batch bucket (a power of two by default) and prompts to a multiple of
`prompt_bucket` tokens, so each (action tokens, batch, prompt length) triple compiles once.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_PROMPT_BUCKET = 16


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest of the sorted `buckets` holding n (the largest when none does: callers chunk)."""
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


def upstream_eos_ids(prompt: Sequence[int], tokens, eos_id: int) -> np.ndarray:
    """The ids OpenVLA's `predict_action` decodes when EOS comes early: prompt ids [T] + greedy tokens int [n]
    -> int [n].

    Upstream runs `generate(max_new_tokens=n)`, which stops right after an EOS, and then decodes the
    last n ids of the whole sequence, so an EOS at step k (0-based) yields the last n-k-1 prompt ids,
    the k tokens before EOS and EOS itself (all but the action ids decode to the clipped extreme bin).
    vla_jax always decodes the n generated positions instead: every action dimension then comes
    from a token predicted for it, which is what training supervises. Greedy tokens before the EOS
    are the same either way, so this is a pure rearrangement of ids, used by `stop_at_eos=True`.
    """
    tokens = np.asarray(tokens)
    hits = np.flatnonzero(tokens == eos_id)
    if hits.size == 0:
        return tokens
    seq = np.concatenate([np.asarray(prompt, tokens.dtype), tokens[:hits[0] + 1]])
    return seq[-len(tokens):]
