"""OFT+'s `vision_backbone--{STEP}_checkpoint.pt`: the FiLM-wrapped vision backbone <-> our params.

What the file holds (OFT_REFERENCE.md §8 "Saved file" and "Inference"): upstream saves
`vla.module.vision_backbone.state_dict()` of the FiLM wrapper, installed after `get_peft_model`, so the
keys carry no DDP `module.` prefix and hold the WHOLE backbone of both towers:

    vision_backbone.{featurizer,fused_featurizer}.<timm key>        outside the blocks (patch_embed, pos_embed,
                                                                   cls/reg tokens, norm, attn_pool)
    vision_backbone.{...}.blocks.{i}.block.<timm block key>         the wrapped timm block i (all L blocks)
    vision_backbone.{...}.blocks.{i}.{scale,shift}.{weight [D, H], bias [D]}   block i's FiLM linears

`featurizer` is DINOv2 (params['dino']), `fused_featurizer` SigLIP (params['siglip']). LayerScale
params are named `scale_factor` (OpenVLA's HF code renames timm's `gamma`). Trained with LoRA (the
usual case), every Linear/Conv of the towers is a PEFT LoRA layer:
`<m>.base_layer.{weight,bias}`, `<m>.lora_A.default.weight` [r, in] ([r, 3, p, p] for the patch
Conv2d) and `<m>.lora_B.default.weight` [out, r] ([D, r, 1, 1]); the FiLM linears have no adapters.
A file without any `lora_A` key (full fine-tuning) has the plain timm names instead.

Import merges the adapters, W + (alpha / r) B @ A (computed in float64, stored as float32), with
alpha = min(r, 16) by default: upstream's loader re-creates LoRA with lora_alpha=min(lora_rank, 16)
(the value is not in the file). These tower weights REPLACE the merged model's (upstream's loader
loads this file over them). The FiLM linears go to params['film'] (`vla_jax.models.film`).
Export writes the towers' weights as `base_layer` with zero adapters of rank r (default 32, upstream's
lora_rank, whose loader needs the same rank), so the upstream loader and our importer both recover
the weights exactly; a released file's own un-merged A/B do not survive a round trip (their merged
effect does).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from vla_jax.hf import keys_vit
from vla_jax.hf.keys_openvla import DINO_PREFIX, SIGLIP_PREFIX, TensorRule
from vla_jax.models.config import OpenVLAConfig, ViTConfig

FILM = "vision_backbone"
TOWER_PREFIX = "vision_backbone."  # the merged model's tower keys, which the FiLM file replaces
TOWERS = (("dino", DINO_PREFIX), ("siglip", SIGLIP_PREFIX))
DEFAULT_EXPORT_RANK = 32  # upstream's lora_rank default; its loader's empty LoRA must have the file's rank
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.*)$")
LORA_A, LORA_B, BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer"


def default_alpha(rank: int) -> float:
    """Upstream's loader: LoraConfig(r=lora_rank, lora_alpha=min(lora_rank, 16))."""
    return float(min(rank, 16))


def _hf_key(k: str, tower: str) -> str:
    return k[: -len("gamma")] + "scale_factor" if tower == "dino" and k.endswith(".gamma") else k


def _tower_keys(cfg: ViTConfig, tower: str):
    """[(timm key with HF names, shape)] of one tower, blocks 0..L-1 (the last one included)."""
    return [(_hf_key(k, tower), tuple(s)) for k, s, _, _, _, _ in keys_vit.tensor_rules(cfg)]


def _wrapped(key: str) -> str:
    """timm key -> the FiLM wrapper's: `blocks.{i}.X` -> `blocks.{i}.block.X`."""
    m = _BLOCK_RE.match(key)
    return f"blocks.{m.group(1)}.block.{m.group(2)}" if m else key


def _lora_modules(keys) -> set:
    """Modules with a Linear/Conv weight (>= 2 dims): the ones PEFT's all-linear wraps in the towers."""
    return {k[: -len(".weight")] for k, s in keys if k.endswith(".weight") and len(s) >= 2}


def file_layout(cfg: OpenVLAConfig, rank: Optional[int]) -> Dict[str, Tuple[Tuple[int, ...], Optional[str]]]:
    """{file key: (shape, what)} of the whole file, in module order; `what` is the HF OpenVLA key the
    tensor feeds (None for the FiLM linears and the adapters). rank None: no LoRA (plain names)."""
    h = cfg.llama.hidden_size
    out: Dict[str, Tuple[Tuple[int, ...], Optional[str]]] = {}
    for tower, prefix in TOWERS:
        tcfg = getattr(cfg, tower)
        keys = _tower_keys(tcfg, tower)
        lora = _lora_modules(keys) if rank else set()
        for k, shape in keys:
            module, leaf = k.rsplit(".", 1) if "." in k else ("", k)  # cls_token, pos_embed: no module
            fk = _wrapped(k)
            if module in lora:
                fm = _wrapped(module)
                out[prefix + f"{fm}{BASE}.{leaf}"] = (shape, prefix + k)
                if leaf == "weight":
                    out[prefix + fm + LORA_A] = ((rank,) + shape[1:], None)
                    out[prefix + fm + LORA_B] = ((shape[0], rank) + (1,) * (len(shape) - 2), None)
            else:
                out[prefix + fk] = (shape, prefix + k)
        for i in range(tcfg.depth):
            for name in ("scale", "shift"):
                out[f"{prefix}blocks.{i}.{name}.weight"] = ((tcfg.width, h), None)
                out[f"{prefix}blocks.{i}.{name}.bias"] = ((tcfg.width,), None)
    return out


