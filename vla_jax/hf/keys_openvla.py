"""The rename table between the HF OpenVLA checkpoint (`openvla/openvla-7b` key names) and our params.

HF key prefixes (OPENVLA_REFERENCE.md §8):
  vision_backbone.featurizer.*        -> params['dino']      (timm DINOv2 names, `.gamma` -> `.scale_factor`)
  vision_backbone.fused_featurizer.*  -> params['siglip']    (timm SigLIP names)
  projector.fc{1,2,3}.{weight,bias}   -> params['projector']['fc{1,2,3}']
  language_model.*                    -> params['llm']       (transformers LlamaForCausalLM names)
Per-tower / per-LLM layouts (transposes, qkv split, layer stacking) are in `keys_vit`
(`timm_to_flax`/`flax_to_timm`) and `keys_llama` (`hf_to_flax`/`flax_to_hf`).

Two forms: whole-dict (`hf_to_params`, `params_to_hf`; small models, tests) and per tensor
(`openvla_rules` -> `TensorRule`s, one per HF tensor; what vla_jax.hf streams 7B checkpoints with).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from vla_jax.hf import keys_llama, keys_vit
from vla_jax.models.config import OpenVLAConfig

DINO_PREFIX = "vision_backbone.featurizer."
SIGLIP_PREFIX = "vision_backbone.fused_featurizer."
PROJECTOR_PREFIX = "projector."
LLM_PREFIX = "language_model."
PROJECTOR_LAYERS = ("fc1", "fc2", "fc3")


def _sub(state_dict: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _hf_dino_to_timm(sd):
    # HF renames timm's LayerScale `gamma` to `scale_factor` (transformers rewrites names containing "gamma").
    return {(k[: -len("scale_factor")] + "gamma" if k.endswith(".scale_factor") else k): v for k, v in sd.items()}


def _timm_dino_to_hf(sd):
    return {(k[: -len("gamma")] + "scale_factor" if k.endswith(".gamma") else k): v for k, v in sd.items()}


def hf_to_params(state_dict: Dict[str, np.ndarray], config: OpenVLAConfig) -> dict:
    """HF OpenVLA state dict (numpy, PyTorch layouts) -> our params pytree."""
    known = (DINO_PREFIX, SIGLIP_PREFIX, PROJECTOR_PREFIX, LLM_PREFIX)
    stray = [k for k in state_dict if not k.startswith(known)]
    if stray:
        raise ValueError(f"unexpected checkpoint keys (not under {known}): {stray[:5]}")
    proj = _sub(state_dict, PROJECTOR_PREFIX)
    projector = {}
    for name in PROJECTOR_LAYERS:
        projector[name] = {"kernel": np.ascontiguousarray(proj[f"{name}.weight"].T), "bias": proj[f"{name}.bias"]}
    return {
        "dino": keys_vit.timm_to_flax(_hf_dino_to_timm(_sub(state_dict, DINO_PREFIX)), config.dino),
        "siglip": keys_vit.timm_to_flax(_sub(state_dict, SIGLIP_PREFIX), config.siglip),
        "projector": projector,
        "llm": keys_llama.hf_to_flax(_sub(state_dict, LLM_PREFIX), config.llama),
    }


def params_to_hf(params: dict, config: OpenVLAConfig) -> Dict[str, np.ndarray]:
    """Our params pytree -> HF OpenVLA state dict with the released key names and PyTorch layouts."""
    out = {}
    out.update({DINO_PREFIX + k: v for k, v in _timm_dino_to_hf(keys_vit.flax_to_timm(params["dino"], config.dino)).items()})
    out.update({SIGLIP_PREFIX + k: v for k, v in keys_vit.flax_to_timm(params["siglip"], config.siglip).items()})
    for name in PROJECTOR_LAYERS:
        layer = params["projector"][name]
        out[f"{PROJECTOR_PREFIX}{name}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        out[f"{PROJECTOR_PREFIX}{name}.bias"] = np.asarray(layer["bias"])
    out.update({LLM_PREFIX + k: v for k, v in keys_llama.flax_to_hf(params["llm"], config.llama).items()})
    return out


# ---------------------------------------------------------------------------------------------
# Per-tensor rules (streaming import/export of 7B checkpoints, one tensor at a time).


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one HF tensor maps onto our params.

    key / shape: the HF key and its PyTorch-layout shape.
    leaves: params paths from the root (e.g. ('llm', 'layers', 'mlp', 'up_proj', 'kernel')); a fused
      timm `qkv` feeds three leaves.
    layer: None for an unstacked leaf; else the index into the leading (scanned 'layers') axis of
      every leaf in `leaves`.
    to_flax: HF array -> tuple of arrays, one per leaf (the layer's slice when stacked).
    to_hf: tuple of arrays (one per leaf, sliced at `layer`) -> HF array.
    Both are transposes/reshapes only, so conversions are bit-exact in any dtype.
    """

    key: str
    shape: Tuple[int, ...]
    leaves: Tuple[Tuple[str, ...], ...]
    layer: Optional[int]
    to_flax: Callable
    to_hf: Callable


