"""User dataset-config files: `--config.data.dataset_configs=FILE` (train.py), `--dataset_configs`
(eval.py, `python -m vla_jax.data.inspect`), `vla_jax.data.oxe.load_dataset_configs(FILE)` in code.

- `.json`: a list of DatasetConfig dicts, or {"datasets": [...], "mixtures": {name: [[dataset, weight], ...]}};
  `standardize` must name a registered function (e.g. 'generic_eef_pos');
- `.py`: executed; it calls `register_standardize` / `register_dataset` / `register_mixture` itself.

Above both tables: the datasets go to `registry`, the mixtures to `mixtures` (which reads the registry).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import runpy

from vla_jax.data.oxe.configs import DatasetConfig
from vla_jax.data.oxe.mixtures import register_mixture
from vla_jax.data.oxe.registry import get_dataset_config, register_dataset, registered_datasets

# resolved path -> (sha256 of its content, dataset names it registered): loading a file twice is a no-op.
_LOADED_FILES: dict[str, tuple[str, list[str]]] = {}


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
        before = {name: get_dataset_config(name) for name in registered_datasets()}
        runpy.run_path(str(path), run_name="vla_jax_dataset_configs")
        names = sorted(n for n in registered_datasets() if before.get(n) is not get_dataset_config(n))
    else:
        raise ValueError(f"dataset config file {path}: unsupported suffix {suffix!r}; expected .json or .py")
    _LOADED_FILES[key] = (digest, names)
    return names
