"""HF OpenVLA folder -> Flax params, streamed one tensor at a time onto the target shardings.

Each tensor is read from its safetensors file, converted on the host (transpose, qkv split; as
XLA ops on the host CPU device for large tensors) and placed on its devices: unstacked leaves
directly, per-layer slices of large scanned leaves by an in-place (donated) update of a
preallocated stacked array, small scanned leaves assembled on the host first. Host memory
therefore holds about one tensor beyond the parameters themselves.

Param dtype: `param_dtype=None` keeps the checkpoint's storage dtype (bf16 for the released
openvla-7b: 15 GB; fp32 would be 30 GB); pass 'float32' for fp32 master weights (training casts
on device, shard by shard).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from vla_jax import sharding as shd
from vla_jax.hf import config as hfc
from vla_jax.hf import safetensors_io as sio
from vla_jax.hf import keys_openvla
from vla_jax.models.config import OpenVLAConfig
from vla_jax.models.openvla import OpenVLA

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
STATS_FILE = "dataset_statistics.json"
TOKENIZER_FILE = "tokenizer.model"
# Buffers some checkpoints carry that hold no parameter (recomputed from rope_theta).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
STORAGE_DTYPES = {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}

Path = Tuple[str, ...]


@dataclasses.dataclass
class HFCheckpoint:
    """What an HF OpenVLA folder holds, read without touching the weights' data."""

    path: str
    config_json: Dict[str, Any]
    preprocessor: Optional[Dict[str, Any]]
    norm_stats: Dict[str, Any]
    tokenizer_path: Optional[str]
    tensors: Dict[str, sio.TensorInfo]

    @property
    def storage_dtype(self) -> str:
        """The dtype most of the bytes are stored in ('bfloat16' for the released checkpoint)."""
        sizes: Dict[str, int] = {}
        for t in self.tensors.values():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.nbytes
        name = max(sizes, key=sizes.get)
        if name not in STORAGE_DTYPES:
            raise ValueError(f"{self.path}: weights are stored as {name}; expected one of {sorted(STORAGE_DTYPES)}")
        return STORAGE_DTYPES[name]


def is_hf_dir(path: str) -> bool:
    """True for a folder with an HF OpenVLA config.json (what `init_from` / `Policy.load` dispatch on)."""
    p = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(p):
        return False
    try:
        return hfc.read_json(p).get("model_type") == hfc.MODEL_TYPE
    except ValueError:
        return False


def read_norm_stats(path: str, config_json: Mapping[str, Any]) -> Dict[str, Any]:
    """config.json `norm_stats`, overridden per dataset by dataset_statistics.json (as OpenVLA's
    deploy.py does for a local folder)."""
    stats = dict(config_json.get("norm_stats") or {})
    stats_path = os.path.join(path, STATS_FILE)
    if os.path.isfile(stats_path):
        from_file = hfc.read_json(stats_path)
        differ = sorted(k for k in from_file if k in stats and stats[k] != from_file[k])
        if differ:
            log.warning("%s and config.json norm_stats differ for %s; using %s", stats_path, differ, STATS_FILE)
        stats.update(from_file)
    for name, entry in stats.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("action"), dict)
                and all(k in entry["action"] for k in ("q01", "q99"))):
            raise ValueError(f"{path}: norm_stats[{name!r}] lacks action q01/q99 (OpenVLA's statistics format)")
    return stats


