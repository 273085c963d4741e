"""Opt-in reading of PyTorch `.pt` checkpoints (Prismatic format) without torch and without running
pickled code.

A `torch.save` file is a zip holding `data.pkl` (the object structure) and one raw file per tensor
storage. The unpickler below resolves only the handful of names a state dict needs (OrderedDict,
tensor/parameter rebuild functions, storage types) and refuses everything else, so a malicious
pickle cannot execute code. Tensors stay lazy: each is read from the zip when it is converted. Before any memory is viewed,
every tensor's layout is checked against its storage (integer offset, shape and strides, no
negative ones, the last element it reaches inside the storage's bytes), so a crafted file gets a
ValueError naming the file and tensor, never a crash or bytes from outside the storage.

Prismatic checkpoints (`step-XXXXXX-epoch-XX-loss=X.XXXX.pt`) hold
`{"model": {"vision_backbone": ..., "projector": ..., "llm_backbone": ...}}`; `prismatic_to_hf_keys`
applies the renames of OpenVLA's `convert_openvla_weights_to_hf.py` (OPENVLA_REFERENCE.md §8).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
import pickle
import zipfile
from typing import Any, Dict, Tuple

import ml_dtypes
import numpy as np

_STORAGES = {
    "FloatStorage": (np.float32, "F32"), "DoubleStorage": (np.float64, "F64"), "HalfStorage": (np.float16, "F16"),
    "BFloat16Storage": (ml_dtypes.bfloat16, "BF16"), "LongStorage": (np.int64, "I64"), "IntStorage": (np.int32, "I32"),
    "ShortStorage": (np.int16, "I16"), "CharStorage": (np.int8, "I8"), "ByteStorage": (np.uint8, "U8"),
    "BoolStorage": (np.bool_, "BOOL"),
}


# A view may repeat storage elements (stride 0, as torch's expand saves them) up to this factor; more
# would make the copy `load` returns a memory bomb from a tiny file.
MAX_EXPANSION = 64
MAX_ELEMENTS = 2**48  # numpy's limit is 2**63 bytes; no real tensor comes near either


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    zf: zipfile.ZipFile
    member: str
    np_dtype: Any
    st_dtype: str
    numel: Any = None  # the element count the pickle claims (torch writes it), checked against the bytes

    def read(self, file: str) -> np.ndarray:
        """The storage's elements, flat; ValueError when the member is missing or its bytes do not fit."""
        try:
            raw = self.zf.read(self.member)
        except KeyError:
            raise ValueError(f"{file}: storage {self.member} is missing from the archive") from None
        item = np.dtype(self.np_dtype).itemsize
        if len(raw) % item:
            raise ValueError(f"{file}: storage {self.member} holds {len(raw)} bytes, not a whole number of "
                             f"{item}-byte {self.st_dtype} elements")
        if self.numel is not None and _index(self.numel, -1) != len(raw) // item:
            raise ValueError(f"{file}: storage {self.member} holds {len(raw) // item} {self.st_dtype} elements; "
                             f"the pickle says {self.numel!r}")
        return np.frombuffer(raw, self.np_dtype)


