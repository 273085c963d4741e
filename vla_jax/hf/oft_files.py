"""The extra files of an OpenVLA-OFT checkpoint folder: finding them, reading and writing their state dicts.

Names (upstream's `finetune.py` save loop; OFT_REFERENCE.md §9 "Saved checkpoints"):
`{component}--{STEP}_checkpoint.pt` with STEP the training step (`150000`) or `latest` (when only the
latest checkpoint is kept). The `.pt` files are torch pickles: they are read only on the user's
explicit opt-in (`allow_pickle`), by the restricted unpickler of `pickle_io` (tensors and dicts, no
code runs). The same files as safetensors (`{component}--{STEP}_checkpoint.safetensors`, same keys)
are read by default and are what `export-oft` writes: torch is not a dependency of vla_jax, and no
torch-compatible pickle writer exists here.

Keys: upstream saves from the DDP wrapper, so each key starts with `module.`; its loaders strip the
prefix, and so does `read_state` (a file whose keys all lack it is accepted too; a mix is an error).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import safetensors.numpy

from vla_jax import permissions
from vla_jax.hf import oft_layout
from vla_jax.hf import pickle_io
from vla_jax.hf import safetensors_io as sio

FILE_RE = re.compile(r"^(?P<component>[A-Za-z0-9_]+)--(?P<step>\d+|latest)_checkpoint\.(?P<ext>pt|safetensors)$")
STORAGE_DTYPES = ("BF16", "F32", "F16")


@dataclasses.dataclass(frozen=True)
class ComponentFile:
    component: str  # oft_layout.COMPONENTS
    step: str  # digits or 'latest'
    path: str

    @property
    def is_pickle(self) -> bool:
        return self.path.endswith(".pt")


def file_name(component: str, step: str, ext: str = "safetensors") -> str:
    return f"{component}--{step}_checkpoint.{ext}"


def _step_key(step: str):
    return (1, 0) if step == "latest" else (0, int(step))


def scan(directory: str, strict: bool = True) -> List[ComponentFile]:
    """Every `{component}--{STEP}_checkpoint.{pt,safetensors}` file in `directory` (not recursive).
    A file of that pattern for a component upstream does not save is an error (never skipped), or
    left out with strict=False."""
    found = []
    for name in sorted(os.listdir(directory)):
        m = FILE_RE.match(name)
        if not m or not os.path.isfile(os.path.join(directory, name)):
            continue
        if m.group("component") not in oft_layout.COMPONENTS:
            if not strict:
                continue
            raise ValueError(f"{os.path.join(directory, name)}: unknown OpenVLA-OFT component "
                             f"{m.group('component')!r}; known: {list(oft_layout.COMPONENTS)}")
        found.append(ComponentFile(m.group("component"), m.group("step"), os.path.join(directory, name)))
    return found


def refuse_as_plain_openvla(directory: str) -> None:
    """ValueError when `directory` holds OpenVLA-OFT files: read as a plain HF OpenVLA folder (`import`,
    `init_from`, `Policy.load`) it would silently lose its action head and proprio projector."""
    if os.path.isdir(directory):
        extra = scan(directory, strict=False)
        if extra:
            names = ", ".join(os.path.basename(f.path) for f in extra)
            raise ValueError(f"{directory} is an OpenVLA-OFT checkpoint ({names}): read as a plain OpenVLA folder "
                             f"it would lose them; import it with `python -m vla_jax.hf import-oft` (or move those "
                             f"files away to use the merged model alone)")


def select(directory: str, step: Optional[str] = None) -> Tuple[Optional[str], Dict[str, ComponentFile]]:
    """-> (STEP, {component: file}) of one checkpoint step. Several steps without `step`, a `step`
    that is not there, or a component saved both as .pt and .safetensors are errors listing the files."""
    files = scan(directory)
    steps = sorted({f.step for f in files}, key=_step_key)
    if step is not None:
        step = str(step)
        if step not in steps:
            raise ValueError(f"{directory} has no OpenVLA-OFT files for step {step} (--step); steps there: "
                             f"{steps or 'none'}")
    elif len(steps) > 1:
        listing = ", ".join(os.path.basename(f.path) for f in files)
        raise ValueError(f"{directory} holds OpenVLA-OFT files of several steps {steps} ({listing}); choose one "
                         f"with --step")
    elif steps:
        step = steps[0]
    out: Dict[str, ComponentFile] = {}
    for f in files:
        if f.step != step:
            continue
        if f.component in out:
            raise ValueError(f"{directory} holds {f.component} for step {step} twice: "
                             f"{os.path.basename(out[f.component].path)} and {os.path.basename(f.path)}; keep one")
        out[f.component] = f
    return step, out


@dataclasses.dataclass
class StateFile:
    """One component file's tensors, data not read yet. Keys without `module.`; dtypes as safetensors
    names; `prefix`: what the file's keys carried ('module.' or '')."""

    path: str
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]
    prefix: str
    _load: Callable[[str], np.ndarray]

    def load(self, key: str) -> np.ndarray:
        arr = self._load(key)
        if tuple(arr.shape) != self.shapes[key] or sio.DTYPE_NAMES[arr.dtype] != self.dtypes[key]:
            raise ValueError(f"{self.path}: tensor {self.prefix}{key} read as {arr.dtype}{list(arr.shape)}, its "
                             f"header said {self.dtypes[key]}{list(self.shapes[key])}")
        return arr

    def items(self, keys) -> Iterator[Tuple[str, np.ndarray]]:
        for k in keys:
            yield k, self.load(k)

    @property
    def storage_dtype(self) -> str:
        """The dtype most of the bytes are stored in, as 'bfloat16' / 'float32' / 'float16'."""
        sizes: Dict[str, int] = {}
        for k, shape in self.shapes.items():
            dt = self.dtypes[k]
            sizes[dt] = sizes.get(dt, 0) + int(np.prod(shape)) * sio.DTYPES[dt].itemsize
        return {"BF16": "bfloat16", "F32": "float32", "F16": "float16"}[max(sizes, key=sizes.get)]


