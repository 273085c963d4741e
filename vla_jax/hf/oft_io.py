"""Released OpenVLA-OFT checkpoints in and out: `python -m vla_jax.hf import-oft` / `export-oft`.

The OFT layout (OFT_REFERENCE.md §9 "Saved checkpoints"): one folder with the LoRA-merged HF OpenVLA
model (config.json, model*.safetensors, tokenizer), `dataset_statistics.json` (the fine-tuning data's
statistics, which replace the model's `norm_stats` as upstream's loader does), and the extra modules
`action_head--STEP_checkpoint.pt` and `proprio_projector--STEP_checkpoint.pt` (`oft_files`,
`oft_layout`), and for OFT+ `vision_backbone--STEP_checkpoint.pt`, the FiLM-wrapped towers (`oft_film`:
their weights, LoRA merged, replace the merged model's; the FiLM linears become params['film']). None of OFT's runtime settings is stored there (§7, §9 "config.json"): the chunk size
K and the cameras are given by the user; the action dimension D and the proprio dimension P follow
from the files' shapes; the head is 'l1' when an action head file is present, else 'tokens'
(discrete parallel decoding).

Import writes a vla_jax workdir (step 0) whose model config has parallel decoding, chunk K, the head,
the number of cameras and P, and whose batch_spec carries the camera names, P and the action codec.
Export writes the OFT layout back: the HF model files (`exporter`), dataset_statistics.json, and the
extra modules as safetensors with the released key names (`module.`-prefixed; the FiLM backbone
unprefixed, its towers with zero LoRA adapters, see `oft_film`); no .pt is written
(torch is not a dependency of vla_jax; see `oft_files`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from vla_jax.hf import config as hfc
from vla_jax.hf import importer, oft_film, oft_files, oft_layout
from vla_jax.hf.outdir import atomic_dir, check_out_dir
from vla_jax.models.config import OpenVLAConfig, config_from_dict

SOURCE_FORMAT = "openvla-oft"
# Text tokens beyond the K x D action slots and </s> that the recorded text length leaves for BOS and
# the prompt: 128 in all for LIBERO's K=8, D=7, as configs/oft.py.
PROMPT_ROOM = 71
# Upstream's dtypes (OFT_REFERENCE.md §6b, §7): the L1 head is saved in bf16, the proprio projector
# is trained and saved in fp32.
DEFAULT_HEAD_DTYPE, DEFAULT_PROPRIO_DTYPE = "bfloat16", "float32"
# The FiLM backbone file: float32 keeps every exported value exact (upstream's file mixes bf16 towers
# and fp32 FiLM linears; its loader casts the whole backbone to bf16).
DEFAULT_FILM_DTYPE = "float32"
STATS_KEYS = ("q01", "q99", "min", "max")


def default_text_len(chunk_size: int, action_dim: int) -> int:
    return chunk_size * action_dim + 1 + PROMPT_ROOM


def _read_stats(oft_dir: str) -> Dict[str, Any]:
    """dataset_statistics.json alone: upstream's loader sets `vla.norm_stats` to it (config.json's
    norm_stats are the base model's pretraining statistics)."""
    path = os.path.join(oft_dir, importer.STATS_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{oft_dir} has no {importer.STATS_FILE}; an OpenVLA-OFT checkpoint carries the statistics "
                         f"of its fine-tuning data there (needed to un-normalize actions and normalize proprio)")
    stats = hfc.read_json(path)
    if not isinstance(stats, dict) or not stats:
        raise ValueError(f"{path} holds no dataset entries")
    return stats


def _check_stats(stats: Mapping[str, Any], path: str, action_dim: int, proprio_dim: Optional[int]) -> None:
    """Every entry: action q01/q99 of length D; with proprio, proprio q01/q99/min/max of length P."""
    for name, entry in stats.items():
        action = entry.get("action") if isinstance(entry, dict) else None
        if not isinstance(action, dict) or any(len(action.get(k) or ()) != action_dim for k in ("q01", "q99")):
            got = {k: len(action.get(k) or ()) for k in ("q01", "q99")} if isinstance(action, dict) else action
            raise ValueError(f"{path}: [{name!r}]['action'] must hold q01 and q99 of length {action_dim} (the action "
                             f"dimension of the model's action head / config), got {got}")
        if proprio_dim is None:
            continue
        proprio = entry.get("proprio")
        if not isinstance(proprio, dict) or any(len(proprio.get(k) or ()) != proprio_dim for k in STATS_KEYS):
            got = {k: len(proprio.get(k) or ()) for k in STATS_KEYS} if isinstance(proprio, dict) else proprio
            raise ValueError(f"{path}: [{name!r}]['proprio'] must hold {list(STATS_KEYS)} of length {proprio_dim} "
                             f"(the proprio projector's input), got {got}")


