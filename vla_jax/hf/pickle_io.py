"""Opt-in reading of PyTorch `.pt` checkpoints (Prismatic format) without torch and without running
pickled code.

A `torch.save` file is a zip holding `data.pkl` (the object structure) and one raw file per tensor
storage. The unpickler below resolves only the handful of names a state dict needs (OrderedDict,
tensor/parameter rebuild functions, storage types) and refuses everything else, so a malicious
pickle cannot execute code. Tensors stay lazy: each is read from the zip when it is converted.

Prismatic checkpoints (`step-XXXXXX-epoch-XX-loss=X.XXXX.pt`) hold
`{"model": {"vision_backbone": ..., "projector": ..., "llm_backbone": ...}}`; `prismatic_to_hf_keys`
applies the renames of OpenVLA's `convert_openvla_weights_to_hf.py` (OPENVLA_REFERENCE.md §8).
"""

from __future__ import annotations

import collections
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    zf: zipfile.ZipFile
    member: str
    np_dtype: Any
    st_dtype: str


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

    def load(self) -> np.ndarray:
        flat = np.frombuffer(self.storage.zf.read(self.storage.member), self.storage.np_dtype)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=self.shape,
                                               strides=tuple(s * item for s in self.stride))
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_args, file=""):
    return LazyTensor(storage, int(offset), tuple(size), tuple(stride), file)


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
            if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
                raise pickle.UnpicklingError(f"{path}: unsupported persistent id {pid!r}")
            key = str(pid[2])
            if key not in storages:
                np_dtype, st_dtype = _STORAGES[pid[1].name]
                storages[key] = _Storage(zf, f"{root}data/{key}", np_dtype, st_dtype)
            return storages[key]

    with zf.open(pkls[0]) as f:
        try:
            return Unpickler(f).load()
        except pickle.UnpicklingError as e:
            raise ValueError(str(e)) from None


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
