"""What `eval.py` evaluates on when only `--checkpoint` is given: the checkpoint's own record of its
training data (asset `training_data`, `vla_jax.data.oxe.record`), so the held-out split of the
datasets it trained on is found with no other flag. Flags given explicitly win over the record.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional


@dataclasses.dataclass
class EvalData:
    data_dir: str
    dataset: str  # a dataset or mixture name, registered in this process
    out: str


def _default_out(checkpoint: str) -> Optional[str]:
    """RUN/eval for a vla_jax workdir or one of its step folders; None otherwise."""
    from vla_jax import checkpoints as ckpt_lib

    try:
        step_dir = ckpt_lib.resolve_step_dir(checkpoint)
    except ValueError:
        return None
    if step_dir.parent.name == "checkpoints":
        return os.path.join(str(step_dir.parent.parent), "eval")
    return None


def resolve_eval_data(checkpoint: str, *, data_dir: Optional[str] = None, dataset: Optional[str] = None,
                      out: Optional[str] = None, dataset_configs: Optional[str] = None,
                      is_hf: bool = False) -> EvalData:
    """Fills data_dir / dataset / out from the checkpoint where not given, registering the datasets and
    mixture it recorded (after the user's `dataset_configs`, which take precedence). Raises ValueError
    naming the flag to pass when something is neither given nor recorded."""
    from vla_jax import checkpoints as ckpt_lib
    from vla_jax.data import oxe
    from vla_jax.data.oxe.record import register_recorded

    if dataset_configs:
        oxe.load_dataset_configs(dataset_configs)
    record = None if is_hf else ckpt_lib.load_assets(checkpoint).get("training_data")
    if record:
        register_recorded(record, where=f"checkpoint {checkpoint}")
    if not (data_dir and dataset) and not record:
        why = ("an HF OpenVLA folder does not record its training data" if is_hf else
               f"checkpoint {checkpoint} does not record its training data (written before checkpoints kept it, or "
               f"trained on synthetic data)")
        raise ValueError(f"{why}: pass --data_dir=FOLDER (holding the TFDS builder folders) and --dataset=NAME "
                         f"(plus --dataset_configs=FILE.json for a dataset of your own)")
    out = out or _default_out(checkpoint)
    if not out:
        raise ValueError(f"pass --out=FOLDER for the report ({checkpoint} is not a vla_jax workdir, so there is no "
                         f"default RUN/eval)")
    return EvalData(data_dir=data_dir or record["data_dir"], dataset=dataset or record["mixture"], out=out)
