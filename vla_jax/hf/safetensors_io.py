"""Streaming safetensors: validated headers, one-tensor-at-a-time reads, shards written as they fill.

Reading: our own header check first (a truncated or malformed file is reported by name before
anything is converted), then plain reads of one tensor at a time into numpy arrays (bf16 as
`ml_dtypes.bfloat16`, exactly what `safetensors.safe_open(framework="numpy")` returns; a test
checks both agree). Not memory-mapped: mapped shard pages would count as resident memory. Writing uses our own writer: every tensor's shape and dtype
are known in advance, so each shard's header is written first and the tensor bytes follow one at a
time; nothing is buffered beyond the tensor being written.

File format (safetensors spec): u64 little-endian header length N, N bytes of JSON
`{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data,
offsets relative to the end of the header, contiguous and without gaps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: Tuple[int, ...]
    dtype: str  # safetensors name, e.g. "BF16"
    file: str
    begin: int  # data offsets, relative to the end of the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


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


def read_header(path: str) -> Tuple[Dict[str, TensorInfo], Dict[str, str]]:
    """-> ({key: TensorInfo}, metadata). ValueError naming `path` if it is missing, truncated or malformed."""
    if not os.path.isfile(path):
        raise ValueError(f"safetensors file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated: {size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise ValueError(f"{path} is truncated or not a safetensors file: header length {n}, file size {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} has a malformed safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a malformed safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    infos, ends = {}, []
    for key, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed header entry for tensor {key!r}: {h!r}") from None
        if dtype not in DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if e - b != want or b < 0:
            raise ValueError(f"{path}: tensor {key!r} spans bytes [{b}, {e}) but shape {list(shape)} {dtype} "
                             f"needs {want} bytes")
        infos[key] = TensorInfo(key, shape, dtype, path, int(b), int(e))
        ends.append(e)
    data_size = max(ends, default=0)
    if 8 + n + data_size > size:
        raise ValueError(f"{path} is truncated: its header describes {8 + n + data_size} bytes but the file has "
                         f"{size}")
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
    return sorted(infos, key=lambda i: (i.file, i.begin))


def read_tensor(f, info: TensorInfo, data_start: int) -> np.ndarray:
    """Reads one tensor from the open file `f` straight into a fresh numpy array."""
    arr = np.empty(info.shape, DTYPES[info.dtype])
    f.seek(data_start + info.begin)
    view = arr.reshape(-1).view(np.uint8)
    got = f.readinto(view)
    if got != info.nbytes:
        raise ValueError(f"{info.file}: tensor {info.key!r} is cut short ({got} of {info.nbytes} bytes)")
    return arr


def iter_tensors(infos: Sequence[TensorInfo]) -> Iterator[Tuple[TensorInfo, np.ndarray]]:
    """Yields (info, numpy array) one tensor at a time (bf16 as ml_dtypes.bfloat16, like
    `safe_open(framework="numpy")`).

    Plain reads rather than a memory map: the bytes go straight into the array, and the pages of a
    mapped 5 GB shard would otherwise count as resident memory of this process until it is closed.
    """
    current, f, data_start = None, None, 0
    try:
        for info in infos:
            if info.file != current:
                if f is not None:
                    f.close()
                current, f = info.file, open(info.file, "rb")
                (n,) = struct.unpack("<Q", f.read(8))
                data_start = 8 + n
            yield info, read_tensor(f, info, data_start)
    finally:
        if f is not None:
            f.close()


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


def _header_bytes(entries: Sequence[Entry], metadata: Mapping[str, str]) -> bytes:
    header, offset = {"__metadata__": dict(metadata)}, 0
    for e in entries:
        header[e.key] = {"dtype": DTYPE_NAMES[np.dtype(e.dtype)], "shape": list(e.shape),
                         "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads the header to 8-byte alignment
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes `entries` (in order) into HF-named shards under `directory`, one tensor at a time.

    `write(key, array)` must be called once per entry, in order; the array must match the entry's
    shape and dtype. `close()` writes `model.safetensors.index.json` (when there are several shards)
    and returns the file names. One shard is written as `model.safetensors`, as transformers does.
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
        self._pos, self._file, self._file_index = 0, None, -1

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
        if shard != self._file_index:
            self._close_file()
            self._file_index = shard
            self._file = open(os.path.join(self.directory, self.names[shard]), "wb")
            self._file.write(_header_bytes(self.shards[shard], self.metadata))
        self._file.write(arr.reshape(-1).view(np.uint8).data)
        self._pos += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> List[str]:
        self._close_file()
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
        self._close_file()