def read_hf_dir(path: str) -> HFCheckpoint:
    """Reads config.json, preprocessor_config.json, statistics and every safetensors header."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"HF checkpoint folder {path} does not exist (or is not a folder)")
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path} has no {CONFIG_FILE}; an HF OpenVLA checkpoint folder holds config.json, "
                         f"model*.safetensors, dataset_statistics.json and tokenizer files")
    config_json = hfc.read_json(cfg_path)
    pre_path = os.path.join(path, PREPROCESSOR_FILE)
    preprocessor = hfc.read_json(pre_path) if os.path.isfile(pre_path) else None
    tok = os.path.join(path, TOKENIZER_FILE)
    return HFCheckpoint(path=path, config_json=config_json, preprocessor=preprocessor,
                        norm_stats=read_norm_stats(path, config_json),
                        tokenizer_path=tok if os.path.isfile(tok) else None, tensors=sio.index_tensors(path))


def hf_config(ck: HFCheckpoint, dtype: str = "bfloat16", param_dtype: Optional[str] = None) -> OpenVLAConfig:
    return hfc.config_from_hf(ck.config_json, ck.preprocessor, norm_stats=ck.norm_stats, dtype=dtype,
                              param_dtype=param_dtype or ck.storage_dtype,
                              source=os.path.join(ck.path, CONFIG_FILE))


# ----------------------------------------------------------------------------------------------
# Key/shape checks before any data is read


def check_tensors(tensors: Mapping[str, sio.TensorInfo], rules: Sequence[keys_openvla.TensorRule], where: str) -> None:
    """ValueError naming the first missing/unexpected keys and shape mismatches (with their files)."""
    by_key = {r.key: r for r in rules}
    present = {k: t for k, t in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = [k for k in by_key if k not in present]
    unexpected = [k for k in present if k not in by_key]
    bad_shape = [k for k in by_key if k in present and present[k].shape != by_key[k].shape]
    bad_dtype = [k for k in present if present[k].dtype not in STORAGE_DTYPES]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. " +
                     ", ".join(f"{k} (expected shape {list(by_key[k].shape)})" for k in missing[:3]))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors, e.g. " +
                     ", ".join(f"{k} in {os.path.basename(present[k].file)}" for k in unexpected[:3]))
    if bad_shape:
        parts.append(f"{len(bad_shape)} shape mismatches, e.g. " + ", ".join(
            f"{k} in {os.path.basename(present[k].file)} has shape {list(present[k].shape)}, expected "
            f"{list(by_key[k].shape)}" for k in bad_shape[:3]))
    if bad_dtype:
        parts.append(f"tensors of unsupported dtype, e.g. {bad_dtype[0]} ({present[bad_dtype[0]].dtype})")
    if parts:
        raise ValueError(f"{where} does not match the model its config describes: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# Target shardings


def abstract_params(cfg: OpenVLAConfig) -> Any:
    """Boxed ShapeDtypeStruct params of OpenVLA(cfg) (logical axis names kept); allocates nothing.
    Several cameras (OpenVLAConfig.num_images) take pixel_values [1, N, S, S, 3]."""
    s, n = cfg.image_size, cfg.num_images
    pixels = np.zeros((1, s, s, 3) if n == 1 else (1, n, s, s, 3), np.uint8)
    ids = np.ones((1, 2), np.int32)
    return jax.eval_shape(lambda r: OpenVLA(cfg).init(r, pixels, ids)["params"], jax.random.PRNGKey(0))


def targets_for(boxed: Any, mesh=None, shardings: Any = None, rules=shd.LOGICAL_RULES) -> Any:
    """Unboxed ShapeDtypeStructs carrying where each leaf goes: `shardings` if given, else the
    logical rules on `mesh`, else the first device."""
    abstract = nn.meta.unbox(boxed)
    if shardings is None:
        if mesh is not None:
            shardings = shd.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
        else:
            dev = SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: dev, abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ----------------------------------------------------------------------------------------------
# Streaming placement


def _slice_sharding(sharding):
    """Sharding of one layer of a stacked leaf: the leading ('layers') axis removed."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding


def _to_global(arr: np.ndarray, sharding) -> jax.Array:
    """Host array -> jax.Array on `sharding`; each device receives only its slice (multi-host safe)."""
    arr = np.asarray(arr)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: np.ascontiguousarray(arr[idx]))


# Stacked leaves at least this large are written layer by layer into a preallocated device array
# (host memory: one layer); smaller ones are assembled on the host and placed once (no compile).
DEVICE_ASSEMBLY_BYTES = 64 * 2 ** 20


