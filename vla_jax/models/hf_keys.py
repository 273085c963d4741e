"""The rename table between the HF OpenVLA checkpoint (`openvla/openvla-7b` key names) and our params.

HF key prefixes (OPENVLA_REFERENCE.md §8):
  vision_backbone.featurizer.*        -> params['dino']      (timm DINOv2 names, `.gamma` -> `.scale_factor`)
  vision_backbone.fused_featurizer.*  -> params['siglip']    (timm SigLIP names)
  projector.fc{1,2,3}.{weight,bias}   -> params['projector']['fc{1,2,3}']
  language_model.*                    -> params['llm']       (transformers LlamaForCausalLM names)
Per-tower / per-LLM layouts (transposes, qkv split, layer stacking) live next to the modules:
`vit.timm_to_flax`/`flax_to_timm` and `llama.hf_to_flax`/`flax_to_hf`.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from vla_jax.models import llama, vit
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
        "dino": vit.timm_to_flax(_hf_dino_to_timm(_sub(state_dict, DINO_PREFIX)), config.dino),
        "siglip": vit.timm_to_flax(_sub(state_dict, SIGLIP_PREFIX), config.siglip),
        "projector": projector,
        "llm": llama.hf_to_flax(_sub(state_dict, LLM_PREFIX), config.llama),
    }


def params_to_hf(params: dict, config: OpenVLAConfig) -> Dict[str, np.ndarray]:
    """Our params pytree -> HF OpenVLA state dict with the released key names and PyTorch layouts."""
    out = {}
    out.update({DINO_PREFIX + k: v for k, v in _timm_dino_to_hf(vit.flax_to_timm(params["dino"], config.dino)).items()})
    out.update({SIGLIP_PREFIX + k: v for k, v in vit.flax_to_timm(params["siglip"], config.siglip).items()})
    for name in PROJECTOR_LAYERS:
        layer = params["projector"][name]
        out[f"{PROJECTOR_PREFIX}{name}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"]).T)
        out[f"{PROJECTOR_PREFIX}{name}.bias"] = np.asarray(layer["bias"])
    out.update({LLM_PREFIX + k: v for k, v in llama.flax_to_hf(params["llm"], config.llama).items()})
    return out
