"""Llama-2 decoder (OpenVLA's LLM) in Flax, with a KV cache for prefill/decode.

Numerics follow transformers' `LlamaForCausalLM`: RMSNorm normalises in fp32, casts to the compute
dtype, then multiplies by its weight; RoPE uses the "rotate_half" layout HF stores q/k weights in;
attention logits and softmax are fp32; the MLP is `down(silu(gate(x)) * up(x))`; no biases anywhere.

Shapes: B batch, T tokens in this call, S cache slots, D hidden, H query heads, KVH key/value heads
(== H for Llama-2-7B; fewer gives grouped-query attention), hd head dim, F MLP hidden, V vocab rows,
L layers.

The layers' parameters are stacked on a leading 'layers' axis, created by one `nn.scan` (optionally
rematerialised); the KV cache's per-layer slices are scanned alongside them. A full forward without
cache may instead run the same stacked parameters as an unrolled loop (`ExecutionConfig.unroll_layers`,
`execution.layer_stack`). Every module takes its `LlamaConfig` and the model's `ExecutionConfig`.

The HF <-> Flax rename table is in `vla_jax.hf.keys_llama`.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.models.attention import attend, causal_attend
from vla_jax.models.config import REMAT_POLICIES, LlamaConfig
from vla_jax.models.dense import Linear
from vla_jax.models.execution import ExecutionConfig, layer_stack

ACT_AXES = ("act_batch", "act_len", "act_embed")
_INIT_STD = 0.02  # transformers' default `initializer_range` for Llama

Cache = dict  # {'k': [L, B, S, KVH, hd], 'v': [L, B, S, KVH, hd]} in compute dtype
CACHE_AXES = ("layers", "act_batch", None, "heads", "kv")


_INIT = nn.initializers.normal(_INIT_STD)


def _init(names):
    return nn.with_logical_partitioning(_INIT, names)


def _is_concrete(x) -> bool:
    """True when `x` holds real values (eager call), False while it is being traced under jit."""
    return not isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------------------------
# Host-side input checks (values can only be checked on concrete arrays, outside jit).


def check_token_ids(ids, vocab_size: int) -> None:
    """Raises ValueError unless every id in `ids` ([...] integers) lies in [0, vocab_size)."""
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = int(lo if lo < 0 else hi)
        where = tuple(int(i) for i in np.argwhere(ids == bad)[0])
        raise ValueError(f"token id {bad} at index {where} is outside the vocabulary [0, {vocab_size})")


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Optional[str] = None) -> Cache:
    """Zeroed KV cache: {'k', 'v'} each [L, batch, max_len, KVH, hd] in `dtype` (default cfg.dtype)."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"init_cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    if max_len > config.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds the model's max_seq_len={config.max_seq_len}")
    shape = (config.num_layers, batch, max_len, config.kv_heads, config.head_dim)
    dt = jnp.dtype(dtype or config.dtype)
    # Under a mesh and rules (sharded inference, vla_jax.policy.mesh) the cache is split over heads like
    # the k/v projections that fill it, and over the batch axes; elsewhere this is a no-op.
    zeros = lambda: nn.with_logical_constraint(jnp.zeros(shape, dt), CACHE_AXES)
    return {"k": zeros(), "v": zeros()}


# ----------------------------------------------------------------------------------------------
# Layers


class RMSNorm(nn.Module):
    """x [..., D] -> [..., D]: normalise in fp32, cast to compute dtype, multiply by `scale`."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """positions [B, T] int -> (cos, sin) each [B, T, 1, hd] fp32, HF layout (two halves repeated)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, n, hd] rotated by (cos, sin) [B, T, 1, hd]; `rotate_half` convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    # Like HF: cos/sin are cast to the activation dtype before the products.
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def _write_rows(cache, new, starts):
    """cache [B, S, KVH, hd] <- new [B, T, KVH, hd] written at slots starts[b] .. starts[b]+T-1."""
    def one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n.astype(c.dtype), (s, 0, 0))
    return jax.vmap(one)(cache, new, starts)


