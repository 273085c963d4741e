"""The dataset registry: dataset configs, standardize functions and frame filters by name.

Built-in OXE entries are registered at import. Users add datasets without editing the library,
either in code (`register_standardize`, `register_dataset`) or with a file named by the training
config's `dataset_configs` field and read by `load_dataset_configs`:

- `.json`: a list of DatasetConfig dicts, or {"datasets": [...], "mixtures": {name: [[dataset, weight], ...]}};
  `standardize` must name a registered function (e.g. 'generic_eef_pos');
- `.py`: executed; it calls `register_standardize` / `register_dataset` / `register_mixture` itself.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import runpy
from typing import Callable

from vla_jax.data.oxe import transforms, transforms_oxe
from vla_jax.data.oxe.configs import BUILTIN_DATASETS, DatasetConfig
from vla_jax.data.oxe.transforms import StandardizeFn

_DATASETS: dict[str, DatasetConfig] = {}
_STANDARDIZE: dict[str, StandardizeFn] = {}
_FRAME_FILTERS: dict[str, Callable] = {}
# resolved path -> (sha256 of its content, dataset names it registered): loading a file twice is a no-op.
_LOADED_FILES: dict[str, tuple[str, list[str]]] = {}

# The flag of each entry point that loads a dataset-config file (README: "Train on your own robot data").
HOW_TO_REGISTER = ("To use your own dataset, describe it in a JSON file and pass "
                   "--config.data.dataset_configs=FILE.json to train.py (--dataset_configs=FILE.json to eval.py "
                   "and python -m vla_jax.data.inspect); in code, "
                   "vla_jax.data.oxe.register_dataset(DatasetConfig(...)) or load_dataset_configs(FILE).")
_HOW_TO_REGISTER = HOW_TO_REGISTER


def _names(names, limit: int = 12) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _register(table: dict, kind: str, name: str, value, overwrite: bool) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
    if name in table and table[name] != value and not overwrite:
        raise ValueError(f"{kind} {name!r} is already registered with a different value; "
                         "pass overwrite=True to replace it")
    table[name] = value


def register_standardize(name: str, fn: StandardizeFn, overwrite: bool = False) -> None:
    """Register `fn(traj, cfg) -> traj` (see transforms.py for the contract) under `name`."""
    if not callable(fn):
        raise ValueError(f"standardize function {name!r} must be callable, got {type(fn).__name__}")
    _register(_STANDARDIZE, "standardize function", name, fn, overwrite)


def get_standardize(name: str) -> StandardizeFn:
    """The standardize function registered under `name`."""
    if name not in _STANDARDIZE:
        raise ValueError(f"unknown standardize function {name!r}; registered: {_names(_STANDARDIZE, 100)}. "
                         "Register one with vla_jax.data.oxe.register_standardize(name, fn).")
    return _STANDARDIZE[name]


def register_frame_filter(name: str, fn: Callable, overwrite: bool = False) -> None:
    """Register a frame filter `fn(frame) -> scalar tf.bool` (True keeps the frame)."""
    if not callable(fn):
        raise ValueError(f"frame filter {name!r} must be callable, got {type(fn).__name__}")
    _register(_FRAME_FILTERS, "frame filter", name, fn, overwrite)


def get_frame_filter(name: str) -> Callable:
    """The frame filter registered under `name`."""
    if name not in _FRAME_FILTERS:
        raise ValueError(f"unknown frame filter {name!r}; registered: {_names(_FRAME_FILTERS, 100)}")
    return _FRAME_FILTERS[name]


def register_dataset(cfg: DatasetConfig, overwrite: bool = False) -> None:
    """Add `cfg` under `cfg.name`. Its standardize function (and frame filter) must already be registered.

    Re-registering an identical config is a no-op; a different one needs overwrite=True.
    """
    if not isinstance(cfg, DatasetConfig):
        raise ValueError(f"register_dataset expects a DatasetConfig, got {type(cfg).__name__}")
    get_standardize(cfg.standardize)  # fail now, not in the middle of a tf.data pipeline
    if cfg.frame_filter is not None:
        get_frame_filter(cfg.frame_filter)
    _register(_DATASETS, "dataset", cfg.name, cfg, overwrite)


def get_dataset_config(name: str) -> DatasetConfig:
    """The config registered under `name`; unknown names raise ValueError listing the registered ones."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}. Registered datasets ({len(_DATASETS)}): "
                         f"{_names(_DATASETS, 100)}. {HOW_TO_REGISTER}")
    return _DATASETS[name]


def registered_datasets() -> list[str]:
    """Sorted names of all registered datasets."""
    return sorted(_DATASETS)


def _load_json(path: pathlib.Path) -> list[str]:
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"dataset config file {path}: invalid JSON ({e})") from None
    mixtures = {}
    if isinstance(content, dict):
        unknown = sorted(set(content) - {"datasets", "mixtures"})
        if unknown:
            raise ValueError(f"dataset config file {path}: unknown top-level key(s) {unknown}; "
                             "expected 'datasets' (a list) and optionally 'mixtures'")
        datasets, mixtures = content.get("datasets", []), content.get("mixtures", {})
    else:
        datasets = content
    if not isinstance(datasets, list):
        raise ValueError(f"dataset config file {path}: expected a list of DatasetConfig dicts, "
                         f"got {type(datasets).__name__}")
    configs = [DatasetConfig.from_dict(entry) for entry in datasets]  # validate all before registering any
    for cfg in configs:
        register_dataset(cfg)
    if mixtures:
        from vla_jax.data.oxe.mixtures import register_mixture  # mixtures imports this module

        if not isinstance(mixtures, dict):
            raise ValueError(f"dataset config file {path}: 'mixtures' must map names to [[dataset, weight], ...]")
        for name, entries in mixtures.items():
            register_mixture(name, [tuple(e) for e in entries])
    return [cfg.name for cfg in configs]


def load_dataset_configs(path) -> list[str]:
    """Register the datasets of a user file (.json or .py); returns the names it registered.

    Loading the same unchanged file again is a no-op (returns the same names).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"dataset config file {path} does not exist")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    key = str(path.resolve())
    if key in _LOADED_FILES and _LOADED_FILES[key][0] == digest:
        return list(_LOADED_FILES[key][1])
    suffix = path.suffix.lower()
    if suffix == ".json":
        names = _load_json(path)
    elif suffix == ".py":
        before = {name: cfg for name, cfg in _DATASETS.items()}
        runpy.run_path(str(path), run_name="vla_jax_dataset_configs")
        names = sorted(n for n, cfg in _DATASETS.items() if before.get(n) is not cfg)
    else:
        raise ValueError(f"dataset config file {path}: unsupported suffix {suffix!r}; expected .json or .py")
    _LOADED_FILES[key] = (digest, names)
    return names


def _register_builtins() -> None:
    for name, fn in {**transforms.CORE_STANDARDIZE, **transforms_oxe.OXE_STANDARDIZE}.items():
        register_standardize(name, fn)
    for name, fn in transforms.FRAME_FILTERS.items():
        register_frame_filter(name, fn)
    for cfg in BUILTIN_DATASETS:
        register_dataset(cfg)


_register_builtins()
