"""Flax params -> an HF OpenVLA folder, streamed: shards are written as they fill.

Tensors are emitted leaf group by leaf group (all layers of `q_proj`, then all of `k_proj`, ...),
so only the leaves being converted are ever materialised on the host: exporting a vla_jax
checkpoint restores one group at a time from orbax. Key names and shapes are the released ones;
HF loaders do not depend on the order of tensors within or across shards.

LoRA: a params tree holding adapters under 'lora' is merged before export (PEFT's
merge_and_unload) with `vla_jax.models.lora` — `lora.merge` for in-memory params, and the same
per-kernel update (`lora.targets` + `lora.delta`) leaf by leaf for checkpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vla_jax.hf import config as hfc
from vla_jax.hf import importer
from vla_jax.hf import safetensors_io as sio
from vla_jax.hf import tokenizer_files
from vla_jax.hf.outdir import atomic_dir
from vla_jax.hf import keys_openvla
from vla_jax.models.config import OpenVLAConfig, config_from_dict

log = logging.getLogger(__name__)

Path = Tuple[str, ...]
EXPORT_DTYPES = ("bfloat16", "float32", "float16")
DEFAULT_MAX_SHARD_SIZE = "5GB"
PREFETCH_BYTES = 256 * 2 ** 20


def leaf_groups(cfg: OpenVLAConfig) -> List[Tuple[Tuple[Path, ...], List[keys_openvla.TensorRule]]]:
    """Rules grouped by the leaves they read, in module order; each group's rules by layer."""
    groups: Dict[Tuple[Path, ...], List[keys_openvla.TensorRule]] = {}
    for rule in keys_openvla.openvla_rules(cfg):
        groups.setdefault(rule.leaves, []).append(rule)
    return [(leaves, sorted(rs, key=lambda r: -1 if r.layer is None else r.layer)) for leaves, rs in groups.items()]


def export_plan(params: Any, cfg: OpenVLAConfig) -> List[Tuple[str, Tuple[int, ...]]]:
    """[(HF key, shape)] in the order export writes them, checked against `params` (arrays or
    ShapeDtypeStructs, boxed or not: `jax.eval_shape` output works, nothing is allocated).

    Every leaf must be used by some tensor, and each tensor's converted shape must equal its leaf.
    """
    flat = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(nn.meta.unbox(params)).items()}
    used, out = set(), []
    for leaves, rules in leaf_groups(cfg):
        for rule in rules:
            conv = jax.eval_shape(lambda w, f=rule.to_flax: tuple(f(w)), jax.ShapeDtypeStruct(rule.shape, jnp.float32))
            for path, c in zip(leaves, conv):
                if path not in flat:
                    raise ValueError(f"params lack {'/'.join(path)} (needed for {rule.key})")
                want = flat[path] if rule.layer is None else flat[path][1:]
                if tuple(c.shape) != want or (rule.layer is not None and rule.layer >= flat[path][0]):
                    raise ValueError(f"{rule.key}: params {'/'.join(path)} has shape {flat[path]}, which does not "
                                     f"fit HF shape {list(rule.shape)}" + (f" at layer {rule.layer}" if
                                                                            rule.layer is not None else ""))
                used.add(path)
            out.append((rule.key, tuple(rule.shape)))
    unused = sorted(set(flat) - used)
    if unused:
        raise ValueError(f"params have leaves no HF tensor uses: {['/'.join(p) for p in unused[:5]]}")
    return out


def _write_weights(out_dir: str, cfg: OpenVLAConfig, fetch: Callable[[Sequence[Path]], Sequence[np.ndarray]],
                   dtype: str, max_shard_size: Union[str, int]) -> List[str]:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; expected one of {EXPORT_DTYPES}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    groups = leaf_groups(cfg)
    entries = [sio.Entry(r.key, tuple(r.shape), np_dtype) for _, rules in groups for r in rules]
    writer = sio.ShardedWriter(out_dir, entries, sio.parse_size(max_shard_size))
    try:
        for leaves, rules in groups:
            arrays = tuple(fetch(leaves))
            for rule in rules:
                parts = arrays if rule.layer is None else tuple(a[rule.layer] for a in arrays)
                # Transposes run as XLA ops on the host CPU device (see importer.conversion_device).
                hf = rule.to_hf(tuple(importer.on_conversion_device(p) for p in parts))
                hf = hf.astype(np_dtype) if isinstance(hf, jax.Array) else np.asarray(hf).astype(np_dtype, copy=False)
                writer.write(rule.key, np.asarray(hf))
                del hf
            del arrays
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _get(tree: Mapping, path: Path):
    for p in path:
        if not isinstance(tree, Mapping) or p not in tree:
            raise ValueError(f"params lack {'/'.join(path)}")
        tree = tree[p]
    return tree