def _strip_prefix(keys: List[str], path: str) -> str:
    with_prefix = [k for k in keys if k.startswith(oft_layout.DDP_PREFIX)]
    if with_prefix and len(with_prefix) != len(keys):
        other = next(k for k in keys if not k.startswith(oft_layout.DDP_PREFIX))
        raise ValueError(f"{path}: keys mix the DDP prefix {oft_layout.DDP_PREFIX!r} ({with_prefix[0]!r}) with "
                         f"unprefixed ones ({other!r})")
    return oft_layout.DDP_PREFIX if with_prefix else ""


def read_state(f: ComponentFile, allow_pickle: bool) -> StateFile:
    """Header-level read of one component file (.pt only with `allow_pickle`)."""
    if f.is_pickle:
        if not allow_pickle:
            raise ValueError(f"{f.path} is a PyTorch pickle; pickles can run arbitrary code when loaded and are "
                             f"refused by default. Pass --allow_pickle (a restricted unpickler that only rebuilds "
                             f"tensors), or convert it to {file_name(f.component, f.step)} (same keys)")
        obj = pickle_io.load_pt(f.path)
        if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
            raise ValueError(f"{f.path}: expected a state dict (a dict of tensors by name), got "
                             f"{type(obj).__name__}")
        bad = [k for k, v in obj.items() if not isinstance(v, pickle_io.LazyTensor)]
        if bad:
            raise ValueError(f"{f.path}: {bad[0]!r} is not a tensor ({type(obj[bad[0]]).__name__})")
        tensors = dict(obj)
        shapes = {k: tuple(int(d) for d in v.shape) for k, v in tensors.items()}
        dtypes = {k: v.dtype for k, v in tensors.items()}
        load = lambda key: tensors[key].load()  # noqa: E731
    else:
        infos, _ = sio.read_header(f.path)
        shapes = {k: i.shape for k, i in infos.items()}
        dtypes = {k: i.dtype for k, i in infos.items()}
        load = lambda key: next(sio.iter_tensors([infos[key]]))[1]  # noqa: E731
    if not shapes:
        raise ValueError(f"{f.path} holds no tensors")
    prefix = _strip_prefix(list(shapes), f.path)
    odd = [k for k, d in dtypes.items() if d not in STORAGE_DTYPES]
    if odd:
        raise ValueError(f"{f.path}: tensor {odd[0]!r} is {dtypes[odd[0]]}; expected one of {list(STORAGE_DTYPES)}")
    n = len(prefix)
    return StateFile(f.path, {k[n:]: s for k, s in shapes.items()}, {k[n:]: d for k, d in dtypes.items()}, prefix,
                     lambda key: load(prefix + key))


def write_state(path: str, tensors: Mapping[str, np.ndarray], prefix: str = oft_layout.DDP_PREFIX) -> None:
    """Writes a component's state dict (keys without `module.`) as safetensors, keys `prefix`-ed
    (`module.` as upstream saves them from DDP; '' for the FiLM backbone, saved from the model) so
    that `torch.save(safetensors.torch.load_file(path), '....pt')` gives the released .pt. Metadata
    {"format": "pt"} as transformers writes."""
    arrays = {prefix + k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(arrays, path, metadata={"format": "pt"})
    os.chmod(path, permissions.file_mode())  # the library creates files 0600
