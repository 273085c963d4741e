"""OpenVLAConfig <-> the HF OpenVLA `config.json` / `preprocessor_config.json` (OPENVLA_REFERENCE.md §8).

Reading: every value comes from the checkpoint's files. A key that a file leaves out takes the
default of the class that wrote it, which is what the HF loader does:
  * `text_config` is saved by transformers as a diff against a default `LlamaConfig` (the released
    openvla-7b `text_config` only holds vocab_size, pad_token_id and torch_dtype), so missing Llama
    fields take transformers 4.40.1's `LlamaConfig` defaults (`LLAMA_DEFAULTS`; rms_norm_eps 1e-6).
  * top-level keys missing from config.json take `PrismaticConfig`'s defaults (`OPENVLA_DEFAULTS`).
  * Tower geometry follows from `timm_model_ids` (`TIMM_TOWERS`); per-tower mean/std come from
    `preprocessor_config.json` when present. A checkpoint whose towers are not a released timm model
    (our small test presets) carries their geometry under the extra key `vla_jax_vision`.

Writing: the released layout (model_type `openvla`, timm ids, `text_config` with vocab 32064 and
pad 32000, `pad_to_multiple_of` 64, architectures, auto_map), with `text_config` written out in
full so no reader depends on library defaults.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

from vla_jax.models.config import (IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, LlamaConfig, OpenVLAConfig,
                                   ViTConfig, with_dtypes)

MODEL_TYPE = "openvla"
ARCHITECTURES = ["OpenVLAForActionPrediction"]
AUTO_MAP = {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                      "AutoProcessor": "processing_prismatic.PrismaticProcessor"}
# The transformers version the released remote code pins (it warns on any other).
TRANSFORMERS_VERSION = "4.40.1"
FUSED_PROJECTOR_ARCHS = ("no-align+fused-gelu-mlp", "fused-gelu-mlp")
DINO_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_IDS = {224: "vit_so400m_patch14_siglip_224", 384: "vit_so400m_patch14_siglip_384"}
EXTRA_VISION_KEY = "vla_jax_vision"

# transformers 4.40.1 `LlamaConfig()` defaults for the fields we read.
LLAMA_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
    "initializer_range": 0.02,
}
# `PrismaticConfig` / `OpenVLAConfig` constructor defaults (configuration_prismatic.py).
OPENVLA_DEFAULTS: Dict[str, Any] = {
    "use_fused_vision_backbone": None, "image_resize_strategy": "letterbox", "llm_max_length": 2048,
    "pad_token_id": 32000, "pad_to_multiple_of": 64, "n_action_bins": 256, "timm_override_act_layers": None,
}

# Geometry of the timm towers OpenVLA uses (timm 0.9.10 model definitions; tests check them
# against the installed timm without allocating).
_DINO = dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, patch_size=14, class_token=True, num_registers=4,
             layer_scale=True, no_embed_class=True, map_head=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
_SIGLIP = dict(width=1152, depth=27, num_heads=16, mlp_dim=4304, patch_size=14, class_token=False, num_registers=0,
               layer_scale=False, no_embed_class=False, map_head=True, mean=SIGLIP_MEAN, std=SIGLIP_STD)
TIMM_TOWERS: Dict[str, Dict[str, Any]] = {DINO_ID: _DINO, **{v: _SIGLIP for v in SIGLIP_IDS.values()}}
_TOWER_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "patch_size", "class_token", "num_registers",
                 "layer_scale", "no_embed_class", "map_head", "ln_eps", "mean", "std", "image_size")


def _err(source: str, msg: str) -> ValueError:
    return ValueError(f"{source}: {msg}")


def read_json(path: str) -> Dict[str, Any]:
    """Reads a JSON object; ValueError naming the file when it is missing, malformed or not an object."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------
# config.json -> OpenVLAConfig


