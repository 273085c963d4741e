"""Base components for training a VLA from scratch (OPENVLA_REFERENCE.md §7 "Starting point"):
timm DINOv2-reg and SigLIP safetensors + an HF Llama-2 safetensors folder -> OpenVLA params,
with a freshly initialised projector.

What OpenVLA does to these, reproduced here:
  * DINOv2's released pos_embed is 37x37 (518px); timm resamples it to the model grid (16x16 at
    224px) with bicubic, antialiased interpolation when it builds the tower (`resample_pos_embed`).
  * The tokenizer gets `<PAD>` (id = base vocab, 32000) and the embedding/lm_head are resized to
    the next multiple of 64 (32064 rows); transformers 4.40 fills the new rows with
    N(0, initializer_range) (`_init_weights` on the resized modules), so do we (seeded).
  * The projector is new: our FusedProjector init (lecun-normal kernels, zero biases) — PyTorch's
    default Linear init under torch.manual_seed(2176) cannot be reproduced without torch.
Every Llama value (rms_norm_eps 1e-5 for Llama-2-7b-hf, rope theta, sizes) comes from its config.json.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.hf import config as hfc
from vla_jax.hf import importer
from vla_jax.hf import safetensors_io as sio
from vla_jax.hf import keys_openvla
from vla_jax.models.config import OpenVLAConfig, ViTConfig, with_dtypes
from vla_jax.models.projector import FusedProjector

log = logging.getLogger(__name__)

# timm checkpoint entries OpenVLA's towers (num_classes=0) do not use.
TIMM_IGNORED = ("head.weight", "head.bias", "mask_token")


def resample_pos_embed(pos: np.ndarray, grid: int) -> np.ndarray:
    """[1, g*g, D] -> [1, grid*grid, D]: bicubic (a=-0.5), antialiased, in fp32, like timm's
    `resample_abs_pos_embed` (torch `F.interpolate(..., mode='bicubic', antialias=True)`)."""
    _, n, d = pos.shape
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"pos_embed has {n} positions, not a square grid")
    x = jnp.asarray(np.asarray(pos, np.float32)).reshape(g, g, d)
    y = jax.image.resize(x, (grid, grid, d), method="bicubic", antialias=True)
    return np.asarray(y).reshape(1, grid * grid, d).astype(pos.dtype)


def _tower_tensors(path: str, cfg: ViTConfig) -> Tuple[Dict[str, sio.TensorInfo], Dict[str, Any], Dict[str, Any]]:
    """Header of a timm tower file, ignorable keys dropped -> (tensors to read, the shapes they convert
    to (pos_embed resampled), transforms)."""
    infos, _ = sio.read_header(path)
    for k in TIMM_IGNORED:
        if infos.pop(k, None) is not None:
            log.info("%s: ignoring %s (not used by OpenVLA's towers)", path, k)
    transforms, converted = {}, dict(infos)
    pos = infos.get("pos_embed")
    n_pos = cfg.num_patches + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
    if pos is not None and len(pos.shape) == 3 and pos.shape[1] != n_pos:
        if not cfg.no_embed_class and cfg.num_prefix_tokens:
            raise ValueError(f"{path}: pos_embed has {pos.shape[1]} positions, expected {n_pos}; resampling is only "
                             f"implemented for towers whose prefix tokens have no position embedding")
        if math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]:
            raise ValueError(f"{path}: pos_embed has {pos.shape[1]} positions, expected {n_pos} (not a square grid)")
        log.info("%s: resampling pos_embed %s -> %dx%d", path, list(pos.shape), cfg.grid, cfg.grid)
        converted["pos_embed"] = dataclasses.replace(pos, shape=(1, n_pos, pos.shape[2]))
        transforms["pos_embed"] = lambda w: resample_pos_embed(w, cfg.grid)
    return infos, converted, transforms


def _vocab_padding(rows: int, width: int, std: float, seed: int):
    """HF tensor [V, D] -> [rows, D], new rows ~ N(0, std) from `seed` (stored dtype kept)."""
    rng = np.random.default_rng(seed)

    def pad(w):
        extra = (rng.standard_normal((rows - w.shape[0], width), dtype=np.float32) * np.float32(std)).astype(w.dtype)
        return np.concatenate([w, extra], axis=0)
    return pad


def base_config(dino: ViTConfig, siglip: ViTConfig, llm_config: Mapping[str, Any], *, n_action_bins: int = 256,
                pad_to_multiple_of: int = 64, llm_max_length: int = 2048, dtype: str = "bfloat16",
                param_dtype: str = "float32", source: str = "config.json") -> OpenVLAConfig:
    """OpenVLAConfig from the towers and an HF Llama config.json (vocab grown by `<PAD>`, padded)."""
    if llm_config.get("model_type") != "llama":
        raise ValueError(f"{source}: model_type is {llm_config.get('model_type')!r}, expected 'llama'")
    tc = dict(hfc.LLAMA_DEFAULTS, **llm_config)
    base_vocab = int(tc["vocab_size"])
    rows = -(-(base_vocab + 1) // pad_to_multiple_of) * pad_to_multiple_of
    llm = hfc.llama_config_from_hf(dict(tc, vocab_size=rows), source, llm_max_length + dino.num_patches)
    cfg = OpenVLAConfig(dino=dino, siglip=siglip, llama=llm, base_vocab_size=base_vocab, pad_token_id=base_vocab,
                        bos_token_id=int(tc["bos_token_id"]), eos_token_id=int(tc["eos_token_id"]),
                        n_action_bins=n_action_bins)
    return with_dtypes(cfg, dtype, param_dtype)


def tower_config(timm_id: str, image_size: int) -> ViTConfig:
    if timm_id not in hfc.TIMM_TOWERS:
        raise ValueError(f"unknown timm model id {timm_id!r}; known: {sorted(hfc.TIMM_TOWERS)}")
    return ViTConfig(**dict(hfc.TIMM_TOWERS[timm_id], image_size=image_size))


def load_base_components(dino_file: str, siglip_file: str, llm_dir: str, *, image_size: int = 224,
                         dino: Optional[ViTConfig] = None, siglip: Optional[ViTConfig] = None,
                         n_action_bins: int = 256, pad_to_multiple_of: int = 64, param_dtype: Optional[str] = None,
                         seed: int = 0, mesh=None) -> Tuple[OpenVLAConfig, dict, Optional[str]]:
    """-> (OpenVLAConfig, params, the Llama folder's tokenizer.model or None).

    dino / siglip: tower geometry (default: the released timm models at `image_size`).
    param_dtype None keeps the Llama checkpoint's storage dtype.
    """
    dino = dino or tower_config(hfc.DINO_ID, image_size)
    siglip = siglip or tower_config(hfc.SIGLIP_IDS.get(image_size, hfc.SIGLIP_IDS[224]), image_size)
    llm_cfg_path = os.path.join(llm_dir, "config.json")
    if not os.path.isfile(llm_cfg_path):
        raise ValueError(f"{llm_dir} has no config.json (expected an HF Llama-2 folder)")
    llm_json = hfc.read_json(llm_cfg_path)
    llm_tensors = sio.index_tensors(llm_dir)
    storage = max(("BF16", "F32", "F16"), key=lambda d: sum(t.nbytes for t in llm_tensors.values() if t.dtype == d))
    cfg = base_config(dino, siglip, llm_json, n_action_bins=n_action_bins, pad_to_multiple_of=pad_to_multiple_of,
                      param_dtype=param_dtype or importer.STORAGE_DTYPES[storage], source=llm_cfg_path)
    targets = importer.targets_for(importer.abstract_params(cfg), mesh)
    params = {}
    for name, file, tower in (("dino", dino_file, cfg.dino), ("siglip", siglip_file, cfg.siglip)):
        infos, converted, transforms = _tower_tensors(file, tower)
        rules = keys_openvla.vit_rules(tower, "", name)
        importer.check_tensors(converted, rules, file)
        items = ((i.key, a) for i, a in sio.iter_tensors(sio.read_order(infos.values())))
        params.update(importer.stream_into(items, rules, {name: targets[name]}, file, transforms))

    base_llm = dataclasses.replace(cfg.llama, vocab_size=cfg.base_vocab_size)
    rules = keys_openvla.llama_rules(base_llm, "", "llm")
    importer.check_tensors(llm_tensors, rules, llm_dir)
    std = float(dict(hfc.LLAMA_DEFAULTS, **llm_json)["initializer_range"])
    rows, width = cfg.llama.vocab_size, cfg.llama.hidden_size
    transforms = {"model.embed_tokens.weight": _vocab_padding(rows, width, std, seed),
                  "lm_head.weight": _vocab_padding(rows, width, std, seed + 1)}
    params.update(importer.stream_into(importer.read_items(llm_tensors), rules, {"llm": targets["llm"]}, llm_dir,
                                       transforms))

    proj = FusedProjector(vision_dim=cfg.vision_dim, llm_dim=cfg.llama.hidden_size, dtype=cfg.dtype,
                          param_dtype=cfg.param_dtype)
    shardings = jax.tree.map(lambda t: t.sharding, targets["projector"])
    init = jax.jit(lambda r: nn.meta.unbox(proj.init(r, jnp.zeros((1, 1, cfg.vision_dim), jnp.float32))["params"]),
                   out_shardings=shardings)
    params["projector"] = init(jax.random.PRNGKey(seed))
    tok = os.path.join(llm_dir, "tokenizer.model")
    return cfg, params, tok if os.path.isfile(tok) else None