def read_rank(shapes: Mapping[str, Tuple[int, ...]], where: str) -> Optional[int]:
    """The LoRA rank of a FiLM file (every lora_A's first dim), None when it has no adapters."""
    ranks = {k: int(s[0]) for k, s in shapes.items() if k.endswith(LORA_A) and len(s) >= 2}
    if not ranks:
        return None
    distinct = sorted(set(ranks.values()))
    if len(distinct) != 1:
        k = next(k for k, r in ranks.items() if r != distinct[0])
        raise ValueError(f"{where}: LoRA ranks differ between modules ({distinct}; e.g. {k} has rank {ranks[k]})")
    return distinct[0]


def film_rules(cfg: OpenVLAConfig, qualify=lambda k: k) -> list:
    """TensorRules for the FiLM linears (keys `qualify(file key)`) -> params['film'] (torch [D, H] -> [H, D])."""
    out = []
    for tower, prefix in TOWERS:
        tcfg = getattr(cfg, tower)
        for i in range(tcfg.depth):
            last = i == tcfg.depth - 1
            for name in ("scale", "shift"):
                base = ("film", tower, "last_block" if last else "blocks", name)
                out.append(TensorRule(qualify(f"{prefix}blocks.{i}.{name}.weight"), (tcfg.width, cfg.llama.hidden_size),
                                      (base + ("kernel",),), None if last else i, lambda w: (w.T,), lambda a: a[0].T))
                out.append(TensorRule(qualify(f"{prefix}blocks.{i}.{name}.bias"), (tcfg.width,),
                                      (base + ("bias",),), None if last else i, lambda b: (b,), lambda a: a[0]))
    return out


def merge_lora(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """PEFT's merge of one layer, W + scale * B @ A (Linear: A [r, in], B [out, r]; Conv2d: A [r, C, p, p],
    B [out, r, 1, 1]), in float64 -> float32."""
    w64 = np.asarray(w, np.float64)
    r = a.shape[0]
    delta = np.asarray(b, np.float64).reshape(b.shape[0], r) @ np.asarray(a, np.float64).reshape(r, -1)
    return (w64 + scale * delta.reshape(w.shape)).astype(np.float32)


def hf_items(state, cfg: OpenVLAConfig, *, alpha: Optional[float] = None,
             qualify=lambda k: k) -> Iterator[Tuple[str, np.ndarray]]:
    """A FiLM file (`oft_files.StateFile`, keys/shapes already checked against `file_layout`) -> items:
    the towers' tensors under their HF OpenVLA keys (adapters merged; read one module at a time) and
    the FiLM linears under `qualify(file key)` (see `film_rules`)."""
    rank = read_rank(state.shapes, state.path)
    scale = (default_alpha(rank) if alpha is None else float(alpha)) / rank if rank else 0.0
    for fk, (_, hf_key) in file_layout(cfg, rank).items():
        if hf_key is None:
            if fk.endswith((LORA_A, LORA_B)):
                continue
            yield qualify(fk), state.load(fk)
        elif rank and fk.endswith(BASE + ".weight"):
            m = fk[: -len(BASE + ".weight")]
            yield hf_key, merge_lora(state.load(fk), state.load(m + LORA_A), state.load(m + LORA_B), scale)
        else:
            yield hf_key, state.load(fk)


def _leaf(tree: Mapping, path: Tuple[str, ...], needed_for: str):
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            raise ValueError(f"params lack film/{'/'.join(path)} (needed for {FILM} {needed_for})")
        node = node[p]
    return np.asarray(node)


def params_to_state(hf_vision: Mapping[str, np.ndarray], film: Mapping, cfg: OpenVLAConfig,
                    rank: Optional[int] = DEFAULT_EXPORT_RANK) -> Dict[str, np.ndarray]:
    """The file's state dict from the towers' tensors under their HF OpenVLA keys (`hf_vision`, e.g. from
    `keys_openvla.params_to_hf`) and params['film'] (numpy): base weights as they are, zero adapters of
    `rank` (float32; rank None: plain names, no adapters)."""
    film_arrays = {}
    for r in film_rules(cfg):
        arr = _leaf(film, r.leaves[0][1:], r.key)
        want = (r.shape[1], r.shape[0]) if len(r.shape) == 2 else r.shape
        got = arr.shape if r.layer is None else arr.shape[1:]
        if tuple(got) != tuple(want):
            raise ValueError(f"params film/{'/'.join(r.leaves[0][1:])} has shape {list(arr.shape)}; {FILM} {r.key} "
                             f"needs {list(want)} per block (torch {list(r.shape)})")
        film_arrays[r.key] = np.ascontiguousarray(r.to_hf((arr if r.layer is None else arr[r.layer],)))
    out = {}
    for fk, (shape, hf_key) in file_layout(cfg, rank).items():
        if hf_key is not None:
            if hf_key not in hf_vision:
                raise ValueError(f"the tower params lack {hf_key} (needed for {FILM} {fk})")
            out[fk] = np.asarray(hf_vision[hf_key])
        elif fk in film_arrays:
            out[fk] = film_arrays[fk]
        else:  # an adapter: zero, so that W + (alpha / r) B @ A == W exactly
            out[fk] = np.zeros(shape, np.float32)
    return out