class Attention(nn.Module):
    """Causal self-attention with RoPE, optional grouped-query heads and an optional KV cache."""

    config: LlamaConfig
    execution: ExecutionConfig = ExecutionConfig()

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, query_rows=None, key_mask=None):
        """x [B, T, D], positions [B, T] -> (out [B, R, D], new layer cache or None); R = T unless query_rows.

        layer_cache: {'k','v'} [B, S, KVH, hd]. The T new keys/values of row b are written at slots
        positions[b, 0] .. positions[b, 0] + T - 1 (positions must be contiguous within a call), and
        the query at position p sees slots j <= p only: later slots hold stale padding.
        Without a cache the mask is plain causal over the T tokens (`attention.causal_attend`).
        query_rows: optional int32 [B, R] indices into the T tokens: keys/values are made for all T,
        queries (and outputs) only for these rows (a prefill's last layer needs one row per sequence).
        key_mask: optional bool [B, T] (no cache): BIDIRECTIONAL attention instead of causal, every
        query (all T, or the query_rows) sees every key where key_mask is True (OpenVLA-OFT's parallel
        decoding masks only right padding; OFT_REFERENCE.md §3).
        """
        cfg = self.config
        if key_mask is not None and layer_cache is not None:
            raise ValueError("Attention: key_mask (bidirectional attention) cannot be combined with a KV cache")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        H, KVH, hd = cfg.num_heads, cfg.kv_heads, cfg.head_dim

        def proj(inputs, n, name):
            return Linear((n, hd), ("embed", "heads", "kv"), kernel_init=_INIT, dtype=dtype, param_dtype=pdtype,
                          custom_vjp=self.execution.dense_custom_vjp, name=name)(inputs)

        if query_rows is None:
            xq, q_positions = x, positions
        else:
            xq = jnp.take_along_axis(x, query_rows[..., None], axis=1)
            q_positions = jnp.take_along_axis(positions, query_rows, axis=1)
        q, k, v = proj(xq, H, "q_proj"), proj(x, KVH, "k_proj"), proj(x, KVH, "v_proj")  # [B, R or T, n, hd]
        cos, sin = rope_cos_sin(positions, hd, cfg.rope_theta)
        k = apply_rope(k, cos, sin)
        if query_rows is not None:
            cos, sin = rope_cos_sin(q_positions, hd, cfg.rope_theta)
        q = apply_rope(q, cos, sin)

        T = x.shape[1]
        new_cache = None
        if key_mask is not None:
            out = attend(q, k, v, key_mask[:, None, :].astype(bool), dtype)  # mask [B, 1, T]: every query row alike
        elif layer_cache is None and query_rows is None:
            out = causal_attend(q, k, v, dtype, self.execution.attention_query_block)
        elif layer_cache is None:
            idx = jnp.arange(T)
            out = attend(q, k, v, idx[None, None, :] <= query_rows[:, :, None], dtype)  # mask [B, R, T]
        else:
            k_all = _write_rows(layer_cache["k"], k, positions[:, 0])
            v_all = _write_rows(layer_cache["v"], v, positions[:, 0])
            new_cache = {"k": k_all, "v": v_all}
            slots = jnp.arange(k_all.shape[1])
            mask = slots[None, None, :] <= q_positions[:, :, None]  # [B, R, S]
            out = attend(q, k_all.astype(dtype), v_all.astype(dtype), mask, dtype)
        out = Linear((cfg.hidden_size,), ("heads", "kv", "embed"), n_in=2, kernel_init=_INIT, dtype=dtype,
                     param_dtype=pdtype, custom_vjp=self.execution.dense_custom_vjp, name="o_proj")(out)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: x [B, T, D] -> down(silu(gate(x)) * up(x)) [B, T, D]."""

    config: LlamaConfig
    execution: ExecutionConfig = ExecutionConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        kw = dict(kernel_init=_INIT, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  custom_vjp=self.execution.dense_custom_vjp)
        gate = Linear((cfg.intermediate_size,), ("embed", "mlp"), name="gate_proj", **kw)(x)
        up = Linear((cfg.intermediate_size,), ("embed", "mlp"), name="up_proj", **kw)(x)
        return Linear((cfg.hidden_size,), ("mlp", "embed"), name="down_proj", **kw)(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """One pre-norm Llama block; signature fits nn.scan: (carry x, broadcast positions, scanned cache)."""

    config: LlamaConfig
    execution: ExecutionConfig = ExecutionConfig()

    @nn.compact
    def __call__(self, x, positions, layer_cache, query_rows=None, key_mask=None):
        """x [B, T, D] -> (x [B, R, D], new cache): R = T, or only the rows `query_rows` [B, R] (see
        Attention; every row still writes its keys/values to the cache). key_mask [B, T]: bidirectional
        attention over those keys (Attention)."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        x = nn.with_logical_constraint(x, ACT_AXES)
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="input_layernorm")(x)
        h, new_cache = Attention(cfg, self.execution, name="self_attn")(h, positions, layer_cache, query_rows,
                                                                        key_mask)
        if query_rows is not None:
            x = jnp.take_along_axis(x, query_rows[..., None], axis=1)
        x = x + h
        h = RMSNorm(cfg.rms_norm_eps, dtype, pdtype, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, self.execution, name="mlp")(h)
        x = nn.with_logical_constraint(x, ACT_AXES)
        return x, new_cache