@functools.lru_cache(maxsize=None)
def _device_fns(shape, dtype, sharding):
    def update(c, x, i):
        # Written on the bits: XLA:CPU widens a bf16 dynamic-update-slice to f32 over the whole stacked
        # array (a full pass per layer); on same-width unsigned ints it stays an in-place slice write.
        bits = jnp.dtype(f"uint{8 * c.dtype.itemsize}")
        c_bits = jax.lax.bitcast_convert_type(c, bits)
        x_bits = jax.lax.bitcast_convert_type(x.astype(c.dtype), bits)
        return jax.lax.bitcast_convert_type(jax.lax.dynamic_update_index_in_dim(c_bits, x_bits, i, 0), c.dtype)

    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return zeros, jax.jit(update, out_shardings=sharding, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def conversion_device():
    """Where tensors are transposed/split: the host CPU device (XLA's blocked transposes are ~5x
    faster than numpy's on strided views), or None (numpy) when no CPU backend is available."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


# Smaller tensors are converted with numpy: fast enough, and no XLA compile per new shape.
CONVERT_ON_DEVICE_BYTES = 2 ** 20


def on_conversion_device(a):
    """`a` on the conversion device when it is large enough to profit (else as a numpy array)."""
    dev = conversion_device()
    if dev is None or a.size * a.dtype.itemsize < CONVERT_ON_DEVICE_BYTES:
        return np.asarray(a)
    return jax.device_put(a, dev)


class Assembler:
    """Builds the params leaf by leaf on their target shardings.

    `put(path, layer, array)`: an unstacked leaf (layer None) or one layer of a stacked leaf.
    A large stacked leaf is preallocated (zeros, on its sharding) at its first layer and each layer
    is written in place by a jitted update that donates the old buffer; a small one is filled in a
    host buffer and placed when its last layer arrives.
    """

    def __init__(self, targets: Mapping[Path, jax.ShapeDtypeStruct]):
        self.targets = dict(targets)
        self.leaves: Dict[Path, jax.Array] = {}
        self.layers_done: Dict[Path, set] = {}
        self._host: Dict[Path, np.ndarray] = {}

    def put(self, path: Path, layer: Optional[int], array: np.ndarray, key: str = "") -> None:
        if path not in self.targets:
            raise ValueError(f"{key}: maps to {'/'.join(path)}, which the model does not have")
        t = self.targets[path]
        want = t.shape if layer is None else t.shape[1:]
        if tuple(array.shape) != tuple(want):
            raise ValueError(f"{key}: converts to shape {tuple(array.shape)} for {'/'.join(path)}, expected "
                             f"{tuple(want)}")
        if layer is None:
            if path in self.leaves:
                raise ValueError(f"{key}: {'/'.join(path)} given twice")
            self.leaves[path] = _to_global(np.asarray(array, t.dtype), t.sharding)
            return
        done = self.layers_done.setdefault(path, set())
        if layer in done or not 0 <= layer < t.shape[0]:
            raise ValueError(f"{key}: layer {layer} of {'/'.join(path)} given twice or out of range")
        done.add(layer)
        if math.prod(t.shape) * np.dtype(t.dtype).itemsize < DEVICE_ASSEMBLY_BYTES:
            buf = self._host.get(path)
            if buf is None:
                buf = self._host[path] = np.empty(t.shape, t.dtype)
            buf[layer] = array
            if len(done) == t.shape[0]:
                self.leaves[path] = _to_global(self._host.pop(path), t.sharding)
            return
        zeros, update = _device_fns(tuple(t.shape), np.dtype(t.dtype), t.sharding)
        if path not in self.leaves:
            self.leaves[path] = zeros()
        x = _to_global(array, _slice_sharding(t.sharding))
        self.leaves[path] = update(self.leaves[path], x, np.int32(layer))

    def finish(self, where: str) -> dict:
        """The nested params dict; ValueError if a leaf or a layer was never written."""
        for path, t in self.targets.items():
            if path in self.layers_done and len(self.layers_done[path]) != t.shape[0]:
                missing = sorted(set(range(t.shape[0])) - self.layers_done[path])
                raise ValueError(f"{where}: layers {missing[:5]} of {'/'.join(path)} were never given")
            if path not in self.leaves:
                raise ValueError(f"{where}: no tensor provides {'/'.join(path)}")
        jax.block_until_ready(list(self.leaves.values()))
        return traverse_util.unflatten_dict(self.leaves)


def stream_into(items: Iterable[Tuple[str, np.ndarray]], rules: Sequence[keys_openvla.TensorRule], targets: Any,
                where: str, transforms: Optional[Mapping[str, Callable]] = None) -> dict:
    """(HF key, array) pairs -> params on `targets` (unboxed ShapeDtypeStruct tree with shardings).

    `transforms` optionally maps an HF key to a function applied to its array first (e.g. vocab padding).
    """
    by_key = {r.key: r for r in rules}
    asm = Assembler(traverse_util.flatten_dict(targets))
    transforms = transforms or {}
    for key, value in items:
        if key.endswith(IGNORED_SUFFIXES):
            continue
        rule = by_key.get(key)
        if rule is None:
            raise ValueError(f"{where}: unexpected tensor {key!r}")
        if key in transforms:
            value = transforms[key](value)
        for path, arr in zip(rule.leaves, rule.to_flax(on_conversion_device(value))):
            asm.put(path, rule.layer, np.asarray(arr), key)
    return asm.finish(where)


def read_items(tensors: Mapping[str, sio.TensorInfo]) -> Iterable[Tuple[str, np.ndarray]]:
    for info, arr in sio.iter_tensors(sio.read_order(tensors.values())):
        yield info.key, arr


# ----------------------------------------------------------------------------------------------
# Public entry points


def load_hf_dir(path: str, mesh=None, shardings: Any = None, *, param_dtype: Optional[str] = None,
                dtype: str = "bfloat16", rules=shd.LOGICAL_RULES):
    """Loads an HF OpenVLA folder in place.

    -> (OpenVLAConfig, params, norm_stats, tokenizer_path). params: nested dict of jax.Arrays
    (unboxed), placed on `shardings` (a tree like the params) or, given `mesh`, on the logical-axis
    rules' shardings, else on the first device. param_dtype None keeps the stored dtype.
    tokenizer_path is the folder's tokenizer.model or None. An OpenVLA-OFT folder is refused (its extra
    modules would be dropped; `python -m vla_jax.hf import-oft` converts it).
    """
    from vla_jax.hf import oft_files

    oft_files.refuse_as_plain_openvla(os.fspath(path))
    ck = read_hf_dir(path)
    cfg = hf_config(ck, dtype, param_dtype)
    table = keys_openvla.openvla_rules(cfg)
    check_tensors(ck.tensors, table, ck.path)
    targets = targets_for(abstract_params(cfg), mesh, shardings, rules)
    params = stream_into(read_items(ck.tensors), table, targets, ck.path)
    return cfg, params, ck.norm_stats, ck.tokenizer_path


def config_geometry(cfg: OpenVLAConfig) -> Dict[str, Any]:
    """The numerics-relevant fields (dtypes, remat, max_seq_len and the execution switches excluded)."""
    d = hfc.config_to_dict(cfg)
    d.pop("execution", None)
    for part in ("dino", "siglip", "llama", None):
        sub = d if part is None else d[part]
        for k in ("dtype", "param_dtype", "remat", "remat_policy", "max_seq_len"):
            sub.pop(k, None)
    return d


def load_hf_params(path: str, abstract: Any, expect_config: Optional[OpenVLAConfig] = None) -> dict:
    """For training `init_from=HF_DIR`: the folder's params placed on `abstract`'s leaves (unboxed
    ShapeDtypeStructs with `.sharding`, e.g. `abstract_state.params`), in their dtypes.

    Only the model's keys (dino, siglip, projector, llm) are filled; other top-level entries of
    `abstract` (e.g. LoRA adapters) are left to the caller. With `expect_config`, every geometry and
    numerics field (eps, rope theta, vocab, tokens ids, bins) must equal the folder's config. An
    OpenVLA-OFT folder is refused (import it with `import-oft` and start from that checkpoint).
    """
    from vla_jax.hf import oft_files

    oft_files.refuse_as_plain_openvla(os.fspath(path))
    ck = read_hf_dir(path)
    cfg = hf_config(ck)
    if expect_config is not None:
        ours = traverse_util.flatten_dict(config_geometry(expect_config))
        theirs = traverse_util.flatten_dict(config_geometry(cfg))
        diff = [k for k in ours if ours[k] != theirs.get(k)]
        if diff:
            raise ValueError(f"{path}: its config differs from this run's model in " + ", ".join(
                f"{'.'.join(k)} ({theirs.get(k)!r} there, {ours[k]!r} here)" for k in diff[:5]))
    table = keys_openvla.openvla_rules(cfg)
    check_tensors(ck.tensors, table, ck.path)
    model_keys = ("dino", "siglip", "projector", "llm")
    missing = [k for k in model_keys if k not in abstract]
    if missing:
        raise ValueError(f"abstract params lack {missing}; expected the OpenVLA params tree")
    targets = {k: abstract[k] for k in model_keys}
    want = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
    have = traverse_util.flatten_dict(targets)
    bad = [p for p in want if p not in have or tuple(have[p].shape) != tuple(want[p].shape)]
    if bad or set(have) != set(want):
        p = (bad or sorted(set(have) ^ set(want)))[0]
        raise ValueError(f"{path}: parameter {'/'.join(p)} is {tuple(want[p].shape) if p in want else 'absent'} "
                         f"in the checkpoint but {tuple(have[p].shape) if p in have else 'absent'} in this run")
    return stream_into(read_items(ck.tensors), table, targets, ck.path)
