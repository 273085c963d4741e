"""HF safetensors shards through the `safetensors` library: index checks, one-tensor-at-a-time reads,
shards written with `safetensors.numpy.save_file`.

Reading: `safe_open` checks each file's header (a truncated or malformed file is reported by name
before anything is converted) and gives tensors as numpy arrays (bf16 as `ml_dtypes.bfloat16`).
Each tensor is read with its own short-lived `safe_open`: the library memory-maps the whole file,
and while a map is open every page read through it counts as resident memory of this process, so
keeping a 5 GB shard open through an import would add up to 5 GB to its peak; reopening (a header
parse, microseconds) keeps the peak at one tensor. Writing: each shard's tensors are collected and
written by `save_file` when the shard is complete (the library writes straight from the arrays, no
copy), so an export holds at most one shard of converted tensors; the library creates files as
0600, so they are given normal permissions afterwards (vla_jax.permissions).

File format (safetensors spec): u64 little-endian header length N, N bytes of JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from vla_jax import permissions

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_TRUNCATED = ("header too small", "incomplete metadata", "header too large")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: Tuple[int, ...]
    dtype: str  # safetensors name, e.g. "BF16"
    file: str
    position: int  # index in the file's data order (`safe_open.offset_keys()`)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


def parse_size(size) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20, ints pass through (HF's decimal/binary units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise ValueError(f"size {size!r} must look like 5GB, 500MB, 2GiB or a number of bytes")
    unit = m.group(2) or "B"
    mult = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
            "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}[unit]
    return int(float(m.group(1)) * mult)


# ----------------------------------------------------------------------------------------------
# Reading


def _open(path: str):
    """`safe_open(path)`; ValueError naming `path` if it is missing, truncated or malformed."""
    if not os.path.isfile(path):
        raise ValueError(f"safetensors file {path} does not exist")
    try:
        return safetensors.safe_open(path, framework="numpy")
    except safetensors.SafetensorError as e:
        why = str(e).replace("Error while deserializing header: ", "")
        if any(t in why for t in _TRUNCATED):
            raise ValueError(f"{path} is truncated or not a safetensors file ({why}; {os.path.getsize(path)} "
                             f"bytes)") from None
        raise ValueError(f"{path} has a malformed safetensors header: {why}") from None


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """-> ({key: TensorInfo}, metadata). ValueError naming `path` if it is missing, truncated or malformed."""
    infos = {}
    with _open(path) as f:
        meta = f.metadata() or {}
        for i, key in enumerate(f.offset_keys()):
            sl = f.get_slice(key)
            dtype = sl.get_dtype()
            if dtype not in DTYPES:
                raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
            infos[key] = TensorInfo(key, tuple(int(d) for d in sl.get_shape()), dtype, path, i)
    return infos, meta


def checkpoint_files(directory: str) -> Tuple[List[str], Optional[Dict[str, str]]]:
    """The safetensors files of an HF checkpoint dir and its index's weight_map (None for one file)."""
    if not os.path.isdir(directory):
        raise ValueError(f"checkpoint folder {directory} does not exist")
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid safetensors index (needs a weight_map): {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [fn for fn in files if not os.path.isfile(os.path.join(directory, fn))]
        if missing:
            keys = [k for k, v in weight_map.items() if v == missing[0]]
            raise ValueError(f"{index_path} names shard {missing[0]} which is missing from {directory} "
                             f"(it holds {len(keys)} tensors, e.g. {keys[:3]})"
                             + (f"; {len(missing) - 1} more shards are missing" if len(missing) > 1 else ""))
        return [os.path.join(directory, fn) for fn in files], weight_map
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    others = sorted(fn for fn in os.listdir(directory) if fn.endswith((".safetensors", ".bin", ".pt", ".pth")))
    hint = ""
    if any(fn.endswith((".bin", ".pt", ".pth")) for fn in others):
        hint = (" PyTorch pickle weights (.bin/.pt) are not read by default: they can run arbitrary code when "
                "loaded. Convert them to safetensors, or pass --allow_pickle for a .pt file.")
    elif others:
        hint = f" Found {others[:3]} but neither {INDEX_FILE} nor {SINGLE_FILE}."
    raise ValueError(f"{directory} holds no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}).{hint}")


def index_tensors(directory: str) -> Dict[str, TensorInfo]:
    """Every tensor of an HF checkpoint dir (headers only, no data read), checked against the index."""
    files, weight_map = checkpoint_files(directory)
    out: Dict[str, TensorInfo] = {}
    for path in files:
        infos, _ = read_header(path)
        for key, info in infos.items():
            if key in out:
                raise ValueError(f"tensor {key!r} appears in both {out[key].file} and {path}")
            out[key] = info
    if weight_map is not None:
        index_path = os.path.join(directory, INDEX_FILE)
        absent = [k for k in weight_map if k not in out or os.path.basename(out[k].file) != weight_map[k]]
        if absent:
            k = absent[0]
            raise ValueError(f"{index_path} maps {k!r} to {weight_map[k]}, but that file does not hold it "
                             f"({len(absent)} such keys)")
        unlisted = sorted(set(out) - set(weight_map))
        if unlisted:
            raise ValueError(f"{out[unlisted[0]].file} holds tensors the index {index_path} does not list: "
                             f"{unlisted[:3]}")
    return out


def read_order(infos: Iterable[TensorInfo]) -> List[TensorInfo]:
    """File by file, in on-disk order (sequential reads)."""
    return sorted(infos, key=lambda i: (i.file, i.position))


def iter_tensors(infos: Sequence[TensorInfo]) -> Iterator[Tuple[TensorInfo, np.ndarray]]:
    """Yields (info, numpy array) one tensor at a time (bf16 as ml_dtypes.bfloat16), each read with its
    own `safe_open` so that no more than one tensor's mapped pages are resident (module docstring)."""
    for info in infos:
        with _open(info.file) as f:
            arr = f.get_tensor(info.key)
        if arr.shape != info.shape or arr.dtype != DTYPES[info.dtype]:
            raise ValueError(f"{info.file}: tensor {info.key!r} changed while reading ({arr.dtype}{list(arr.shape)}, "
                             f"header said {info.dtype}{list(info.shape)})")
        yield info, arr


# ----------------------------------------------------------------------------------------------
# Writing


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    shape: Tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def plan_shards(entries: Sequence[Entry], max_shard_size: int) -> List[List[Entry]]:
    """Greedy split in order: a shard closes when the next tensor would push it past max_shard_size
    (a single larger tensor gets a shard of its own), as transformers' save_pretrained does."""
    shards: List[List[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards if shards[0] else []


class ShardedWriter:
    """Writes `entries` (in order) into HF-named shards under `directory`.

    `write(key, array)` must be called once per entry, in order; the array must match the entry's
    shape and dtype. A shard's file is written (`save_file`) when its last tensor arrives, so at most
    one shard's arrays are held. `close()` writes `model.safetensors.index.json` (when there are several
    shards) and returns the file names. One shard is written as `model.safetensors`, as transformers does.
    """

    def __init__(self, directory: str, entries: Sequence[Entry], max_shard_size: int,
                 metadata: Optional[Mapping[str, str]] = None):
        self.directory = directory
        self.shards = plan_shards(entries, max_shard_size)
        n = len(self.shards)
        self.names = ([SINGLE_FILE] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.metadata = dict(metadata or {"format": "pt"})
        self._queue = [(s, e) for s, shard in enumerate(self.shards) for e in shard]
        self._pos, self._pending = 0, {}

    def write(self, key: str, array: np.ndarray) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"tensor {key!r} written after all {len(self._queue)} planned tensors")
        shard, entry = self._queue[self._pos]
        if key != entry.key:
            raise ValueError(f"tensor {key!r} written out of order; expected {entry.key!r}")
        arr = np.ascontiguousarray(array)
        if tuple(arr.shape) != tuple(entry.shape) or arr.dtype != np.dtype(entry.dtype):
            raise ValueError(f"tensor {key!r} is {arr.dtype}{list(arr.shape)}, planned "
                             f"{np.dtype(entry.dtype)}{list(entry.shape)}")
        self._pending[key] = arr
        self._pos += 1
        if self._pos == len(self._queue) or self._queue[self._pos][0] != shard:  # the shard is complete
            path = os.path.join(self.directory, self.names[shard])
            safetensors.numpy.save_file(self._pending, path, metadata=self.metadata)
            os.chmod(path, permissions.file_mode())  # the library creates files 0600
            self._pending = {}

    def close(self) -> List[str]:
        self._pending = {}
        if self._pos != len(self._queue):
            raise ValueError(f"only {self._pos} of {len(self._queue)} planned tensors were written; next "
                             f"{self._queue[self._pos][1].key!r}")
        if len(self.names) > 1:
            weight_map = {e.key: self.names[s] for s, shard in enumerate(self.shards) for e in shard}
            index = {"metadata": {"total_size": sum(e.nbytes for shard in self.shards for e in shard)},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump(index, f, indent=2)
            return self.names + [INDEX_FILE]
        return list(self.names)

    def abort(self) -> None:
        self._pending = {}
