"""HF `LlamaForCausalLM` <-> Flax parameter conversion for `llama.Llama`: `hf_to_flax`, `flax_to_hf`,
and per-tensor helpers usable for streaming conversion of large checkpoints.

Linear weights are [out, in] in torch and kernels [in, out] here; q/k/v/o split heads out; the
per-layer tensors are stacked on a leading 'layers' axis. Rotary `inv_freq` buffers (present in
some older checkpoints) are recomputed from rope_theta, so they are skipped.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

import flax.linen as nn
import numpy as np

from vla_jax.models.config import LlamaConfig


# HF sub-key within a layer -> (Flax path within 'layers', kind)
_LAYER_TABLE = {
    "input_layernorm.weight": (("input_layernorm", "scale"), "norm"),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), "norm"),
    "self_attn.q_proj.weight": (("self_attn", "q_proj", "kernel"), "q"),
    "self_attn.k_proj.weight": (("self_attn", "k_proj", "kernel"), "kv"),
    "self_attn.v_proj.weight": (("self_attn", "v_proj", "kernel"), "kv"),
    "self_attn.o_proj.weight": (("self_attn", "o_proj", "kernel"), "o"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), "linear"),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), "linear"),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), "linear"),
}
_TOP_TABLE = {
    "model.embed_tokens.weight": (("embed_tokens", "embedding"), "copy"),
    "model.norm.weight": (("norm", "scale"), "norm"),
    "lm_head.weight": (("lm_head", "kernel"), "linear"),
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def _hf_shape(hf_sub: str, cfg: LlamaConfig) -> tuple:
    """Expected torch shape of an HF tensor (layer sub-key or top-level key)."""
    D, F, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    return {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (cfg.num_heads * hd, D),
        "self_attn.k_proj.weight": (cfg.kv_heads * hd, D), "self_attn.v_proj.weight": (cfg.kv_heads * hd, D),
        "self_attn.o_proj.weight": (D, cfg.num_heads * hd),
        "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F),
        "model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D),
    }[hf_sub]


def _to_flax(w: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
    D, hd = cfg.hidden_size, cfg.head_dim
    if kind in ("norm", "copy"):
        return w
    if kind == "linear":
        return w.T
    if kind == "q":
        return w.T.reshape(D, cfg.num_heads, hd)
    if kind == "kv":
        return w.T.reshape(D, cfg.kv_heads, hd)
    if kind == "o":
        return w.T.reshape(cfg.num_heads, hd, D)
    raise AssertionError(kind)


def _to_hf(k: np.ndarray, kind: str, cfg: LlamaConfig) -> np.ndarray:
    D = cfg.hidden_size
    if kind in ("norm", "copy"):
        return k
    if kind == "linear":
        return k.T
    if kind in ("q", "kv"):
        return k.reshape(D, -1).T
    if kind == "o":
        return k.reshape(-1, D).T
    raise AssertionError(kind)


def hf_keys(cfg: LlamaConfig, prefix: str = "") -> list[str]:
    """Every HF key a LlamaForCausalLM with this geometry has (rotary buffers excluded)."""
    keys = [prefix + "model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        keys += [f"{prefix}model.layers.{i}.{sub}" for sub in _LAYER_TABLE]
    return keys + [prefix + "model.norm.weight", prefix + "lm_head.weight"]


def convert_hf_tensor(key: str, value: np.ndarray, cfg: LlamaConfig, prefix: str = ""):
    """One HF tensor -> (flax path tuple, layer index or None, array in Flax layout), for streaming.

    Layer tensors belong at `params[path][layer]` of the stacked array. Returns None for keys that
    carry no parameter (rotary `inv_freq` buffers). Raises ValueError on unknown keys or bad shapes.
    """
    if not key.startswith(prefix):
        raise ValueError(f"HF key {key!r} lacks the expected prefix {prefix!r}")
    sub = key[len(prefix):]
    if sub.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.fullmatch(sub)
    if m:
        layer, lsub = int(m.group(1)), m.group(2)
        if lsub not in _LAYER_TABLE:
            raise ValueError(f"unknown HF Llama key {key!r}")
        if layer >= cfg.num_layers:
            raise ValueError(f"HF key {key!r} has layer index {layer} but the config has {cfg.num_layers} layers")
        path, kind = _LAYER_TABLE[lsub]
        path, shape_key = ("layers",) + path, lsub
    elif sub in _TOP_TABLE:
        (path, kind), layer, shape_key = _TOP_TABLE[sub], None, sub
    else:
        raise ValueError(f"unknown HF Llama key {key!r}")
    value = np.asarray(value)
    want = _hf_shape(shape_key, cfg)
    if value.shape != want:
        raise ValueError(f"HF tensor {key!r} has shape {value.shape}, expected {want} for this config")
    return path, layer, _to_flax(value, kind, cfg)


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_to_flax(state_dict: dict, cfg: LlamaConfig, prefix: str = "", dtype: Optional[str] = None) -> dict:
    """HF LlamaForCausalLM state dict {key: [torch layout] ndarray} -> Flax params (nested dict of
    numpy arrays in `dtype`, default cfg.param_dtype; the 'params' collection, without the wrapper).

    `prefix` is prepended to every HF key (e.g. 'language_model.' inside an OpenVLA checkpoint).
    Raises ValueError on unknown, missing, duplicated or wrongly shaped tensors.
    """
    return hf_items_to_flax(state_dict.items(), cfg, prefix=prefix, dtype=dtype)


def hf_items_to_flax(items: Iterable, cfg: LlamaConfig, prefix: str = "", dtype: Optional[str] = None) -> dict:
    """Like hf_to_flax, but consumes (key, array) pairs one at a time (e.g. lazily from safetensors),
    writing layer tensors straight into preallocated stacked arrays."""
    dt = np.dtype(dtype or cfg.param_dtype)
    params: dict = {}
    seen: set = set()
    for key, value in items:
        out = convert_hf_tensor(key, value, cfg, prefix)
        if out is None:
            continue
        if key in seen:
            raise ValueError(f"HF key {key!r} given twice")
        seen.add(key)
        path, layer, arr = out
        if layer is None:
            _set(params, path, np.array(arr, dtype=dt))
            continue
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        if path[-1] not in node:
            node[path[-1]] = np.empty((cfg.num_layers,) + arr.shape, dt)
        node[path[-1]][layer] = arr
    missing = [k for k in hf_keys(cfg, prefix) if k not in seen]
    if missing:
        raise ValueError(f"{len(missing)} HF Llama tensors missing, e.g. {missing[:3]}")
    return params


def flax_to_hf_items(params: dict, cfg: LlamaConfig, prefix: str = "") -> Iterator[tuple]:
    """Flax params -> (HF key, numpy array in torch layout) pairs, one tensor at a time.
    Raises ValueError on missing or wrongly shaped parameters."""
    params = nn.meta.unbox(params)

    def get(path):
        node = params
        for p in path:
            if not isinstance(node, dict) or p not in node:
                raise ValueError(f"Flax params lack {'/'.join(path)}")
            node = node[p]
        return np.asarray(node)

    def checked(key, shape_key, arr):
        want = _hf_shape(shape_key, cfg)
        if arr.shape != want:
            raise ValueError(f"Flax params give HF tensor {key!r} shape {arr.shape}, expected {want}")
        return key, np.ascontiguousarray(arr)

    top = {sub: _to_hf(get(path), kind, cfg) for sub, (path, kind) in _TOP_TABLE.items()}
    yield checked(prefix + "model.embed_tokens.weight", "model.embed_tokens.weight", top["model.embed_tokens.weight"])
    stacked = {sub: get(("layers",) + path) for sub, (path, _) in _LAYER_TABLE.items()}
    for sub, arr in stacked.items():
        if arr.ndim == 0 or arr.shape[0] != cfg.num_layers:
            raise ValueError(f"params layers/{'/'.join(_LAYER_TABLE[sub][0])} has shape {arr.shape}; "
                             f"expected a leading axis of {cfg.num_layers} layers")
    for i in range(cfg.num_layers):
        for sub, (_, kind) in _LAYER_TABLE.items():
            yield checked(f"{prefix}model.layers.{i}.{sub}", sub, _to_hf(stacked[sub][i], kind, cfg))
    for sub in ("model.norm.weight", "lm_head.weight"):
        yield checked(prefix + sub, sub, top[sub])


def flax_to_hf(params: dict, cfg: LlamaConfig, prefix: str = "") -> dict:
    """Flax params -> HF LlamaForCausalLM state dict {key: numpy array [torch layout]}."""
    return dict(flax_to_hf_items(params, cfg, prefix))