def write_hf_dir(out_dir: str, cfg: OpenVLAConfig, fetch: Callable[[Sequence[Path]], Sequence[np.ndarray]], *,
                 dtype: str = "bfloat16", norm_stats: Optional[Mapping[str, Any]] = None,
                 tokenizer: Union[None, str, bytes] = None, max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_SIZE,
                 remote_code: Optional[str] = None) -> List[str]:
    """Writes every file of an HF OpenVLA folder into the (existing, empty) `out_dir`."""
    stats = dict(norm_stats or {})
    files = _write_weights(out_dir, cfg, fetch, dtype, max_shard_size)
    jsons = {"config.json": hfc.config_to_hf(cfg, stats, dtype),
             "preprocessor_config.json": hfc.preprocessor_config(cfg),
             "dataset_statistics.json": stats,
             "generation_config.json": {"_from_model_config": True, "bos_token_id": cfg.bos_token_id,
                                        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
                                        "transformers_version": hfc.TRANSFORMERS_VERSION}}
    if not stats:
        log.warning("no normalization statistics: dataset_statistics.json is empty and predict_action cannot "
                    "un-normalize actions")
    for name, obj in jsons.items():
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
        files.append(name)
    if tokenizer is not None:
        files += tokenizer_files.write_tokenizer_files(out_dir, tokenizer, cfg)
    if remote_code:
        files += _copy_remote_code(remote_code, out_dir)
    return files


def _copy_remote_code(src: str, out_dir: str) -> List[str]:
    """Copies the HF remote-code modules (configuration/modeling/processing_prismatic.py) that
    `trust_remote_code=True` loading needs; they come from the released checkpoint, not from us."""
    import shutil

    names = ["configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py"]
    missing = [n for n in names if not os.path.isfile(os.path.join(src, n))]
    if missing:
        raise ValueError(f"--remote_code folder {src} lacks {missing}")
    for n in names:
        shutil.copyfile(os.path.join(src, n), os.path.join(out_dir, n))
    return names


# ----------------------------------------------------------------------------------------------
# Public entry points


def export_params(params: Any, cfg: OpenVLAConfig, out_dir: str, *, dtype: str = "bfloat16",
                  norm_stats: Optional[Mapping[str, Any]] = None, tokenizer: Union[None, str, bytes] = None,
                  max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_SIZE, lora_config: Any = None,
                  overwrite: bool = False, remote_code: Optional[str] = None) -> List[str]:
    """In-memory params (boxed or not; jax or numpy arrays) -> HF OpenVLA folder `out_dir`.

    A tree holding LoRA adapters under 'lora' needs `lora_config` (a `lora.LoraConfig`) and is
    merged first. Written atomically (OUT.tmp-xxxx, then renamed). Returns the file names.
    """
    params = nn.meta.unbox(params)
    if "lora" in params:
        params = merge_lora(params, lora_config)
    export_plan(params, cfg)  # key/shape check before anything is written
    # Leaves stay as they are (jax or numpy): np.asarray on a sharded jax.Array would cache a gathered
    # host copy on the array for as long as the params live.
    fetch = lambda paths: tuple(_get(params, p) for p in paths)  # noqa: E731
    with atomic_dir(out_dir, overwrite) as tmp:
        return write_hf_dir(tmp, cfg, fetch, dtype=dtype, norm_stats=norm_stats, tokenizer=tokenizer,
                            max_shard_size=max_shard_size, remote_code=remote_code)


def merge_lora(params: dict, lora_config: Any) -> dict:
    """{..., 'lora': adapters} -> merged base params (`vla_jax.models.lora.merge`)."""
    from vla_jax.models import lora

    if lora_config is None:
        raise ValueError("params hold LoRA adapters ('lora'); pass lora_config (vla_jax.models.lora.LoraConfig) to "
                         "merge them before export")
    base, adapters = lora.split_lora(params)
    # One compiled program instead of an eager compile per op and kernel shape.
    return jax.jit(lambda p, a: lora.merge(p, a, lora_config))(base, adapters)


class _LoraMerger:
    """Per-leaf LoRA merge for streamed export: W + (alpha/r) A @ B, exactly as `lora.apply_lora`."""

    def __init__(self, abstract_base: dict, adapters: dict, lora_config: Any):
        from vla_jax.models import lora

        self.cfg = lora_config
        tgts = lora.targets(abstract_base, lora_config)
        flat_lora = traverse_util.flatten_dict(adapters)
        lora._check_lora_tree(flat_lora, tgts, lora_config.rank)
        self.by_kernel = {}
        for t in tgts:
            for i, kpath in enumerate(t.kernels):
                self.by_kernel[kpath] = (t, i, flat_lora[t.path + (lora.LORA_A,)], flat_lora[t.path + (lora.LORA_B,)])

    def __call__(self, path: Path, w: np.ndarray) -> np.ndarray:
        if path not in self.by_kernel:
            return w
        t, i, a, b = self.by_kernel[path]
        return np.asarray(_merge_kernel(w, a, b, t, i, self.cfg.scale))


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _merge_kernel(w, a, b, target, member: int, scale: float):
    """One kernel of `lora.apply_lora`: W + delta (the member's slice for a fused qkv), in W's dtype."""
    from vla_jax.models import lora

    d = lora.delta(a, b, target, scale)
    if len(target.kernels) > 1:
        d = jnp.take(d, member, axis=len(target.batch_shape) + len(target.in_shape))
    return (w.astype(jnp.promote_types(w.dtype, jnp.float32)) + d).astype(w.dtype)


