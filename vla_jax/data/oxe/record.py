"""What a run trained on, as JSON for its checkpoint, and the registry rebuilt from that record.

A checkpoint that remembers its data (not only the path of a dataset-config file, which may have
changed or be absent on the machine that evaluates or serves it) lets `eval.py --checkpoint=RUN`
find the held-out split of the training datasets, and `Policy` convert the gripper back into a
dataset's own convention, with no other flag.

The record (checkpoint asset `training_data`):
    {"data_dir": absolute path, "mixture": name, "split": the training split,
     "mixture_weights": [[dataset, weight], ...],
     "datasets": [DatasetConfig fields of each dataset, ...],
     "dataset_configs_file": {"path", "sha256", "content"} or null,  # the user's file, verbatim
     "tokenizer": absolute path of the tokenizer.model (its bytes are in the tokenizer asset)}
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Any, Dict, List, Optional

from vla_jax.data.oxe.configs import DatasetConfig
from vla_jax.data.oxe.mixtures import MIXTURES, get_mixture, register_mixture
from vla_jax.data.oxe.registry import _DATASETS, get_standardize, register_dataset

log = logging.getLogger(__name__)


def _abs(path: Optional[str]) -> Optional[str]:
    return os.path.abspath(os.path.expanduser(path)) if path else None


def training_data_record(data_dir: str, mixture: str, split: str = "train", dataset_configs: Optional[str] = None,
                         tokenizer: Optional[str] = None) -> Dict[str, Any]:
    """The record of a run on `mixture` (its datasets must be registered, i.e. after the pipeline
    has loaded `dataset_configs`)."""
    weights = get_mixture(mixture)
    file = None
    if dataset_configs:
        with open(dataset_configs, "rb") as f:
            raw = f.read()
        file = {"path": _abs(dataset_configs), "sha256": hashlib.sha256(raw).hexdigest(),
                "content": raw.decode("utf-8", errors="replace")}
    return {"data_dir": _abs(data_dir), "mixture": mixture, "split": split,
            "mixture_weights": [[name, float(w)] for name, w in weights],
            "datasets": [dataclasses.asdict(_DATASETS[name]) for name, _ in weights],
            "dataset_configs_file": file, "tokenizer": _abs(tokenizer)}


def recorded_datasets(record: Optional[Dict[str, Any]]) -> Dict[str, DatasetConfig]:
    """{name: DatasetConfig} of a record (empty for None)."""
    return {d["name"]: DatasetConfig.from_dict(dict(d)) for d in (record or {}).get("datasets", [])}


def register_recorded(record: Dict[str, Any], where: str = "the checkpoint") -> List[str]:
    """Registers the record's datasets and mixture where the registry lacks them; returns the
    mixture's dataset names.

    A name already registered keeps its registration (e.g. from a `--dataset_configs` file passed
    on purpose); a different recorded config is reported in a warning. A dataset whose standardize
    function is not registered (it came from a .py dataset-config file) is an error naming the
    file to pass again.
    """
    file = record.get("dataset_configs_file") or {}
    for name, cfg in recorded_datasets(record).items():
        if name in _DATASETS:
            if _DATASETS[name] != cfg:
                log.warning("dataset %r is registered as %s; %s recorded %s: using the registered one",
                            name, _DATASETS[name], where, cfg)
            continue
        try:
            get_standardize(cfg.standardize)
        except ValueError:
            raise ValueError(f"{where} trained on dataset {name!r}, read by standardize function "
                             f"{cfg.standardize!r}, which is not registered in this process; pass the file that "
                             f"registers it: --dataset_configs={file.get('path') or 'FILE.py'}") from None
        register_dataset(cfg)
    mixture = record["mixture"]
    names = [n for n, _ in record.get("mixture_weights", [])]
    if mixture not in MIXTURES and mixture not in _DATASETS:
        register_mixture(mixture, [(n, float(w)) for n, w in record["mixture_weights"]])
    return names