def _index(x: Any, default: int) -> int:
    """x as a Python int (ints only: no floats, no bools), else `default`."""
    if isinstance(x, bool):
        return default
    try:
        return operator.index(x)
    except TypeError:
        return default


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A tensor of a .pt file, read on `load()`. `dtype` uses safetensors names (e.g. 'BF16')."""

    storage: _Storage
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    file: str

    @property
    def dtype(self) -> str:
        return self.storage.st_dtype

    def _where(self) -> str:
        return (f"{self.file}: tensor in storage {self.storage.member} (offset {self.offset!r}, shape "
                f"{self.shape!r}, stride {self.stride!r})")

    def check_layout(self, numel: int) -> None:
        """ValueError unless offset, shape and strides are non-negative ints of matching length and every
        element the view reaches lies inside a storage of `numel` elements."""
        offset = _index(self.offset, -1)
        shape = [_index(d, -1) for d in self.shape]
        stride = [_index(d, -1) for d in self.stride]
        if len(stride) != len(shape):
            raise ValueError(f"{self._where()}: {len(shape)} dims but {len(stride)} strides")
        if offset < 0 or min(shape, default=0) < 0 or min(stride, default=0) < 0:
            raise ValueError(f"{self._where()}: offset, sizes and strides must be non-negative integers")
        if math.prod(d for d in shape if d) > MAX_ELEMENTS:
            raise ValueError(f"{self._where()}: too large to represent (more than {MAX_ELEMENTS} elements)")
        if 0 in shape:
            return  # no element is read (torch accepts any offset here too)
        last = offset + sum((d - 1) * st for d, st in zip(shape, stride))
        if last >= numel:
            raise ValueError(f"{self._where()}: reaches element {last} but the storage holds {numel} "
                             f"{self.dtype} elements")
        count = math.prod(shape)
        if count > MAX_EXPANSION * numel:
            raise ValueError(f"{self._where()}: {count} elements from a storage of {numel} (repeated strides "
                             f"expand it more than {MAX_EXPANSION}x; the copy would not fit in memory)")

    def load(self) -> np.ndarray:
        flat = self.storage.read(self.file)
        self.check_layout(flat.size)
        shape = tuple(int(d) for d in self.shape)
        if 0 in shape:
            return np.zeros(shape, flat.dtype)
        item = flat.itemsize
        # A size-1 dim never moves: its stride (any size) does not matter and must not overflow.
        strides = tuple(0 if d == 1 else int(st) * item for d, st in zip(shape, self.stride))
        view = np.lib.stride_tricks.as_strided(flat[int(self.offset):], shape=shape, strides=strides,
                                               writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_args, file=""):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"{file}: a tensor's storage is {type(storage).__name__}, not a storage")
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        raise pickle.UnpicklingError(f"{file}: a tensor's size/stride are {type(size).__name__}/"
                                     f"{type(stride).__name__}, not tuples")
    values = [offset, *size, *stride]
    ints = [_index(v, -1) for v in values]
    if min(ints) < 0 or len(size) != len(stride):
        raise pickle.UnpicklingError(f"{file}: a tensor in storage {storage.member} has offset {offset!r}, size "
                                     f"{tuple(size)!r}, stride {tuple(stride)!r}: expected non-negative integers "
                                     f"and one stride per dim")
    n = len(size)
    return LazyTensor(storage, ints[0], tuple(ints[1:1 + n]), tuple(ints[1 + n:]), file)


def load_pt(path: str) -> Any:
    """The object in a torch.save zip file, with tensors as LazyTensor. Unknown globals are refused."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path} is not a torch.save zip file (legacy pickles are not supported): {e}") from None
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
    if len(pkls) != 1:
        raise ValueError(f"{path}: expected one data.pkl in the archive, found {pkls}")
    root = pkls[0][: -len("data.pkl")]
    storages: Dict[str, _Storage] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if module == "torch._utils" and name == "_rebuild_tensor_v2":
                return lambda *a: _rebuild_tensor(*a, file=path)
            if module == "torch._utils" and name == "_rebuild_parameter":
                return lambda data, *_: data
            if module == "torch" and name in _STORAGES:
                return _StorageType(name)
            raise pickle.UnpicklingError(f"{path}: refusing to load {module}.{name} (only tensors and dicts are "
                                         f"allowed)")

        def persistent_load(self, pid):
            if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
                    and isinstance(pid[1], _StorageType)):
                raise pickle.UnpicklingError(f"{path}: unsupported persistent id {pid!r}")
            key = str(pid[2])
            if key not in storages:
                np_dtype, st_dtype = _STORAGES[pid[1].name]
                storages[key] = _Storage(zf, f"{root}data/{key}", np_dtype, st_dtype,
                                         pid[4] if len(pid) > 4 else None)
            elif storages[key].np_dtype != _STORAGES[pid[1].name][0]:
                raise pickle.UnpicklingError(f"{path}: storage {key} is used with two element types")
            return storages[key]

    with zf.open(pkls[0]) as f:
        try:
            return Unpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(str(e)) from None
        except (EOFError, TypeError, ValueError, IndexError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}: malformed pickle in {pkls[0]} ({type(e).__name__}: {e})") from None


def prismatic_to_hf_keys(obj: Any, path: str) -> Dict[str, LazyTensor]:
    """A Prismatic checkpoint object -> {HF OpenVLA key: LazyTensor} (convert_openvla_weights_to_hf renames)."""
    model = obj.get("model") if isinstance(obj, dict) else None
    parts = ("vision_backbone", "projector", "llm_backbone")
    if not isinstance(model, dict) or any(p not in model for p in parts):
        raise ValueError(f"{path} is not a Prismatic checkpoint: expected {{'model': {{{', '.join(parts)}}}}}")
    out: Dict[str, LazyTensor] = {}
    for k, v in model["vision_backbone"].items():
        if k.startswith("dino_featurizer."):
            k = "vision_backbone.featurizer." + k[len("dino_featurizer."):]
            if k.endswith(".gamma"):
                k = k[: -len("gamma")] + "scale_factor"
        elif k.startswith("siglip_featurizer."):
            k = "vision_backbone.fused_featurizer." + k[len("siglip_featurizer."):]
        else:
            raise ValueError(f"{path}: unexpected vision_backbone key {k!r}")
        out[k] = v
    names = {"projector.0.": "projector.fc1.", "projector.2.": "projector.fc2.", "projector.4.": "projector.fc3."}
    for k, v in model["projector"].items():
        prefix = next((p for p in names if k.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"{path}: unexpected projector key {k!r}")
        out[names[prefix] + k[len(prefix):]] = v
    for k, v in model["llm_backbone"].items():
        if not k.startswith("llm."):
            raise ValueError(f"{path}: unexpected llm_backbone key {k!r}")
        out["language_model." + k[len("llm."):]] = v
    bad = [k for k, v in out.items() if not isinstance(v, LazyTensor)]
    if bad:
        raise ValueError(f"{path}: {bad[0]!r} is not a tensor")
    return out
