"""`python -m vla_jax.hf import`: an HF OpenVLA folder -> a vla_jax orbax checkpoint with assets.

The output is a workdir (`OUT/checkpoints/0/...`, see `checkpoint_io`) that training
(`init_from=OUT`), evaluation and serving load like any training checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from vla_jax.hf import checkpoint_io
from vla_jax.hf import config as hfc
from vla_jax.hf import importer, oft_files
from vla_jax.hf.outdir import atomic_dir, check_out_dir
from vla_jax.models.config import PRESETS, OpenVLAConfig, with_dtypes


def matching_preset(cfg: OpenVLAConfig) -> Optional[str]:
    """The name of the preset with exactly this geometry and numerics (dtypes aside), if any."""
    ours = importer.config_geometry(cfg)
    for name, preset in PRESETS.items():
        if importer.config_geometry(with_dtypes(preset, cfg.dtype, cfg.param_dtype)) == ours:
            return name
    return None


def tokenizer_asset(tokenizer_path: str, cfg: OpenVLAConfig, max_len: Optional[int] = None) -> Dict[str, Any]:
    """checkpoints.tokenizer_asset for this model, after checking the tokenizer fits it. max_len: the
    text length (BOS..EOS) the asset records; None keeps VLATokenizer's default."""
    from vla_jax import checkpoints as ckpt_lib
    from vla_jax.tokenizer import VLATokenizer

    kw = {} if max_len is None else {"max_len": int(max_len)}
    tok = VLATokenizer.from_file(tokenizer_path, n_bins=cfg.n_action_bins, action_dim=cfg.action_dim, **kw)
    t = tok.tokenizer
    if (t.vocab_size, t.pad_id, t.bos_id, t.eos_id) != (cfg.base_vocab_size, cfg.pad_token_id, cfg.bos_token_id,
                                                        cfg.eos_token_id):
        raise ValueError(f"tokenizer {tokenizer_path} (vocab {t.vocab_size}, pad {t.pad_id}, bos {t.bos_id}, "
                         f"eos {t.eos_id}) does not fit the model (base vocab {cfg.base_vocab_size}, pad "
                         f"{cfg.pad_token_id}, bos {cfg.bos_token_id}, eos {cfg.eos_token_id})")
    return ckpt_lib.tokenizer_asset(tok, cfg.action_dim)


def write_workdir(cfg: OpenVLAConfig, params: Any, norm_stats: Mapping[str, Any], tokenizer_path: str,
                  source: Dict[str, Any], workdir: str, *, text_len: Optional[int] = None,
                  cameras: Iterable[str] = ("primary",), proprio_dim: Optional[int] = None) -> str:
    """Writes params + assets as a vla_jax workdir (step 0). Returns the step folder. Its batch_spec:
    the tokenizer asset's text length (`text_len`, else the tokenizer default), one dataset per
    statistics entry, `cameras` and `proprio_dim`, no test-time crop (an HF folder does not record its
    training augmentation)."""
    from vla_jax import checkpoints as ckpt_lib
    from vla_jax.spec import BatchSpec

    cfg_dict = hfc.config_to_dict(cfg)
    tok = tokenizer_asset(tokenizer_path, cfg, text_len)
    spec = BatchSpec.for_model(cfg, tok["max_seq_len"], num_datasets=max(1, len(norm_stats)), cameras=tuple(cameras),
                               proprio_dim=proprio_dim)
    assets = ckpt_lib.build_assets(config=checkpoint_io.config_asset(source, matching_preset(cfg), cfg_dict),
                                   dataset_statistics=dict(norm_stats), tokenizer=tok, batch_spec=spec)
    return checkpoint_io.write_params_checkpoint(workdir, params, assets, cfg_dict)


def _resolve_tokenizer(explicit: Optional[str], found: Optional[str], where: str) -> str:
    tok = explicit or found
    if tok is None:
        raise ValueError(f"{where} has no tokenizer.model; pass --tokenizer=PATH (the Llama-2 SentencePiece model)")
    if os.path.isdir(tok):
        tok = os.path.join(tok, "tokenizer.model")
    if not os.path.isfile(tok):
        raise ValueError(f"tokenizer {tok} does not exist")
    return tok


def _storage_dtype(tensors: Mapping[str, Any], where: str) -> str:
    sizes: Dict[str, int] = {}
    for t in tensors.values():
        sizes[t.dtype] = sizes.get(t.dtype, 0) + math.prod(t.shape)
    name = max(sizes, key=sizes.get)
    if name not in importer.STORAGE_DTYPES:
        raise ValueError(f"{where}: weights are stored as {name}; expected one of {sorted(importer.STORAGE_DTYPES)}")
    return importer.STORAGE_DTYPES[name]