def oft_model_config(base: OpenVLAConfig, *, chunk_size: int, action_dim: int, head: str, num_images: int,
                     proprio_dim: Optional[int], film: bool = False) -> OpenVLAConfig:
    """The released model's config with OFT's runtime settings (parallel decoding, K, head, cameras, P,
    FiLM when the folder has the FiLM backbone file)."""
    try:
        return dataclasses.replace(base, parallel_decoding=True, chunk_size=chunk_size, action_head=head,
                                   action_dim=action_dim, num_images=num_images, proprio_dim=proprio_dim, film=film)
    except ValueError as e:
        raise ValueError(f"the OpenVLA-OFT model config is invalid: {e}") from None


def _refuse_unsupported(files: Mapping[str, oft_files.ComponentFile]) -> None:
    if oft_layout.DIFFUSION in files:
        raise ValueError(f"{files[oft_layout.DIFFUSION].path}: the diffusion action head is not supported (only "
                         f"the L1 head and discrete action tokens)")


@dataclasses.dataclass
class OFTFolder:
    """What an OFT folder holds, read without touching the weights' data."""

    hf: importer.HFCheckpoint
    step: Optional[str]
    states: Dict[str, oft_files.StateFile]
    stats: Dict[str, Any]
    geometry: oft_layout.Geometry
    film_rank: Optional[int] = None  # LoRA rank of the FiLM file's towers (None: no adapters or no file)

    @property
    def film(self) -> bool:
        return oft_layout.FILM in self.states

    @property
    def head(self) -> str:
        return "l1" if oft_layout.ACTION_HEAD in self.states else "tokens"


def read_oft_dir(oft_dir: str, *, step: Optional[str] = None, allow_pickle: bool = False) -> OFTFolder:
    """Headers only: the HF model, the extra files of one step (checked against their key tables) and the
    statistics (checked against D and P). ValueError naming the file and key on any mismatch."""
    if not os.path.isdir(oft_dir):
        raise ValueError(f"OpenVLA-OFT checkpoint folder {oft_dir} does not exist (or is not a folder)")
    step, files = oft_files.select(oft_dir, step)
    _refuse_unsupported(files)
    states = {c: oft_files.read_state(f, allow_pickle) for c, f in files.items()}
    ck = importer.read_hf_dir(oft_dir)
    base_cfg = hfc.config_from_hf(ck.config_json, ck.preprocessor)
    hidden = int(base_cfg.llama.hidden_size)
    stats = _read_stats(oft_dir)
    action_dim = proprio_dim = None
    if oft_layout.ACTION_HEAD in states:
        s = states[oft_layout.ACTION_HEAD]
        action_dim, _, _ = oft_layout.head_geometry(s.shapes, hidden, s.path)
    if oft_layout.PROPRIO in states:
        s = states[oft_layout.PROPRIO]
        proprio_dim = oft_layout.proprio_geometry(s.shapes, hidden, s.path)
    g = oft_layout.Geometry(hidden=hidden, action_dim=action_dim, proprio_dim=proprio_dim)
    for component, rules in oft_layout.component_rules(g).items():
        oft_layout.check_state(states[component].shapes, rules, states[component].path)
    film_rank = None
    if oft_layout.FILM in states:
        s = states[oft_layout.FILM]
        film_rank = oft_film.read_rank(s.shapes, s.path)
        want = [oft_layout.TensorRule(k, shape, (), None, None, None)
                for k, (shape, _) in oft_film.file_layout(base_cfg, film_rank).items()]
        oft_layout.check_state(s.shapes, want, s.path, prefix="")  # upstream saves it unprefixed
    stats_path = os.path.join(oft_dir, importer.STATS_FILE)
    _check_stats(stats, stats_path, action_dim or hfc.action_dim_from_stats(stats), proprio_dim)
    return OFTFolder(hf=ck, step=step, states=states, stats=stats, geometry=g, film_rank=film_rank)


def _qualified(component: str, key: str) -> str:
    return f"{component}:{key}"


