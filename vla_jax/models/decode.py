"""Greedy action decoding: one jitted prefill into a static KV cache, then a fixed-length loop.

No Python loop per token and static shapes throughout, so a decoder compiled for one
(batch, prompt length) bucket is reused by every later call with that bucket.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from vla_jax.models.llama import init_cache
from vla_jax.models.openvla import OpenVLA


def greedy_decode(model: OpenVLA, params, pixel_values, input_ids, lengths, num_tokens: int,
                  allowed_range: Optional[Tuple[int, int]] = None):
    """Greedy decoding of `num_tokens` new tokens.

    pixel_values: uint8 `[B, S, S, 3]`; input_ids: int32 `[B, T]` right-padded prompts (ending with
    29871 for OpenVLA); lengths: int32 `[B]` real tokens per row. allowed_range: optional inclusive
    (lo, hi) id range the argmax is restricted to (e.g. the 256 action ids); None = the whole
    vocabulary, as OpenVLA's `generate` does. Returns int32 tokens `[B, num_tokens]`.
    """
    cfg = model.config
    b, t = input_ids.shape
    cache = init_cache(cfg.llama, b, t + cfg.num_patches + num_tokens, jnp.dtype(cfg.llama.dtype))
    variables = {"params": params}

    def pick(logits):
        if allowed_range is not None:
            ids = jnp.arange(logits.shape[-1])
            logits = jnp.where((ids >= allowed_range[0]) & (ids <= allowed_range[1]), logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    logits, cache = model.apply(variables, pixel_values, input_ids, lengths, cache, method=OpenVLA.prefill)
    first = pick(logits)
    tokens = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first)
    start = lengths.astype(jnp.int32) + cfg.num_patches  # position of the first generated token

    def body(i, carry):
        tokens, cache = carry
        logits, cache = model.apply(variables, tokens[:, i - 1], start + i - 1, cache, method=OpenVLA.decode_step)
        return tokens.at[:, i].set(pick(logits)), cache

    tokens, _ = jax.lax.fori_loop(1, num_tokens, body, (tokens, cache))
    return tokens


def make_greedy_decoder(model: OpenVLA, num_tokens: int, allowed_range: Optional[Tuple[int, int]] = None):
    """-> jitted `fn(params, pixel_values, input_ids, lengths) -> tokens [B, num_tokens]`."""
    return jax.jit(functools.partial(greedy_decode, model, num_tokens=num_tokens, allowed_range=allowed_range))