HOST_DEVICES = 8


def use_host_devices(n: int = HOST_DEVICES) -> None:
    """Asks JAX for `n` CPU devices (only possible before JAX starts its backends; a no-op after).

    The import keeps the converted params on the host until orbax has written them. Split over
    several CPU devices, each leaf is written shard by shard, so orbax's bounded write buffer
    (checkpoint_io.SAVE_CONCURRENT_GB) stays far below one 7B MLP leaf (2.9 GB in bf16).
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already started: keep the devices there are
        pass


def host_shardings(abstract: Any) -> Any:
    """Per leaf: split over the host CPU devices along its last axis that divides evenly (so one
    layer of a stacked leaf is split the same way), else kept whole on the first CPU device."""
    dev = importer.conversion_device()
    devices = jax.local_devices(backend="cpu") if dev is not None else jax.local_devices()[:1]
    mesh = Mesh(np.asarray(devices), ("host",))
    single = SingleDeviceSharding(devices[0])

    def one(x):
        for axis in reversed(range(len(x.shape))):
            if len(devices) > 1 and x.shape[axis] % len(devices) == 0:
                return NamedSharding(mesh, PartitionSpec(*([None] * axis + ["host"])))
        return single
    return jax.tree.map(one, abstract)


def _warn_if_short_of_memory(abstract: Any, cfg: OpenVLAConfig, log: Callable[[str], None]) -> None:
    need = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024
    except (OSError, StopIteration, ValueError):
        return
    if need > avail:
        log(f"WARNING: the {cfg.param_dtype} params need {need / 2 ** 30:.1f} GiB of host memory but only "
            f"{avail / 2 ** 30:.1f} GiB are available; --param_dtype=bfloat16 halves it")


def _convert_and_write(out_dir: str, cfg: OpenVLAConfig, tensors: Mapping[str, Any], items: Callable[[], Iterable],
                       norm_stats: Mapping[str, Any], tok: str, source: Dict[str, Any], where: str, overwrite: bool,
                       log: Callable[[str], None], extra_rules: Iterable = (),
                       workdir_options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Checks, streams `items()` (HF key, array) onto the host devices and writes the workdir.
    `extra_rules`: TensorRules for keys beyond the HF OpenVLA model's (checked by the caller; the
    OpenVLA-OFT modules); `workdir_options`: keyword arguments of `write_workdir`."""
    from vla_jax.hf import keys_openvla

    t0 = time.perf_counter()
    options = dict(workdir_options or {})
    table = keys_openvla.openvla_rules(cfg)
    importer.check_tensors(tensors, table, where)  # before any output exists
    tokenizer_asset(tok, cfg, options.get("text_len"))
    log(f"reading {len(tensors)} tensors ({source['storage_dtype']}) from {where}; params as {cfg.param_dtype}")
    abstract = importer.abstract_params(cfg)
    _warn_if_short_of_memory(abstract, cfg, log)
    with atomic_dir(out_dir, overwrite) as tmp:
        targets = importer.targets_for(abstract, shardings=host_shardings(nn.meta.unbox(abstract)))
        params = importer.stream_into(items(), table + list(extra_rules), targets, where)
        t1 = time.perf_counter()
        log(f"converted in {t1 - t0:.1f} s; writing the orbax checkpoint")
        write_workdir(cfg, params, norm_stats, tok, source, tmp, **options)
        del params
    t2 = time.perf_counter()
    return {"config": cfg, "tensors": len(tensors), "convert_s": t1 - t0, "write_s": t2 - t1,
            "norm_stats": sorted(norm_stats), "tokenizer": tok, "out_dir": os.path.abspath(out_dir)}