def _vit_rules(cfg, prefix: str, root: str, hf_names: bool) -> List[TensorRule]:
    out = []
    for key, shape, paths, layer, fwd, inv in keys_vit.tensor_rules(cfg):
        if hf_names and key.endswith(".gamma"):
            key = key[: -len("gamma")] + "scale_factor"
        out.append(TensorRule(prefix + key, tuple(shape), tuple((root,) + tuple(p) for p in paths), layer, fwd, inv))
    return out


def _llama_rule(hf_key: str, sub: str, table_key: str, path: tuple, kind: str, layer, cfg, root: str) -> TensorRule:
    # keys_llama.py keeps its layout table private; these are the same functions its whole-dict
    # conversion uses (tests check both paths agree).
    return TensorRule(hf_key, keys_llama._hf_shape(table_key, cfg), ((root,) + path,), layer,
                      lambda w, k=kind: (keys_llama._to_flax(w, k, cfg),),
                      lambda a, k=kind: keys_llama._to_hf(a[0], k, cfg))


def llama_rules(cfg, prefix: str = "", root: str = "llm") -> List[TensorRule]:
    """Rules for every tensor of an HF LlamaForCausalLM (keys `prefix + 'model.…'`, `prefix + 'lm_head.weight'`)."""
    out = []
    for key in keys_llama.hf_keys(cfg, prefix):
        sub = key[len(prefix):]
        m = keys_llama._LAYER_RE.fullmatch(sub)
        if m:
            path, kind = keys_llama._LAYER_TABLE[m.group(2)]
            out.append(_llama_rule(key, sub, m.group(2), ("layers",) + path, kind, int(m.group(1)), cfg, root))
        else:
            path, kind = keys_llama._TOP_TABLE[sub]
            out.append(_llama_rule(key, sub, sub, path, kind, None, cfg, root))
    return out


def vit_rules(cfg, prefix: str = "", root: str = "dino", hf_names: bool = False) -> List[TensorRule]:
    """Rules for a timm ViT tower; hf_names=True names LayerScale `.scale_factor` (HF OpenVLA)."""
    return _vit_rules(cfg, prefix, root, hf_names)


def projector_rules(config: OpenVLAConfig) -> List[TensorRule]:
    d_in, d_llm = config.vision_dim, config.llama.hidden_size
    outs = {"fc1": (4 * d_in, d_in), "fc2": (d_llm, 4 * d_in), "fc3": (d_llm, d_llm)}
    out = []
    for name in PROJECTOR_LAYERS:
        o, i = outs[name]
        out.append(TensorRule(f"{PROJECTOR_PREFIX}{name}.weight", (o, i), (("projector", name, "kernel"),), None,
                              lambda w: (w.T,), lambda a: a[0].T))
        out.append(TensorRule(f"{PROJECTOR_PREFIX}{name}.bias", (o,), (("projector", name, "bias"),), None,
                              lambda b: (b,), lambda a: a[0]))
    return out


def openvla_rules(config: OpenVLAConfig) -> List[TensorRule]:
    """Every tensor of the HF OpenVLA checkpoint, in module order (DINOv2, SigLIP, projector, LLM)."""
    return (vit_rules(config.dino, DINO_PREFIX, "dino", hf_names=True)
            + vit_rules(config.siglip, SIGLIP_PREFIX, "siglip")
            + projector_rules(config)
            + llama_rules(config.llama, LLM_PREFIX, "llm"))
