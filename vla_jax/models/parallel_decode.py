"""OpenVLA-OFT inference: a whole action chunk from one jitted forward pass (no KV cache, no loop).

`build_inputs` appends the A = chunk_size * action_dim action slots and </s> right after each
row's prompt (OFT_REFERENCE.md §2: upstream's `_prepare_input_for_action_prediction`, generalised
from batch 1 to right-padded batches); `parallel_decode` runs `OpenVLA.parallel_logits` (argmax over
the full vocabulary, as upstream) or `OpenVLA.parallel_actions` (the L1 head). Static shapes: a
function jitted for one (batch, prompt length) bucket is reused by every call with that bucket.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.models.openvla import OpenVLA

# Upstream fills the slots with id 1 (`torch.ones`); the id never matters: the slot embeddings are zeroed.
PLACEHOLDER_ID = 1


def build_inputs(prompt_ids, lengths, num_slots: int, eos_id: int, pad_id: int):
    """prompt_ids int32 [B, L] right-padded `[BOS] prompt SPACE` rows with `lengths` [B] real tokens ->
    (input_ids [B, L + A + 1], attention_mask int32 [B, L + A + 1], action_mask bool [B, L + A + 1]):
    row b is prompt[:len_b], A placeholders, </s>, then pads. Works under jit (lengths may be traced)."""
    b, l = prompt_ids.shape
    n = l + num_slots + 1
    pos = jnp.arange(n, dtype=jnp.int32)[None, :]
    lengths = jnp.asarray(lengths, jnp.int32)[:, None]
    prompt = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), jnp.full((b, num_slots + 1), pad_id, jnp.int32)], 1)
    slots = (pos >= lengths) & (pos < lengths + num_slots)
    eos = pos == lengths + num_slots
    ids = jnp.where(pos < lengths, prompt, pad_id)
    ids = jnp.where(slots, PLACEHOLDER_ID, jnp.where(eos, eos_id, ids))
    return ids, (pos <= lengths + num_slots).astype(jnp.int32), slots


def _check_prompts(prompt_ids, lengths) -> None:
    shape = tuple(prompt_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"prompt ids must be [batch, length], got shape {shape}")
    if tuple(np.shape(lengths)) != shape[:1]:
        raise ValueError(f"lengths must be [batch={shape[0]}], got shape {tuple(np.shape(lengths))}")
    if not isinstance(lengths, jax.core.Tracer):
        lens = np.asarray(lengths)
        if lens.size and (lens.min() < 1 or lens.max() > shape[1]):
            raise ValueError(f"lengths must lie in [1, {shape[1]}] (real prompt tokens per row, BOS included), "
                             f"got {lens.tolist()}")


def parallel_decode(model: OpenVLA, params, pixel_values, prompt_ids, lengths, proprio=None):
    """One OFT forward pass for a batch of prompts.

    params: the stacked params tree (with params['action_head'] for action_head='l1', and
    params['proprio_projector'] for a model with proprio_dim).
    pixel_values uint8 [B, N, S, S, 3] (or [B, S, S, 3], one camera); proprio float32 [B, P] (normalized)
    exactly when the model has proprio_dim; prompt_ids int32 [B, L] right-padded `[BOS] prompt SPACE` rows
    (`VLATokenizer.inference_ids`; upstream appends 29871 when it is missing, here the caller's
    tokenizer does); lengths int32 [B]. Returns, per config.action_head:
      'tokens': int32 action-token ids [B, K, D] (argmax over the whole vocabulary, as upstream; decode
                with `ActionCodec.decode`, the 256-bin decode);
      'l1':     float32 normalized actions [B, K, D].
    """
    cfg = model.config
    if not cfg.parallel_decoding:
        raise ValueError(f"parallel_decode needs a model with parallel_decoding=True, got "
                         f"parallel_decoding={cfg.parallel_decoding} (autoregressive models use decode.greedy_decode)")
    _check_prompts(prompt_ids, lengths)
    ids, attn, slots = build_inputs(prompt_ids, lengths, cfg.num_action_slots, cfg.eos_token_id, cfg.pad_token_id)
    variables = {"params": params}
    b = ids.shape[0]
    if cfg.action_head == "l1":
        return model.apply(variables, pixel_values, ids, attn, slots, proprio=proprio, method=OpenVLA.parallel_actions)
    logits = model.apply(variables, pixel_values, ids, attn, slots, proprio=proprio, method=OpenVLA.parallel_logits)
    tokens = jnp.argmax(logits[:, :cfg.num_action_slots], axis=-1).astype(jnp.int32)
    return tokens.reshape(b, cfg.chunk_size, cfg.action_dim)


def make_parallel_decoder(model: OpenVLA):
    """-> `fn(params, pixel_values, prompt_ids, lengths, proprio=None)` -> [B, K, D] (see
    `parallel_decode`): the prompt shapes and lengths are checked on the host, then the jitted forward runs."""
    jitted = jax.jit(functools.partial(parallel_decode, model))

    def decode(params, pixel_values, prompt_ids, lengths, proprio=None):
        _check_prompts(prompt_ids, lengths)
        return jitted(params, pixel_values, prompt_ids, lengths, proprio)

    return decode