def import_oft(oft_dir: str, out_dir: str, *, chunk_size: int, cameras: Sequence[str], step: Optional[str] = None,
               allow_pickle: bool = False, param_dtype: Optional[str] = None, tokenizer: Optional[str] = None,
               text_len: Optional[int] = None, overwrite: bool = False, film_lora_alpha: Optional[float] = None,
               log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """A released OpenVLA-OFT folder -> vla_jax workdir `out_dir`. Returns a summary (config, files, timings).

    chunk_size: K (upstream's NUM_ACTIONS_CHUNK: 8 LIBERO, 25 ALOHA, 5 Bridge); cameras: the camera
    names in pixel order, primary first (upstream's num_images_in_input is their count);
    param_dtype: None keeps the merged model's storage dtype; text_len: the recorded text length
    (default K * D + 1 + 71). Only .pt files need `allow_pickle`. film_lora_alpha: the LoRA alpha of the
    FiLM file's adapters (not stored in it; default min(r, 16), upstream's loader).
    """
    from vla_jax.hf import import_checkpoint as ic

    check_out_dir(out_dir, overwrite)
    cameras = tuple(str(c) for c in cameras)
    if not cameras or len(set(cameras)) != len(cameras) or not all(cameras):
        raise ValueError(f"cameras={list(cameras)}: expected distinct, non-empty camera names, primary first")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected an integer >= 1 (K, actions per chunk)")
    folder = read_oft_dir(oft_dir, step=step, allow_pickle=allow_pickle)
    ck, g = folder.hf, folder.geometry
    base = ck.config_json, ck.preprocessor
    action_dim = g.action_dim or hfc.action_dim_from_stats(folder.stats)
    cfg = hfc.config_from_hf(*base, norm_stats=folder.stats, param_dtype=param_dtype or ck.storage_dtype,
                             source=os.path.join(ck.path, importer.CONFIG_FILE))
    cfg = oft_model_config(cfg, chunk_size=chunk_size, action_dim=action_dim, head=folder.head,
                           num_images=len(cameras), proprio_dim=g.proprio_dim, film=folder.film)
    tok = ic._resolve_tokenizer(tokenizer, ck.tokenizer_path, oft_dir)
    text_len = int(text_len) if text_len is not None else default_text_len(chunk_size, action_dim)
    if text_len < chunk_size * action_dim + 4:
        raise ValueError(f"text_len={text_len} leaves no room for BOS, a prompt, 29871, the {chunk_size} x "
                         f"{action_dim} action slots and </s>; give at least {chunk_size * action_dim + 4}")

    rules = oft_layout.component_rules(g)
    extra_rules = [dataclasses.replace(r, key=_qualified(c, r.key)) for c, rs in rules.items() for r in rs]
    for c, s in folder.states.items():
        if s.storage_dtype != cfg.param_dtype:
            log(f"{os.path.basename(s.path)} is stored as {s.storage_dtype}; its params are kept as {cfg.param_dtype} "
                f"like the model's" + (" (--param_dtype=float32 keeps every value exact)"
                                       if cfg.param_dtype != "float32" else ""))

    def component_items(c):
        for k, a in folder.states[c].items([r.key for r in rules[c]]):
            yield _qualified(c, k), a

    if folder.film:  # the FiLM file's towers replace the merged model's (upstream's loader does the same)
        extra_rules += oft_film.film_rules(cfg, qualify=lambda k: _qualified(oft_layout.FILM, k))
        if folder.film_rank:
            alpha = oft_film.default_alpha(folder.film_rank) if film_lora_alpha is None else float(film_lora_alpha)
            log(f"{os.path.basename(folder.states[oft_layout.FILM].path)}: merging its LoRA adapters (rank "
                f"{folder.film_rank}, alpha {alpha:g}) into the tower weights, which replace the merged model's")

    def hf_items():
        for k, a in importer.read_items(ck.tensors):
            if not (folder.film and k.startswith(oft_film.TOWER_PREFIX)):
                yield k, a

    def items():
        film = (oft_film.hf_items(folder.states[oft_layout.FILM], cfg, alpha=film_lora_alpha,
                                  qualify=lambda k: _qualified(oft_layout.FILM, k)) if folder.film else ())
        return itertools.chain(hf_items(), *(component_items(c) for c in rules), film)

    source = {"format": SOURCE_FORMAT, "path": os.path.abspath(oft_dir), "step": folder.step,
              "storage_dtype": ck.storage_dtype,
              "files": {c: os.path.basename(s.path) for c, s in folder.states.items()},
              "file_dtypes": {c: s.storage_dtype for c, s in folder.states.items()}}
    if folder.film:
        source["film_lora_rank"] = folder.film_rank
        source["film_lora_alpha"] = (None if not folder.film_rank else oft_film.default_alpha(folder.film_rank)
                                     if film_lora_alpha is None else float(film_lora_alpha))
    tensors = dict(ck.tensors)
    summary = ic._convert_and_write(out_dir, cfg, tensors, items, folder.stats, tok, source, ck.path, overwrite, log,
                                    extra_rules=extra_rules,
                                    workdir_options={"text_len": text_len, "cameras": cameras,
                                                     "proprio_dim": g.proprio_dim})
    summary.update(step=folder.step, files=source["files"], cameras=cameras, proprio_dim=g.proprio_dim,
                   text_len=text_len, film=folder.film, film_lora_rank=folder.film_rank)
    return summary


def describe_oft(cfg: OpenVLAConfig, summary: Mapping[str, Any]) -> str:
    files = summary.get("files") or {}
    head = (f"L1 head (action_dim {cfg.action_dim}, {files[oft_layout.ACTION_HEAD]})" if cfg.action_head == "l1"
            else f"discrete action tokens (no action head file; action_dim {cfg.action_dim})")
    proprio = (f"proprio_dim {summary['proprio_dim']} ({files[oft_layout.PROPRIO]})"
               if summary.get("proprio_dim") is not None else "no proprio")
    film = ""
    if cfg.film:
        rank = summary.get("film_lora_rank")
        film = f"FiLM ({files[oft_layout.FILM]}" + (f", LoRA rank {rank} merged" if rank else "") + "), "
    return (f"OpenVLA-OFT step {summary.get('step')}: parallel decoding, chunk {cfg.chunk_size}, {head}, {proprio}, {film}"
            f"cameras {list(summary['cameras'])}, text length {summary['text_len']}")


# ----------------------------------------------------------------------------------------------
# Export


def _np_dtype(name: str) -> np.dtype:
    from vla_jax.hf.exporter import EXPORT_DTYPES

    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype {name!r}; expected one of {EXPORT_DTYPES}")
    return np.dtype(jnp.dtype(name))


def _export_step(reader: Any, step: Optional[str]) -> str:
    """--step, else the step of the OFT folder the checkpoint was imported from, else its training step."""
    if step is not None:
        s = str(step)
    else:
        source = ((reader.assets.get("config") or {}).get("source") or {})
        s = str(source["step"]) if source.get("format") == SOURCE_FORMAT and source.get("step") else \
            str(reader.assets["meta"]["step"])
    if not oft_files.FILE_RE.match(oft_files.file_name(oft_layout.ACTION_HEAD, s)):
        raise ValueError(f"step {s!r}: expected digits or 'latest' (the STEP of action_head--STEP_checkpoint)")
    return s


def _film_state(reader: Any, cfg: OpenVLAConfig, rank: Optional[int]) -> Dict[str, np.ndarray]:
    """The FiLM backbone file's state dict: the towers as the HF export writes them (a trained LoRA tree
    merged in, as `exporter` does), params['film'], zero adapters of `rank` (`oft_film`)."""
    from flax import traverse_util

    from vla_jax.hf import exporter, keys_vit

    towers = {t: reader.read_tree((t,)) for t in ("dino", "siglip")}
    if any(p[0] == "lora" for p in reader.shapes):
        base = {k: v for k, v in reader.abstract().items() if k not in ("lora", "film") + oft_layout.SUPPORTED}
        merge = exporter._LoraMerger(base, reader.read_tree(("lora",)), exporter._lora_config_from_assets(reader.assets))
        flat = traverse_util.flatten_dict(towers)
        towers = traverse_util.unflatten_dict({p: merge(p, np.asarray(w)) for p, w in flat.items()})
    hf = {}
    for tower, prefix in oft_film.TOWERS:
        timm = keys_vit.flax_to_timm(towers[tower], getattr(cfg, tower), layer_scale_key="scale_factor")
        hf.update({prefix + k: v for k, v in timm.items()})
    return oft_film.params_to_state(hf, reader.read_tree(("film",)), cfg, rank)


def _film_export_rank(reader: Any, rank: Any) -> Optional[int]:
    """--film_lora_rank: 'auto' = the imported file's rank (none if it had no adapters), else 32."""
    if rank != "auto":
        r = None if rank in (None, 0, "0", "none") else int(rank)
        if r is not None and r < 1:
            raise ValueError(f"film_lora_rank={rank!r}: expected 'auto', 0 (no adapters) or a rank >= 1")
        return r
    source = ((reader.assets.get("config") or {}).get("source") or {})
    if source.get("format") == SOURCE_FORMAT and "film_lora_rank" in source:
        return source["film_lora_rank"]
    return oft_film.DEFAULT_EXPORT_RANK


def export_oft(ckpt_path: str, out_dir: str, *, dtype: str = "bfloat16", head_dtype: str = DEFAULT_HEAD_DTYPE,
               proprio_dtype: str = DEFAULT_PROPRIO_DTYPE, step: Optional[str] = None, tokenizer: Any = None,
               max_shard_size: Any = "5GB", overwrite: bool = False,
               remote_code: Optional[str] = None, film_dtype: str = DEFAULT_FILM_DTYPE,
               film_lora_rank: Any = "auto") -> Tuple[str, list]:
    """A vla_jax OpenVLA-OFT checkpoint -> the OFT layout in `out_dir`: the HF model files in `dtype`, the
    action head in `head_dtype` and the proprio projector in `proprio_dtype` (upstream's: bf16 / fp32) as
    `{component}--{STEP}_checkpoint.safetensors`; with FiLM also the FiLM backbone in `film_dtype`, its
    towers with zero adapters of rank `film_lora_rank` ('auto': the imported file's, else 32; 0: plain
    timm names, for a model fine-tuned without LoRA). Returns (STEP, file names)."""
    from vla_jax.hf import exporter
    from vla_jax.hf.checkpoint_io import ParamsReader

    reader = ParamsReader(ckpt_path)
    cfg = config_from_dict(reader.assets["meta"]["model"])
    where = str(reader.step_dir)
    if not cfg.parallel_decoding:
        raise ValueError(f"{where} is not an OpenVLA-OFT checkpoint (its model config has parallel_decoding=False); "
                         f"export it with `python -m vla_jax.hf export`")
    roots = {p[0] for p in reader.shapes}
    if (cfg.action_head == "l1") != (oft_layout.ACTION_HEAD in roots):
        raise ValueError(f"{where}: model config action_head={cfg.action_head!r} but the params "
                         f"{'hold' if oft_layout.ACTION_HEAD in roots else 'lack'} 'action_head'")
    proprio_dim = None
    if oft_layout.PROPRIO in roots:
        kernel = reader.shapes.get((oft_layout.PROPRIO, "fc1", "kernel"))
        if kernel is None or len(kernel.shape) != 2:
            raise ValueError(f"{where}: params lack proprio_projector/fc1/kernel [P, H]")
        proprio_dim = int(kernel.shape[0])
    configured = cfg.proprio_dim
    if configured != proprio_dim:
        raise ValueError(f"{where}: model config proprio_dim={configured} but the params' proprio projector takes "
                         f"{proprio_dim}")
    g = oft_layout.Geometry(hidden=cfg.llama.hidden_size, proprio_dim=proprio_dim,
                            action_dim=cfg.action_dim if cfg.action_head == "l1" else None)
    if cfg.film != ("film" in roots):
        raise ValueError(f"{where}: model config film={cfg.film} but the params {'hold' if 'film' in roots else 'lack'} "
                         f"'film' (OFT+'s FiLM linears)")
    dtypes = {oft_layout.ACTION_HEAD: _np_dtype(head_dtype), oft_layout.PROPRIO: _np_dtype(proprio_dtype),
              oft_layout.FILM: _np_dtype(film_dtype)}
    _np_dtype(dtype)
    stats = reader.assets.get("dataset_statistics") or {}
    _check_stats(stats, f"{where} dataset_statistics asset", cfg.action_dim, proprio_dim)
    s = _export_step(reader, step)
    states = {c: oft_layout.params_to_state(c, {c: reader.read_tree((c,))}, g)
              for c in oft_layout.component_rules(g)}  # converted (and checked) before anything is written
    if cfg.film:
        states[oft_layout.FILM] = _film_state(reader, cfg, _film_export_rank(reader, film_lora_rank))
    with atomic_dir(out_dir, overwrite) as tmp:
        files = []
        for c, state in states.items():
            name = oft_files.file_name(c, s)
            oft_files.write_state(os.path.join(tmp, name), {k: v.astype(dtypes[c]) for k, v in state.items()},
                                  prefix="" if c == oft_layout.FILM else oft_layout.DDP_PREFIX)
            files.append(name)
        files += exporter.write_checkpoint_files(reader, tmp, dtype=dtype, tokenizer=tokenizer,
                                                 max_shard_size=max_shard_size, remote_code=remote_code,
                                                 skip_roots=oft_layout.SUPPORTED + ("film",))
    return s, files