def _lora_config_from_assets(assets: Mapping[str, Any]):
    from vla_jax.models import lora

    run_lora = (assets.get("config") or {}).get("lora") or {}
    kw = {k: run_lora[k] for k in ("rank", "alpha", "targets") if k in run_lora}
    if "targets" in kw and isinstance(kw["targets"], list):
        kw["targets"] = tuple(kw["targets"])
    if "rank" not in kw:
        raise ValueError("the checkpoint holds LoRA adapters but its config asset has no lora.rank")
    return lora.LoraConfig(**kw)


# Top-level params of OpenVLA-OFT's extra modules: not part of the HF OpenVLA model files
# (`python -m vla_jax.hf export-oft` writes them beside it, vla_jax.hf.oft_io).
OFT_ROOTS = ("action_head", "proprio_projector")


def export_checkpoint(ckpt_path: str, out_dir: str, *, dtype: str = "bfloat16",
                      tokenizer: Union[None, str, bytes] = None,
                      max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
                      remote_code: Optional[str] = None) -> List[str]:
    """A vla_jax checkpoint (workdir, checkpoints/ or step folder) -> HF OpenVLA folder, streamed
    leaf group by leaf group from orbax. The tokenizer defaults to the one embedded in the
    checkpoint's tokenizer asset; LoRA adapters are merged using the run config's lora settings.
    A checkpoint with OpenVLA-OFT modules (L1 action head, proprio projector) is refused: the HF
    model files cannot hold them (`oft_io.export_oft` writes them beside the model)."""
    from vla_jax.hf.checkpoint_io import ParamsReader

    reader = ParamsReader(ckpt_path)
    extra = sorted({p[0] for p in reader.shapes} & set(OFT_ROOTS))
    if extra:
        raise ValueError(f"{reader.step_dir} holds OpenVLA-OFT modules {extra} that the HF OpenVLA files cannot "
                         f"hold; export it with `python -m vla_jax.hf export-oft` (the OFT layout: the model plus "
                         f"action_head--STEP / proprio_projector--STEP files)")
    with atomic_dir(out_dir, overwrite) as tmp:
        return write_checkpoint_files(reader, tmp, dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size,
                                      remote_code=remote_code)


def write_checkpoint_files(reader: Any, out_dir: str, *, dtype: str = "bfloat16",
                           tokenizer: Union[None, str, bytes] = None,
                           max_shard_size: Union[str, int] = DEFAULT_MAX_SHARD_SIZE,
                           remote_code: Optional[str] = None, skip_roots: Sequence[str] = ()) -> List[str]:
    """The HF OpenVLA files of a checkpoint (`checkpoint_io.ParamsReader`) written into the existing,
    empty `out_dir`; top-level params in `skip_roots` are left to the caller. Returns the file names."""
    cfg = config_from_dict(reader.assets["meta"]["model"])
    merger = None
    if any(p[0] == "lora" for p in reader.shapes):
        base = {k: v for k, v in reader.abstract().items() if k not in ("lora",) + tuple(skip_roots)}
        merger = _LoraMerger(base, reader.read_tree(("lora",)), _lora_config_from_assets(reader.assets))
    abstract = {k: v for k, v in reader.abstract().items() if k not in ("lora",) + tuple(skip_roots)}
    export_plan(abstract, cfg)

    groups = [leaves for leaves, _ in leaf_groups(cfg)]
    cache: Dict[Tuple[Path, ...], Tuple[np.ndarray, ...]] = {}

    def fetch(paths):
        # Small groups are restored together (each orbax restore has a fixed overhead; BENCHMARKS.md,
        # "Design choices measured"); the byte budget keeps host memory bounded.
        if paths not in cache:
            batch, size = [], 0
            for g in groups[groups.index(paths):]:
                n = sum(math.prod(reader.shapes[p].shape) * reader.shapes[p].dtype.itemsize for p in g)
                if batch and size + n > PREFETCH_BYTES:
                    break
                batch.append(g)
                size += n
            flat = [p for g in batch for p in g]
            got = dict(zip(flat, reader.read(flat)))
            cache.update({g: tuple(got[p] for p in g) for g in batch})
        arrays = cache.pop(paths)
        return tuple(merger(p, a) if merger else a for p, a in zip(paths, arrays))

    if tokenizer is None:
        tokenizer = _embedded_tokenizer(reader.assets.get("tokenizer") or {})
    return write_hf_dir(out_dir, cfg, fetch, dtype=dtype, norm_stats=reader.assets.get("dataset_statistics"),
                        tokenizer=tokenizer, max_shard_size=max_shard_size, remote_code=remote_code)


def _embedded_tokenizer(asset: Mapping[str, Any]) -> Optional[bytes]:
    import base64

    b64 = asset.get("sentencepiece_model_b64")
    if not b64:
        log.warning("the checkpoint embeds no tokenizer model; pass --tokenizer to include one in the export")
        return None
    return base64.b64decode(b64)