_REMAT_POLICIES = {name: getattr(jax.checkpoint_policies, name) for name in REMAT_POLICIES}


class Llama(nn.Module):
    """Llama-2 decoder. Methods: `embed`, `__call__` (layers + final norm) and `logits`.

    With config.remat each layer is rematerialised with `config.remat_policy`.
    """

    config: LlamaConfig
    execution: ExecutionConfig = ExecutionConfig()

    def setup(self):
        cfg = self.config
        if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.kv_heads:
            raise ValueError(f"hidden_size={cfg.hidden_size} must divide by num_heads={cfg.num_heads}, "
                             f"and num_heads by num_kv_heads={cfg.kv_heads}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=pdtype,
                                     embedding_init=_init(("vocab", "embed")))
        layer = DecoderLayer
        if cfg.remat:
            # prevent_cse=False is safe (and faster) inside scan, which already blocks CSE.
            layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast), length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})(cfg, self.execution)
        self.norm = RMSNorm(cfg.rms_norm_eps, dtype, pdtype)
        # bf16 inputs, fp32 accumulation and output: logits feed the loss and argmax.
        self.lm_head = Linear((cfg.vocab_size,), ("embed", "vocab"), kernel_init=_INIT, accumulate_fp32=True,
                              dtype=dtype, param_dtype=pdtype, custom_vjp=self.execution.dense_custom_vjp)

    def embed(self, ids):
        """ids [B, T] int32 -> embeddings [B, T, D] in compute dtype (ids checked when concrete)."""
        if _is_concrete(ids):
            check_token_ids(ids, self.config.vocab_size)
        return self.embed_tokens(ids)

    def __call__(self, x, positions, cache: Optional[Cache] = None, key_mask=None, last_layer_rows=None):
        """x [B, T, D], positions [B, T] int32 -> (hidden [B, T, D] after the final norm, new cache).

        cache None: training/full forward, plain causal attention over the T tokens (right padding
        needs no mask since pads only follow real tokens); the returned cache is None.
        cache {'k','v'} [L, B, S, KVH, hd]: row b's new keys/values go to slots positions[b, 0] ..
        positions[b, 0] + T - 1 (positions contiguous per row within a call; prefill uses
        arange(T), decode T=1 with each row's own position). The caller must keep
        positions[b, -1] < S; this is checked on concrete inputs, but under jit an overflowing
        write would be clamped by XLA, silently.
        key_mask: optional bool [B, T], cache None only: bidirectional attention where every token
        sees every key with key_mask True (OpenVLA-OFT's parallel decoding; pads False).
        last_layer_rows: optional int32 [B, R], cache None only: only these rows of the output are
        wanted, so hidden comes back [B, R, D]. Run unrolled (`layer_stack`), the last layer computes
        its queries, attention output and MLP for these rows only (its keys/values still for all T),
        as `decode.greedy_decode`'s prefill does; the scan runs every row and then takes these.
        """
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(f"x must be [B, T, {cfg.hidden_size}], got shape {x.shape}")
        B, T = x.shape[:2]
        if positions.shape != (B, T):
            raise ValueError(f"positions must be [B, T] = {(B, T)}, got shape {positions.shape}")
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
        if cache is not None:
            self._check_cache(cache, B, T, positions)
        if key_mask is not None and (cache is not None or key_mask.shape != (B, T)):
            raise ValueError(f"key_mask must be [B, T] = {(B, T)} and used without a cache, got shape "
                             f"{key_mask.shape} and cache={'given' if cache is not None else None}")
        if last_layer_rows is not None and (cache is not None or last_layer_rows.ndim != 2
                                            or last_layer_rows.shape[0] != B):
            raise ValueError(f"last_layer_rows must be [B={B}, R] row indices and used without a cache, got shape "
                             f"{last_layer_rows.shape} and cache={'given' if cache is not None else None}")
        x = x.astype(jnp.dtype(cfg.dtype))
        if cache is None and layer_stack.unroll(self.execution.unroll_layers) and not self.is_initializing():
            # The same stacked params as an unrolled loop (layer_stack): the same values as the scan.
            rows = None if last_layer_rows is None else last_layer_rows.astype(jnp.int32)
            x = layer_stack.run_unrolled(DecoderLayer(cfg, self.execution, parent=None),
                                         self.variables["params"]["layers"], x, positions, None, None, key_mask,
                                         remat=cfg.remat,
                                         policy=_REMAT_POLICIES[cfg.remat_policy] if cfg.remat else None,
                                         last_layer_args=None if rows is None else (positions, None, rows, key_mask))
            return self.norm(x), None
        x, new_cache = self.layers(x, positions, cache, None, key_mask)
        if last_layer_rows is not None:
            x = jnp.take_along_axis(x, last_layer_rows.astype(jnp.int32)[..., None], axis=1)
        return self.norm(x), new_cache

    def _check_cache(self, cache, B, T, positions):
        cfg = self.config
        if set(cache) != {"k", "v"}:
            raise ValueError(f"cache must be a dict with keys 'k' and 'v', got keys {sorted(cache)}")
        want = (cfg.num_layers, B, None, cfg.kv_heads, cfg.head_dim)
        for name in ("k", "v"):
            shape = cache[name].shape
            if len(shape) != 5 or any(w is not None and w != s for w, s in zip(want, shape)):
                raise ValueError(f"cache['{name}'] must be [L, B, S, KVH, hd] = "
                                 f"{tuple('S' if w is None else w for w in want)}, got {shape}")
        S = cache["k"].shape[2]
        if T > S:
            raise ValueError(f"cache too short: {T} new tokens but only {S} cache slots")
        if _is_concrete(positions) and positions.size:
            last = int(np.max(np.asarray(positions)[:, -1]))
            if last >= S:
                raise ValueError(f"cache too short: position {last} needs slot {last} but the cache has {S} slots")

    def logits(self, hidden):
        """hidden [B, T, D] -> logits [B, T, V] float32 (untied lm_head, accumulated in fp32)."""
        return self.lm_head(hidden).astype(jnp.float32)