def text_config(cfg_json: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """config.json's `text_config` with transformers' LlamaConfig defaults filled in."""
    tc = cfg_json.get("text_config")
    if not isinstance(tc, dict):
        raise _err(source, "has no `text_config` object (the LLM's LlamaConfig)")
    if tc.get("model_type", "llama") != "llama":
        raise _err(source, f"text_config.model_type is {tc.get('model_type')!r}; only 'llama' is supported")
    out = dict(LLAMA_DEFAULTS)
    out.update({k: v for k, v in tc.items()})
    return out


def llama_config_from_hf(tc: Mapping[str, Any], source: str, max_seq_len: int) -> LlamaConfig:
    """A full LlamaConfig dict (defaults filled) -> our LlamaConfig; unsupported variants are errors."""
    rope_theta = tc.get("rope_theta", 10000.0)
    rope = tc.get("rope_scaling")
    params = tc.get("rope_parameters")  # transformers >= 5 spelling
    if isinstance(params, dict):
        rope = None if params.get("rope_type", "default") == "default" else params
        rope_theta = params.get("rope_theta", rope_theta)
    checks = [("hidden_act", tc.get("hidden_act"), "silu"), ("tie_word_embeddings", tc.get("tie_word_embeddings"), False),
              ("attention_bias", tc.get("attention_bias"), False), ("mlp_bias", tc.get("mlp_bias", False), False),
              ("rope_scaling", rope, None)]
    for name, got, want in checks:
        if got != want:
            raise _err(source, f"text_config.{name} = {got!r} is not supported (expected {want!r})")
    heads = int(tc["num_attention_heads"])
    kv = tc.get("num_key_value_heads") or heads
    hidden = int(tc["hidden_size"])
    if tc.get("head_dim") not in (None, hidden // heads):
        raise _err(source, f"text_config.head_dim = {tc['head_dim']} but hidden_size / num_attention_heads = "
                           f"{hidden // heads}; only the standard head_dim is supported")
    return LlamaConfig(vocab_size=int(tc["vocab_size"]), hidden_size=hidden,
                       intermediate_size=int(tc["intermediate_size"]), num_layers=int(tc["num_hidden_layers"]),
                       num_heads=heads, num_kv_heads=None if int(kv) == heads else int(kv),
                       rms_norm_eps=float(tc["rms_norm_eps"]), rope_theta=float(rope_theta), max_seq_len=max_seq_len)


def _tower(timm_id: str, image_size: int, extra: Optional[Mapping], mean_std: Optional[Tuple], source: str,
           which: str) -> ViTConfig:
    if extra is not None:
        missing = [k for k in _TOWER_FIELDS if k not in extra]
        if missing:
            raise _err(source, f"{EXTRA_VISION_KEY}.{which} lacks {missing}")
        kw = {k: extra[k] for k in _TOWER_FIELDS}
        kw["mean"], kw["std"] = tuple(kw["mean"]), tuple(kw["std"])
    else:
        if timm_id not in TIMM_TOWERS:
            raise _err(source, f"unknown timm model id {timm_id!r} for the {which}; known: {sorted(TIMM_TOWERS)}")
        kw = dict(TIMM_TOWERS[timm_id], image_size=int(image_size))
    if mean_std is not None:
        kw["mean"], kw["std"] = tuple(float(x) for x in mean_std[0]), tuple(float(x) for x in mean_std[1])
    return ViTConfig(**kw)


def _preprocessor_mean_std(pre: Optional[Mapping], source: str):
    if not pre:
        return None, None
    means, stds = pre.get("means"), pre.get("stds")
    if means is None or stds is None:
        return None, None
    if len(means) != 2 or len(stds) != 2 or any(len(x) != 3 for x in list(means) + list(stds)):
        raise _err(source, f"means/stds must be two RGB triples (DINOv2, SigLIP), got means={means}, stds={stds}")
    return (means[0], stds[0]), (means[1], stds[1])


def action_dim_from_stats(norm_stats: Mapping[str, Any], default: int = 7) -> int:
    """The action dimension all datasets in `norm_stats` agree on (`default` when there are none)."""
    dims = {len(v["action"]["q01"]) for v in norm_stats.values() if isinstance(v, dict) and "action" in v}
    if len(dims) > 1:
        raise ValueError(f"norm_stats datasets disagree on the action dimension: {sorted(dims)}")
    return dims.pop() if dims else default


def config_from_hf(cfg_json: Mapping[str, Any], preprocessor: Optional[Mapping] = None, *,
                   norm_stats: Optional[Mapping] = None, dtype: str = "bfloat16", param_dtype: str = "float32",
                   source: str = "config.json") -> OpenVLAConfig:
    """HF OpenVLA config.json (+ preprocessor_config.json) -> OpenVLAConfig. ValueError names `source`."""
    mt = cfg_json.get("model_type")
    if mt != MODEL_TYPE:
        hint = (" (a plain LLM: import it as a base component with `python -m vla_jax.hf import-base`)"
                if mt in ("llama", "mistral") else "")
        raise _err(source, f"model_type is {mt!r}, expected {MODEL_TYPE!r}{hint}")
    get = lambda k: cfg_json.get(k, OPENVLA_DEFAULTS.get(k))  # noqa: E731
    if get("use_fused_vision_backbone") is not True:
        raise _err(source, "use_fused_vision_backbone must be true (DINOv2 + SigLIP); single-tower checkpoints "
                           "(e.g. openvla-v01) are not supported")
    arch = cfg_json.get("arch_specifier")
    if arch not in FUSED_PROJECTOR_ARCHS:
        raise _err(source, f"arch_specifier {arch!r} is not supported; expected one of {FUSED_PROJECTOR_ARCHS}")
    acts = get("timm_override_act_layers")
    if acts is not None and any(a is not None for a in acts):
        raise _err(source, f"timm_override_act_layers {acts} is not supported (towers use exact GELU)")
    ids, sizes = cfg_json.get("timm_model_ids"), cfg_json.get("image_sizes")
    if not (isinstance(ids, list) and len(ids) == 2):
        raise _err(source, f"timm_model_ids must list two timm ids (DINOv2, SigLIP), got {ids!r}")
    if not (isinstance(sizes, list) and len(sizes) == 2 and sizes[0] == sizes[1]):
        raise _err(source, f"image_sizes must be two equal sizes, got {sizes!r}")
    extra = cfg_json.get(EXTRA_VISION_KEY)
    pre_src = "preprocessor_config.json"
    dino_ms, siglip_ms = _preprocessor_mean_std(preprocessor, pre_src)
    dino = _tower(ids[0], sizes[0], extra and extra.get("featurizer"), dino_ms, source, "featurizer")
    siglip = _tower(ids[1], sizes[1], extra and extra.get("fused_featurizer"), siglip_ms, source, "fused_featurizer")
    if dino.image_size != siglip.image_size:
        raise _err(source, f"tower image sizes differ: {dino.image_size} vs {siglip.image_size}")

    tc = text_config(cfg_json, source)
    num_patches = dino.num_patches
    llm = llama_config_from_hf(tc, source, max_seq_len=int(get("llm_max_length")) + num_patches)
    pad_multiple, pad_id = int(get("pad_to_multiple_of")), int(get("pad_token_id"))
    base_vocab = llm.vocab_size - pad_multiple  # what modeling_prismatic.py uses for action ids
    if tc.get("pad_token_id") not in (None, pad_id):
        raise _err(source, f"pad_token_id {pad_id} differs from text_config.pad_token_id {tc['pad_token_id']}")
    if not 0 < base_vocab <= llm.vocab_size or not 0 <= pad_id < llm.vocab_size:
        raise _err(source, f"text_config.vocab_size {llm.vocab_size}, pad_to_multiple_of {pad_multiple} and "
                           f"pad_token_id {pad_id} are inconsistent")
    n_bins = int(get("n_action_bins"))
    if not 0 < n_bins <= base_vocab:
        raise _err(source, f"n_action_bins {n_bins} must be in (0, {base_vocab}]")
    stats = norm_stats if norm_stats is not None else (cfg_json.get("norm_stats") or {})
    cfg = OpenVLAConfig(dino=dino, siglip=siglip, llama=llm, base_vocab_size=base_vocab, pad_token_id=pad_id,
                        bos_token_id=int(tc["bos_token_id"]), eos_token_id=int(tc["eos_token_id"]),
                        n_action_bins=n_bins, action_dim=action_dim_from_stats(stats))
    return with_dtypes(cfg, dtype, param_dtype)


# ----------------------------------------------------------------------------------------------
# OpenVLAConfig -> config.json / preprocessor_config.json


def _tower_dict(t: ViTConfig) -> Dict[str, Any]:
    return {k: (list(getattr(t, k)) if k in ("mean", "std") else getattr(t, k)) for k in _TOWER_FIELDS}


def _is_released_tower(t: ViTConfig, timm_id: str) -> bool:
    ref = ViTConfig(**dict(TIMM_TOWERS[timm_id], image_size=t.image_size))
    return all(getattr(t, k) == getattr(ref, k) for k in _TOWER_FIELDS)


def llama_config_to_hf(llm: LlamaConfig, pad_token_id: int, bos: int, eos: int, torch_dtype: str,
                       llm_max_length: int) -> Dict[str, Any]:
    """Our LlamaConfig -> a full HF `text_config` (transformers 4.40 field names)."""
    return {
        "model_type": "llama", "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.kv_heads, "hidden_act": "silu",
        "max_position_embeddings": llm_max_length, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
        "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": LLAMA_DEFAULTS["initializer_range"], "pretraining_tp": 1,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad_token_id, "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def config_to_hf(cfg: OpenVLAConfig, norm_stats: Mapping[str, Any], torch_dtype: str = "bfloat16") -> Dict[str, Any]:
    """OpenVLAConfig -> HF OpenVLA config.json (released key set; `vla_jax_vision` added only for
    towers that are not the released timm models)."""
    size = cfg.image_size
    siglip_id = SIGLIP_IDS.get(size, SIGLIP_IDS[224])
    llm_max_length = cfg.llama.max_seq_len - cfg.num_patches
    out = {
        "architectures": list(ARCHITECTURES), "auto_map": dict(AUTO_MAP), "model_type": MODEL_TYPE,
        "arch_specifier": "no-align+fused-gelu-mlp", "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive", "image_sizes": [size, size], "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": llm_max_length, "n_action_bins": cfg.n_action_bins, "norm_stats": dict(norm_stats),
        "output_projector_states": False, "pad_to_multiple_of": cfg.llama.vocab_size - cfg.base_vocab_size,
        "pad_token_id": cfg.pad_token_id,
        "text_config": llama_config_to_hf(cfg.llama, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id,
                                          torch_dtype, llm_max_length),
        "timm_model_ids": [DINO_ID, siglip_id], "timm_override_act_layers": [None, None],
        "torch_dtype": torch_dtype, "transformers_version": TRANSFORMERS_VERSION, "use_fused_vision_backbone": True,
        "vision_backbone_id": f"dinosiglip-vit-so-{size if size in SIGLIP_IDS else 224}px",
    }
    if not (_is_released_tower(cfg.dino, DINO_ID) and _is_released_tower(cfg.siglip, siglip_id)):
        out[EXTRA_VISION_KEY] = {"featurizer": _tower_dict(cfg.dino), "fused_featurizer": _tower_dict(cfg.siglip)}
    return out


def preprocessor_config(cfg: OpenVLAConfig) -> Dict[str, Any]:
    """PrismaticImageProcessor settings: per tower 3xSxS input, bicubic resize-naive, its mean/std."""
    s = cfg.image_size
    towers = (cfg.dino, cfg.siglip)
    return {
        "auto_map": dict(PROCESSOR_AUTO_MAP), "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor", "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, s, s], [3, s, s]], "interpolations": ["bicubic", "bicubic"],
        "means": [list(t.mean) for t in towers], "stds": [list(t.std) for t in towers],
        "tvf_crop_params": [{"output_size": [s, s]}] * 2, "tvf_do_letterbox": False, "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": list(t.mean), "std": list(t.std)} for t in towers],
        "tvf_resize_params": [{"antialias": True, "interpolation": 3, "max_size": None, "size": [s, s]}] * 2,
        "use_fused_vision_backbone": True,
    }


# ----------------------------------------------------------------------------------------------
# OpenVLAConfig <-> the JSON dict vla_jax checkpoints store (`dataclasses.asdict`, meta["model"]).


def config_to_dict(cfg: OpenVLAConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
