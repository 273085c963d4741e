"""OpenVLA-OFT's parallel decoding: one bidirectional forward pass over zeroed action slots.

The sequence (OFT_REFERENCE.md §2), per row, right-padded to a common length T of text tokens:

    text:   [BOS] [prompt ... SPACE] [a_0 ... a_{A-1}] [</s>] [pad ...]
    fused:  [BOS] [I inserted] [prompt ... SPACE] [A action slots] [</s>] [pad ...]

I = `OpenVLAConfig.num_inserted_tokens`: the patches of each of the N camera images, in camera order,
then the proprio token when the model has one (§7).

A = chunk_size * action_dim. The input embeddings at the A action slots are zeros (whatever ids sit
there: ground-truth action ids in training, placeholders at inference), so the slots differ only
through their RoPE positions, which run arange over the fused sequence. Attention is fully
bidirectional over every non-pad token, pads masked as keys (the OFT transformers fork's SDPA path;
a causal mask does not reproduce the released checkpoints, §3). One forward pass, no KV cache.

Readout (§4), shifted by -1 as in a causal LM: the final post-norm hidden states at the positions
just before each slot, i.e. at [SPACE, a_0, ..., a_{A-2}]; state k is the input of action value k.
With `num_readout = A + 1` the state of a_{A-1} (which predicts </s>) is appended: the discrete
head's training targets are the A action tokens plus </s>.

`action_mask` marks the slots: in training it comes from the labels (`action_mask_from_labels`),
at inference `parallel_decode.build_inputs` places them after each prompt.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.models.config import OpenVLAConfig
from vla_jax.models.film import language_vector


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def action_mask_from_labels(labels, base_vocab_size: int = 32000, n_bins: int = 256):
    """labels int [B, T] (-100 = unsupervised) -> bool [B, T], True at action-token labels.

    Upstream counts any label id > ACTION_TOKEN_BEGIN_IDX (31743) as an action token; with the
    256 action ids being the last ids of the base vocabulary that is [base - n_bins, base), and </s>
    (id 2) is not one."""
    labels = jnp.asarray(labels)
    return (labels >= base_vocab_size - n_bins) & (labels < base_vocab_size)


def check_parallel_inputs(config: OpenVLAConfig, input_ids, attention_mask, action_mask) -> None:
    """Raises ValueError unless the three [B, T] arrays form OFT parallel-decoding rows.

    Shapes are always checked; on concrete (non-traced) arrays also, per row: the attention mask is a
    prefix of ones (right padding), exactly A = chunk_size * action_dim action slots, contiguous,
    after at least one prompt token, inside the attention mask, and followed by the </s> id.
    """
    ids_shape = tuple(input_ids.shape)
    for name, x in (("attention_mask", attention_mask), ("action_mask", action_mask)):
        if tuple(x.shape) != ids_shape:
            raise ValueError(f"{name} must have the shape of input_ids {ids_shape}, got {tuple(x.shape)}")
    if not all(_is_concrete(x) for x in (input_ids, attention_mask, action_mask)):
        return
    ids, attn, act = np.asarray(input_ids), np.asarray(attention_mask).astype(bool), np.asarray(action_mask).astype(bool)
    a = config.num_action_slots
    lengths = attn.sum(axis=1)
    for b in range(ids.shape[0]):
        if not attn[b, :lengths[b]].all():
            raise ValueError(f"attention_mask row {b} is not right-padded (ones, then zeros): {attn[b].astype(int).tolist()}")
        slots = np.flatnonzero(act[b])
        if slots.size != a:
            raise ValueError(f"row {b} has {slots.size} action slots; this model predicts chunk_size "
                             f"{config.chunk_size} x action_dim {config.action_dim} = {a}")
        start = int(slots[0])
        if not np.array_equal(slots, np.arange(start, start + a)):
            raise ValueError(f"row {b}: the action slots must be contiguous, got positions {slots.tolist()}")
        if start < 1:
            raise ValueError(f"row {b}: the action slots start at position 0; a prompt (at least BOS) must precede them")
        if start + a >= lengths[b] or ids[b, start + a] != config.eos_token_id:
            got = int(ids[b, start + a]) if start + a < ids.shape[1] else "nothing"
            raise ValueError(f"row {b}: the action slots must be followed by </s> (id {config.eos_token_id}) "
                             f"inside the attention mask, got {got} at position {start + a} (length {int(lengths[b])})")


def readout_positions(action_mask, num_inserted: int, num_readout: int):
    """action_mask bool [B, T] (A contiguous slots per row) -> int32 [B, num_readout] indices into the
    fused sequence: the position before each slot (and, past A, the slots themselves: index A is the
    last slot, the input of </s>). Text index t sits at fused index t + I for t >= 1, I = num_inserted
    (`OpenVLAConfig.num_inserted_tokens`)."""
    first = jnp.argmax(action_mask.astype(jnp.int32), axis=1).astype(jnp.int32)  # [B]
    return first[:, None] + num_inserted - 1 + jnp.arange(num_readout, dtype=jnp.int32)[None, :]


def forward_hidden(model, pixel_values, input_ids, attention_mask, action_mask, num_readout: Optional[int] = None,
                   proprio=None):
    """The parallel forward inside a bound `OpenVLA` (called from its methods).

    pixel_values uint8 [B, N, S, S, 3] (or [B, S, S, 3], one camera); input_ids int32 [B, T];
    attention_mask [B, T] (1 = real token, 0 = pad); action_mask bool [B, T] (the A slots); proprio
    float32 [B, P] for a model with a proprio token. Returns float hidden states [B, R, H] after the
    final RMSNorm at the readout positions, R = num_readout (default A). The image/id/proprio checks
    of `openvla.check_inputs` are the caller's.
    """
    cfg = model.config
    a = cfg.num_action_slots
    r = a if num_readout is None else int(num_readout)
    if r not in (a, a + 1):
        raise ValueError(f"num_readout must be A={a} (the action values) or A+1={a + 1} (with </s>), got {r}")
    check_parallel_inputs(cfg, input_ids, attention_mask, action_mask)
    action_mask = jnp.asarray(action_mask).astype(bool)
    text = model.llm.embed(input_ids)
    keys = jnp.asarray(attention_mask).astype(bool)
    # OFT+'s FiLM: the mean of the raw embeddings (before the zeroing) over the non-action, non-pad
    # positions (BOS, prompt, 29871, </s>; vla_jax.models.film on pads).
    lang = language_vector(text, keys & ~action_mask) if cfg.film else None
    # Zero, not multiply: the same zeros for finite embeddings, and no NaN from a non-finite row.
    text = jnp.where(action_mask[..., None], jnp.zeros((), text.dtype), text)
    inserted = model.inserted_embeddings(pixel_values, proprio, lang).astype(text.dtype)
    x = jnp.concatenate([text[:, :1], inserted, text[:, 1:]], axis=1)
    b, n = x.shape[:2]
    key_mask = jnp.concatenate([keys[:, :1], jnp.ones((b, cfg.num_inserted_tokens), bool), keys[:, 1:]], axis=1)
    positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
    # Only the R readout states are used (here and in training), so the last layer computes its
    # queries, attention output and MLP at those rows only (keys/values still for every token), as
    # the autoregressive prefill does; the work saved is counted in BENCHMARKS.md (OFT section).
    idx = readout_positions(action_mask, cfg.num_inserted_tokens, r)
    hidden, _ = model.llm(x, positions, None, key_mask, last_layer_rows=idx)
    return hidden
