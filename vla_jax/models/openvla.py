"""The composed OpenVLA model: [DINOv2, SigLIP] patch features -> fused projector -> Llama-2.

Sequence layout (OPENVLA_REFERENCE.md §1.5): the P image-patch embeddings are inserted right
after BOS, `[BOS, patch_1..patch_P, text_1..]`, positions run 0..T+P-1 continuously and the
attention is plain causal over the whole sequence, patches included.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.models import parallel
from vla_jax.models.action_head import L1ActionHead
from vla_jax.models.config import OpenVLAConfig
from vla_jax.models.llama import Llama
from vla_jax.models.projector import FusedProjector
from vla_jax.models.vit import VisionTower


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_inputs(config: OpenVLAConfig, pixel_values, input_ids, max_text_len: Optional[int] = None) -> None:
    """Validates model inputs; raises ValueError naming the expected and the given value.

    pixel_values: uint8 (or float in [0, 255]) `[B, S, S, 3]` with S = config.image_size.
    input_ids: int `[B, T]` with ids in [0, vocab_size) and T + num_patches <= max_seq_len.
    Shape checks always run; value checks run only on concrete (non-traced) arrays.
    """
    s = config.image_size
    shape = tuple(pixel_values.shape)
    if len(shape) != 4:
        raise ValueError(f"pixel_values must be [batch, {s}, {s}, 3], got shape {shape}")
    if shape[3] != 3:
        raise ValueError(f"pixel_values must have 3 (RGB) channels in the last axis, got {shape[3]} "
                         f"(shape {shape}; channels-first input must be transposed to [B, H, W, 3])")
    if shape[1:3] != (s, s):
        raise ValueError(f"pixel_values must be {s}x{s} images (the model's image_size), got {shape[1]}x{shape[2]}; "
                         f"resize with vla_jax.data.transforms first")
    ids_shape = tuple(input_ids.shape)
    if len(ids_shape) != 2 or ids_shape[0] != shape[0]:
        raise ValueError(f"input_ids must be [batch={shape[0]}, length], got shape {ids_shape}")
    max_len = config.llama.max_seq_len - config.num_patches if max_text_len is None else max_text_len
    if ids_shape[1] > max_len:
        raise ValueError(f"input_ids has {ids_shape[1]} tokens but the configured maximum is {max_len} text tokens "
                         f"(max_seq_len {config.llama.max_seq_len} minus {config.num_patches} image patches)")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if _is_concrete(pixel_values) and not jnp.issubdtype(pixel_values.dtype, jnp.integer):
        lo, hi = float(np.min(pixel_values)), float(np.max(pixel_values))
        if lo < 0.0 or hi > 255.0 or not np.isfinite(lo + hi):
            raise ValueError(f"float pixel_values must lie in [0, 255] (raw RGB, normalization happens in the model), "
                             f"got values in [{lo}, {hi}]")
    if _is_concrete(input_ids) and ids_shape[1] > 0:
        lo, hi = int(np.min(input_ids)), int(np.max(input_ids))
        if lo < 0 or hi >= config.llama.vocab_size:
            raise ValueError(f"token ids must lie in [0, {config.llama.vocab_size}), got ids in [{lo}, {hi}]")


class OpenVLA(nn.Module):
    """OpenVLA: uint8 RGB images + token ids -> next-token logits over the 32064-row vocabulary."""

    config: OpenVLAConfig

    def setup(self):
        cfg = self.config
        self.dino = VisionTower(cfg.dino, cfg.execution)
        self.siglip = VisionTower(cfg.siglip, cfg.execution)
        self.projector = FusedProjector(vision_dim=cfg.vision_dim, llm_dim=cfg.llama.hidden_size,
                                        dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                        custom_vjp=cfg.execution.dense_custom_vjp)
        self.llm = Llama(cfg.llama, cfg.execution)
        if cfg.action_head == "l1":  # OpenVLA-OFT's continuous head, params['action_head']
            self.action_head = L1ActionHead(action_dim=cfg.action_dim, width=cfg.llama.hidden_size,
                                            dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def encode_image(self, pixel_values):
        """uint8 `[B, S, S, 3]` -> projected patch embeddings `[B, P, D_llm]`.

        Each tower normalizes with its own mean/std (ImageNet for DINOv2, 0.5/0.5 for SigLIP);
        the features are concatenated on channels in the order [DINOv2, SigLIP].
        """
        x = pixel_values.astype(jnp.float32) / 255.0

        def normalized(tower_cfg):
            mean = jnp.asarray(tower_cfg.mean, jnp.float32)
            std = jnp.asarray(tower_cfg.std, jnp.float32)
            return (x - mean) / std

        feats = jnp.concatenate([self.dino(normalized(self.config.dino)),
                                 self.siglip(normalized(self.config.siglip))], axis=-1)
        return self.projector(feats)

    def embed_inputs(self, pixel_values, input_ids):
        """-> fused embeddings `[B, T + P, D]`: BOS, then the P patches, then the rest of the text."""
        check_inputs(self.config, pixel_values, input_ids)
        text = self.llm.embed(input_ids)
        patches = self.encode_image(pixel_values).astype(text.dtype)
        return jnp.concatenate([text[:, :1], patches, text[:, 1:]], axis=1)

    def __call__(self, pixel_values, input_ids, logit_positions=None):
        """Training / scoring forward.

        pixel_values: uint8 `[B, S, S, 3]`; input_ids: int32 `[B, T]` (right-padded).
        logit_positions: optional int32 `[B, K]` indices into the fused sequence (length T + P);
        the lm_head is applied only there (the loss needs ~8 positions, not ~290).
        Returns float32 logits `[B, K, V]`, or `[B, T + P, V]` when logit_positions is None.
        This is the causal (autoregressive) forward; `model.init` runs it, and for an action_head='l1'
        config it then also creates params['action_head']. Parallel-decoding (OFT) models run
        `parallel_logits` / `parallel_actions` instead.
        """
        self._refuse_if_parallel("__call__")
        if self.is_initializing() and self.config.action_head == "l1":
            cfg = self.config
            self.action_head(jnp.zeros((1, cfg.num_action_slots, cfg.llama.hidden_size), jnp.float32))
        x = self.embed_inputs(pixel_values, input_ids)
        b, n = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        hidden, _ = self.llm(x, positions, None)
        if logit_positions is not None:
            hidden = jnp.take_along_axis(hidden, logit_positions[..., None].astype(jnp.int32), axis=1)
        return self.llm.logits(hidden)

    # ------------------------------------------------------------------------------------------
    # OpenVLA-OFT parallel decoding (vla_jax.models.parallel, OFT_REFERENCE.md §2-§4)

    def _refuse_if_parallel(self, what: str):
        if self.config.parallel_decoding and not self.is_initializing():
            raise ValueError(f"OpenVLA.{what} is the causal, autoregressive forward, but this model has "
                             f"parallel_decoding=True (OpenVLA-OFT); use OpenVLA.parallel_logits / parallel_actions "
                             f"or vla_jax.models.parallel_decode")

    def _refuse_unless_parallel(self, what: str, head: Optional[str] = None):
        cfg = self.config
        if not cfg.parallel_decoding or (head is not None and cfg.action_head != head):
            raise ValueError(f"OpenVLA.{what} needs parallel_decoding=True" + (f" and action_head={head!r}" if head else "")
                             + f"; this model has parallel_decoding={cfg.parallel_decoding}, "
                             f"action_head={cfg.action_head!r}")

    def parallel_hidden(self, pixel_values, input_ids, attention_mask, action_mask, num_readout=None):
        """One bidirectional forward over zeroed action slots -> post-norm hidden states [B, R, H] at
        the readout positions [SPACE, a_0 .. a_{A-2}] (R = A = chunk_size * action_dim), plus a_{A-1}
        when num_readout = A + 1.

        pixel_values uint8 [B, S, S, 3]; input_ids int32 [B, T] right-padded rows
        `[BOS] prompt SPACE [A slots] </s> [pads]`; attention_mask [B, T] (1 real, 0 pad);
        action_mask bool [B, T] (True at the A slots; e.g. `parallel.action_mask_from_labels`).
        """
        self._refuse_unless_parallel("parallel_hidden")
        check_inputs(self.config, pixel_values, input_ids)
        return parallel.forward_hidden(self, pixel_values, input_ids, attention_mask, action_mask, num_readout)

    def parallel_logits(self, pixel_values, input_ids, attention_mask, action_mask):
        """Discrete OFT head: float32 logits [B, A + 1, V] over the full vocabulary at the A + 1 readout
        positions; row k < A predicts action token a_k, row A predicts </s> (the training targets).
        Decoding takes the argmax of rows 0..A-1. Inputs as `parallel_hidden`."""
        self._refuse_unless_parallel("parallel_logits", "tokens")
        hidden = self.parallel_hidden(pixel_values, input_ids, attention_mask, action_mask,
                                      num_readout=self.config.num_action_slots + 1)
        return self.llm.logits(hidden)

    def parallel_actions(self, pixel_values, input_ids, attention_mask, action_mask):
        """Continuous OFT head: normalized actions [B, K, D] float32 (K = chunk_size, D = action_dim)
        from the A readout states reshaped row-major to [B, K, D * H]. Inputs as `parallel_hidden`."""
        self._refuse_unless_parallel("parallel_actions", "l1")
        return self.action_head(self.parallel_hidden(pixel_values, input_ids, attention_mask, action_mask))
