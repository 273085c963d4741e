"""The dataset registry: dataset configs, standardize functions and frame filters by name.

Built-in OXE entries are registered at import. Users add datasets without editing the library,
either in code (`register_standardize`, `register_dataset`) or with a file named by the training
config's `dataset_configs` field and read by `config_files.load_dataset_configs` (which registers
its datasets here and its mixtures in `mixtures`; this module imports neither).
"""

from __future__ import annotations

from typing import Callable

from vla_jax.data.oxe import transforms, transforms_oxe
from vla_jax.data.oxe.configs import BUILTIN_DATASETS, DatasetConfig
from vla_jax.data.oxe.transforms import StandardizeFn

_DATASETS: dict[str, DatasetConfig] = {}
_STANDARDIZE: dict[str, StandardizeFn] = {}
_FRAME_FILTERS: dict[str, Callable] = {}

# The flag of each entry point that loads a dataset-config file (README: "Train on your own robot data").
HOW_TO_REGISTER = ("To use your own dataset, describe it in a JSON file and pass "
                   "--config.data.dataset_configs=FILE.json to train.py (--dataset_configs=FILE.json to eval.py "
                   "and python -m vla_jax.data.inspect); in code, "
                   "vla_jax.data.oxe.register_dataset(DatasetConfig(...)) or load_dataset_configs(FILE).")
_HOW_TO_REGISTER = HOW_TO_REGISTER


def name_list(names, limit: int = 12) -> str:
    """Sorted names joined for an error message, the first `limit` of them and how many more."""
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
        raise ValueError(f"unknown standardize function {name!r}; registered: {name_list(_STANDARDIZE, 100)}. "
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
        raise ValueError(f"unknown frame filter {name!r}; registered: {name_list(_FRAME_FILTERS, 100)}")
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
                         f"{name_list(_DATASETS, 100)}. {HOW_TO_REGISTER}")
    return _DATASETS[name]


def registered_datasets() -> list[str]:
    """Sorted names of all registered datasets."""
    return sorted(_DATASETS)


def _register_builtins() -> None:
    for name, fn in {**transforms.CORE_STANDARDIZE, **transforms_oxe.OXE_STANDARDIZE}.items():
        register_standardize(name, fn)
    for name, fn in transforms.FRAME_FILTERS.items():
        register_frame_filter(name, fn)
    for cfg in BUILTIN_DATASETS:
        register_dataset(cfg)


_register_builtins()
