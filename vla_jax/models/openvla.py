"""The composed OpenVLA model: [DINOv2, SigLIP] patch features -> fused projector -> Llama-2.

Sequence layout (OPENVLA_REFERENCE.md §1.5): the P image-patch embeddings are inserted right
after BOS, `[BOS, patch_1..patch_P, text_1..]`, positions run 0..T+P-1 continuously and the
attention is plain causal over the whole sequence, patches included. With several cameras and
proprioception (OpenVLA-OFT, OFT_REFERENCE.md §7) the inserted part is
`[img_0 patches][img_1 patches]..[proprio token]` (`OpenVLAConfig.num_inserted_tokens` positions).
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
from vla_jax.models.film import FiLM, language_vector
from vla_jax.models.llama import Llama
from vla_jax.models.projector import FusedProjector
from vla_jax.models.proprio import ProprioProjector
from vla_jax.models.vit import VisionTower


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_pixels(config: OpenVLAConfig, pixel_values) -> None:
    s, n = config.image_size, config.num_images
    shape = tuple(pixel_values.shape)
    want = f"[batch, {s}, {s}, 3]" if n == 1 else f"[batch, num_images={n}, {s}, {s}, 3]"
    if len(shape) == 4 and n > 1:
        raise ValueError(f"pixel_values has shape {shape}, one camera, but this model takes num_images={n} cameras: "
                         f"pass {want} (cameras in the order the model was trained on, primary first)")
    if len(shape) == 5 and shape[1] != n:
        raise ValueError(f"pixel_values has {shape[1]} cameras (shape {shape}) but this model takes num_images={n}: "
                         f"expected {want}")
    if len(shape) not in (4, 5):
        raise ValueError(f"pixel_values must be {want}" + (f" (or [batch, 1, {s}, {s}, 3])" if n == 1 else "")
                         + f", got shape {shape}")
    if shape[-1] != 3:
        raise ValueError(f"pixel_values must have 3 (RGB) channels in the last axis, got {shape[-1]} "
                         f"(shape {shape}; channels-first input must be transposed to [..., H, W, 3])")
    if shape[-3:-1] != (s, s):
        raise ValueError(f"pixel_values must be {s}x{s} images (the model's image_size), got {shape[-3]}x{shape[-2]} "
                         f"(shape {shape}); resize with vla_jax.data.transforms first")


def _check_proprio(config: OpenVLAConfig, proprio, batch: int) -> None:
    p = config.proprio_dim
    if p is None:
        if proprio is not None:
            raise ValueError(f"proprio given (shape {tuple(np.shape(proprio))}) but this model has no proprio input "
                             f"(proprio_dim=None); build it with proprio_dim=P to use a proprio token")
        return
    if proprio is None:
        raise ValueError(f"this model has proprio_dim={p}: pass proprio=float32 [batch={batch}, {p}] (the state "
                         f"normalized with the dataset's proprio statistics)")
    shape = tuple(proprio.shape)
    if shape != (batch, p):
        raise ValueError(f"proprio must be [batch={batch}, proprio_dim={p}], got shape {shape}")
    if not jnp.issubdtype(proprio.dtype, jnp.floating):
        raise ValueError(f"proprio must be a float array (normalized state), got dtype {proprio.dtype}")
    if _is_concrete(proprio) and not np.all(np.isfinite(np.asarray(proprio, np.float32))):
        raise ValueError("proprio holds non-finite values (NaN or inf)")


def check_inputs(config: OpenVLAConfig, pixel_values, input_ids, max_text_len: Optional[int] = None,
                 proprio=None) -> None:
    """Validates model inputs; raises ValueError naming the expected and the given value.

    pixel_values: uint8 (or float in [0, 255]) `[B, N, S, S, 3]` with N = config.num_images and
    S = config.image_size; `[B, S, S, 3]` is accepted when N == 1 (OpenVLA's one camera).
    input_ids: int `[B, T]` with ids in [0, vocab_size) and T + num_inserted_tokens <= max_seq_len.
    proprio: float `[B, P]` exactly when config.proprio_dim = P, else None.
    Shape checks always run; value checks run only on concrete (non-traced) arrays.
    """
    _check_pixels(config, pixel_values)
    batch = tuple(pixel_values.shape)[0]
    ids_shape = tuple(input_ids.shape)
    if len(ids_shape) != 2 or ids_shape[0] != batch:
        raise ValueError(f"input_ids must be [batch={batch}, length], got shape {ids_shape}")
    _check_proprio(config, proprio, batch)
    inserted = config.num_inserted_tokens
    max_len = config.llama.max_seq_len - inserted if max_text_len is None else max_text_len
    if ids_shape[1] > max_len:
        raise ValueError(f"input_ids has {ids_shape[1]} tokens but the configured maximum is {max_len} text tokens "
                         f"(max_seq_len {config.llama.max_seq_len} minus {inserted} inserted image-patch"
                         f"{'/proprio' if config.proprio_dim else ''} positions)")
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
    """OpenVLA: uint8 RGB images (+ optional proprio) + token ids -> next-token logits over the vocabulary.

    Every entry point takes `pixel_values` `[B, N, S, S, 3]` (N = config.num_images; `[B, S, S, 3]`
    when N == 1) and, when config.proprio_dim is set, the keyword `proprio` float32 `[B, P]`.
    """

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
        if cfg.proprio_dim is not None:  # OpenVLA-OFT's proprio token, params['proprio_projector']
            self.proprio_projector = ProprioProjector(llm_dim=cfg.llama.hidden_size, dtype=cfg.dtype,
                                                      param_dtype=cfg.param_dtype,
                                                      custom_vjp=cfg.execution.dense_custom_vjp)
        if cfg.film:  # OpenVLA-OFT+'s FiLM linears, params['film'] (vla_jax.models.film)
            self.film = FiLM(cfg)

    def encode_image(self, pixel_values, film=None):
        """uint8 `[B, S, S, 3]` -> projected patch embeddings `[B, P, D_llm]`.

        Each tower normalizes with its own mean/std (ImageNet for DINOv2, 0.5/0.5 for SigLIP);
        the features are concatenated on channels in the order [DINOv2, SigLIP].
        film (OFT+): None, or {'dino': (gamma, beta), 'siglip': (gamma, beta)}, each [depth-1, B, width]
        (`FiLM(lang)` for these B images).
        """
        film = film or {}
        x = pixel_values.astype(jnp.float32) / 255.0

        def normalized(tower_cfg):
            mean = jnp.asarray(tower_cfg.mean, jnp.float32)
            std = jnp.asarray(tower_cfg.std, jnp.float32)
            return (x - mean) / std

        feats = jnp.concatenate([self.dino(normalized(self.config.dino), film.get("dino")),
                                 self.siglip(normalized(self.config.siglip), film.get("siglip"))], axis=-1)
        return self.projector(feats)

    def _film(self, lang, cameras: int):
        """lang [B, H] -> the towers' FiLM for B * cameras images (each example's row repeated per camera,
        in the order the cameras are folded into the batch); None for a model without FiLM."""
        if not self.config.film:
            return None
        if lang is None:
            raise ValueError("this model has FiLM (film=True): the towers need the language vector lang [B, H] "
                             "(vla_jax.models.film.language_vector of the prompt's raw token embeddings)")
        film = self.film(lang)
        if cameras == 1:
            return film
        return {k: tuple(jnp.repeat(t, cameras, axis=1) for t in pair) for k, pair in film.items()}

    def encode_images(self, pixel_values, lang=None):
        """`[B, N, S, S, 3]` (or `[B, S, S, 3]`, one camera) -> `[B, N * P, D_llm]`: every camera through
        the same towers and projector (N folded into the batch), patches concatenated in camera order
        (upstream splits its 6N-channel stack per image and concatenates on the sequence axis).
        lang: float [B, H], the FiLM language vector (film=True only); every camera gets its row's."""
        if pixel_values.ndim == 4:  # OpenVLA's one camera: exactly the single-image program
            return self.encode_image(pixel_values, self._film(lang, 1))
        b, n = pixel_values.shape[:2]
        patches = self.encode_image(pixel_values.reshape((b * n,) + tuple(pixel_values.shape[2:])),
                                    self._film(lang, n))
        return patches.reshape(b, n * patches.shape[1], patches.shape[2])

    def inserted_embeddings(self, pixel_values, proprio=None, lang=None):
        """The `config.num_inserted_tokens` embeddings that follow BOS: `[B, N * P (+ 1), D_llm]`, the
        image patches in camera order, then the proprio token (`ProprioProjector(proprio)`) if the
        model has one. lang [B, H]: FiLM's language vector (film=True). Inputs are the caller's to
        check (`check_inputs`)."""
        x = self.encode_images(pixel_values, lang)
        if self.config.proprio_dim is None:
            return x
        token = self.proprio_projector(proprio)[:, None, :]
        return jnp.concatenate([x, token.astype(x.dtype)], axis=1)

    def _init_proprio(self, pixel_values, proprio):
        """`model.init(rng, pixel_values, input_ids)` creates params['proprio_projector'] from a zero
        state (init's example inputs come from the batch layout, which has no proprio argument)."""
        if proprio is None and self.config.proprio_dim is not None and self.is_initializing():
            return jnp.zeros((pixel_values.shape[0], self.config.proprio_dim), jnp.float32)
        return proprio

    def embed_inputs(self, pixel_values, input_ids, proprio=None):
        """-> fused embeddings `[B, T + I, D]` (I = config.num_inserted_tokens): BOS, then the image
        patches of every camera and the proprio token, then the rest of the text."""
        proprio = self._init_proprio(pixel_values, proprio)
        check_inputs(self.config, pixel_values, input_ids, proprio=proprio)
        text = self.llm.embed(input_ids)
        # FiLM needs parallel decoding (config check), whose models run this only in `init`: any
        # language vector of the right shape creates the FiLM params.
        lang = language_vector(text, jnp.ones(input_ids.shape, bool)) if self.config.film else None
        inserted = self.inserted_embeddings(pixel_values, proprio, lang).astype(text.dtype)
        return jnp.concatenate([text[:, :1], inserted, text[:, 1:]], axis=1)

    def __call__(self, pixel_values, input_ids, logit_positions=None, proprio=None):
        """Training / scoring forward.

        pixel_values: uint8 `[B, N, S, S, 3]` (`[B, S, S, 3]` with one camera); input_ids: int32 `[B, T]`
        (right-padded); proprio: float32 `[B, P]` when config.proprio_dim is set.
        logit_positions: optional int32 `[B, K]` indices into the fused sequence (length T + I,
        I = config.num_inserted_tokens); the lm_head is applied only there (the loss needs ~8 positions).
        Returns float32 logits `[B, K, V]`, or `[B, T + I, V]` when logit_positions is None.
        This is the causal (autoregressive) forward; `model.init` runs it, and for an action_head='l1'
        config it then also creates params['action_head']. Parallel-decoding (OFT) models run
        `parallel_logits` / `parallel_actions` instead.
        """
        self._refuse_if_parallel("__call__")
        if self.is_initializing() and self.config.action_head == "l1":
            cfg = self.config
            self.action_head(jnp.zeros((1, cfg.num_action_slots, cfg.llama.hidden_size), jnp.float32))
        x = self.embed_inputs(pixel_values, input_ids, proprio)
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

    def parallel_hidden(self, pixel_values, input_ids, attention_mask, action_mask, num_readout=None, proprio=None):
        """One bidirectional forward over zeroed action slots -> post-norm hidden states [B, R, H] at
        the readout positions [SPACE, a_0 .. a_{A-2}] (R = A = chunk_size * action_dim), plus a_{A-1}
        when num_readout = A + 1.

        pixel_values uint8 [B, N, S, S, 3] (or [B, S, S, 3], one camera); input_ids int32 [B, T]
        right-padded rows `[BOS] prompt SPACE [A slots] </s> [pads]`; attention_mask [B, T] (1 real,
        0 pad); action_mask bool [B, T] (True at the A slots; e.g. `parallel.action_mask_from_labels`);
        proprio float32 [B, P] when config.proprio_dim is set.
        """
        self._refuse_unless_parallel("parallel_hidden")
        check_inputs(self.config, pixel_values, input_ids, proprio=proprio)
        return parallel.forward_hidden(self, pixel_values, input_ids, attention_mask, action_mask, num_readout,
                                       proprio)

    def parallel_logits(self, pixel_values, input_ids, attention_mask, action_mask, proprio=None):
        """Discrete OFT head: float32 logits [B, A + 1, V] over the full vocabulary at the A + 1 readout
        positions; row k < A predicts action token a_k, row A predicts </s> (the training targets).
        Decoding takes the argmax of rows 0..A-1. Inputs as `parallel_hidden`."""
        self._refuse_unless_parallel("parallel_logits", "tokens")
        hidden = self.parallel_hidden(pixel_values, input_ids, attention_mask, action_mask,
                                      num_readout=self.config.num_action_slots + 1, proprio=proprio)
        return self.llm.logits(hidden)

    def parallel_actions(self, pixel_values, input_ids, attention_mask, action_mask, proprio=None):
        """Continuous OFT head: normalized actions [B, K, D] float32 (K = chunk_size, D = action_dim)
        from the A readout states reshaped row-major to [B, K, D * H]. Inputs as `parallel_hidden`."""
        self._refuse_unless_parallel("parallel_actions", "l1")
        return self.action_head(self.parallel_hidden(pixel_values, input_ids, attention_mask, action_mask,
                                                     proprio=proprio))