def import_hf(hf_dir: str, out_dir: str, *, param_dtype: Optional[str] = None, tokenizer: Optional[str] = None,
              overwrite: bool = False, log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """HF OpenVLA folder -> vla_jax workdir `out_dir`. Returns a summary (config, timings, counts)."""
    check_out_dir(out_dir, overwrite)
    if os.path.isfile(hf_dir):
        raise ValueError(f"{hf_dir} is a file; `import` takes an HF checkpoint folder (a PyTorch .pt needs "
                         f"--allow_pickle and --hf_config)")
    oft_files.refuse_as_plain_openvla(hf_dir)
    ck = importer.read_hf_dir(hf_dir)
    cfg = importer.hf_config(ck, param_dtype=param_dtype)
    tok = _resolve_tokenizer(tokenizer, ck.tokenizer_path, hf_dir)
    source = {"format": "hf-openvla", "path": os.path.abspath(hf_dir), "storage_dtype": ck.storage_dtype}
    return _convert_and_write(out_dir, cfg, ck.tensors, lambda: importer.read_items(ck.tensors), ck.norm_stats, tok,
                              source, ck.path, overwrite, log)


def import_pickle(pt_path: str, out_dir: str, *, hf_config: str, param_dtype: Optional[str] = None,
                  tokenizer: Optional[str] = None, overwrite: bool = False,
                  log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """A Prismatic-format PyTorch `.pt` -> vla_jax workdir. Only called with the user's explicit
    opt-in (--allow_pickle); the pickle is read by a restricted unpickler (no code runs).
    `hf_config`: an HF OpenVLA config.json describing the model (the .pt holds weights only);
    statistics come from it and from dataset_statistics.json beside the .pt or in its run folder."""
    from vla_jax.hf import pickle_io

    check_out_dir(out_dir, overwrite)
    cfg_json = hfc.read_json(hf_config)
    stats = dict(cfg_json.get("norm_stats") or {})
    for d in (os.path.dirname(os.path.abspath(pt_path)), os.path.dirname(os.path.dirname(os.path.abspath(pt_path)))):
        if os.path.isfile(os.path.join(d, importer.STATS_FILE)):
            stats = importer.read_norm_stats(d, cfg_json)
            break
    tensors = pickle_io.prismatic_to_hf_keys(pickle_io.load_pt(pt_path), pt_path)
    storage = _storage_dtype(tensors, pt_path)
    pre_path = os.path.join(os.path.dirname(os.path.abspath(hf_config)), importer.PREPROCESSOR_FILE)
    pre = hfc.read_json(pre_path) if os.path.isfile(pre_path) else None
    cfg = hfc.config_from_hf(cfg_json, pre, norm_stats=stats, param_dtype=param_dtype or storage, source=hf_config)
    found = os.path.join(os.path.dirname(os.path.abspath(hf_config)), "tokenizer.model")
    tok = _resolve_tokenizer(tokenizer, found if os.path.isfile(found) else None, os.path.dirname(hf_config))
    source = {"format": "prismatic-pt", "path": os.path.abspath(pt_path), "storage_dtype": storage}
    items = lambda: ((k, t.load()) for k, t in tensors.items())  # noqa: E731
    return _convert_and_write(out_dir, cfg, tensors, items, stats, tok, source, pt_path, overwrite, log)


def import_base(dino_file: str, siglip_file: str, llm_dir: str, out_dir: str, *, image_size: int = 224,
                param_dtype: Optional[str] = None, tokenizer: Optional[str] = None, seed: int = 0,
                norm_stats: Optional[Mapping[str, Any]] = None, overwrite: bool = False,
                log: Callable[[str], None] = lambda s: None, **kw) -> Dict[str, Any]:
    """timm towers + HF Llama-2 folder -> vla_jax workdir with a fresh projector (see base_components)."""
    from vla_jax.hf.base_components import load_base_components

    t0 = time.perf_counter()
    check_out_dir(out_dir, overwrite)
    found = os.path.join(llm_dir, "tokenizer.model")
    tok = _resolve_tokenizer(tokenizer, found if os.path.isfile(found) else None, llm_dir)
    with atomic_dir(out_dir, overwrite) as tmp:
        cfg, params, _ = load_base_components(dino_file, siglip_file, llm_dir, image_size=image_size,
                                              param_dtype=param_dtype, seed=seed, **kw)
        t1 = time.perf_counter()
        log(f"converted in {t1 - t0:.1f} s; writing the orbax checkpoint")
        source = {"format": "base-components", "dino": os.path.abspath(dino_file),
                  "siglip": os.path.abspath(siglip_file), "llm": os.path.abspath(llm_dir), "seed": seed}
        write_workdir(cfg, params, norm_stats or {}, tok, source, tmp)
        del params
    return {"config": cfg, "convert_s": t1 - t0, "write_s": time.perf_counter() - t1, "tokenizer": tok,
            "out_dir": os.path.abspath(out_dir)}


def describe(cfg: OpenVLAConfig) -> str:
    from vla_jax.models.params import count_params

    n = count_params(importer.abstract_params(cfg))
    d = dataclasses.asdict(cfg)
    return (f"{n:,} params; DINOv2 {d['dino']['width']}x{d['dino']['depth']}, SigLIP {d['siglip']['width']}x"
            f"{d['siglip']['depth']}, Llama {cfg.llama.hidden_size}x{cfg.llama.num_layers} vocab "
            f"{cfg.llama.vocab_size} rms_norm_eps {cfg.llama.rms_norm_eps}; image {cfg.image_size}px; "
            f"{cfg.n_action_bins} action bins; pad id {cfg.pad_token_id}")
