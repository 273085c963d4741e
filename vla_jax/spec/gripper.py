"""The gripper at the output: OpenVLA's convention (1 = open, 0 = closed) back into a dataset's own.

Training reads every dataset's gripper into OpenVLA's convention (`vla_jax/data/oxe/gripper.py`, `transforms.py`),
so a policy predicts that convention, and `Policy` returns it by default, like OpenVLA. A robot
whose dataset was registered with another convention needs the inverse of the registered
transform (`Policy.predict_action(..., gripper="dataset")`, the server's `"gripper"` payload key,
`eval.py --gripper=dataset`):

| registered as                          | dataset convention                   | output (g: OpenVLA's value)  |
|----------------------------------------|--------------------------------------|------------------------------|
| gripper='absolute'                     | 1 = open, 0 = closed                 | g                            |
| gripper='binarize', standardize 'bridge_orig' | continuous, 1 = open (snapped)  | g                            |
| gripper='absolute_inverted'            | 1 = closed, 0 = open                 | 1 - g                        |
| standardize 'libero'                   | -1 = open, +1 = close                | 1 - 2 g                      |
| gripper='relative'                     | commands: +1 close, -1 open, 0 keep  | -1 where g >= 0.5, else +1   |

A 'relative' dataset's commands are recovered as "open" / "close" every step: the registered
transform maps such a sequence back to the same absolute states (a repeated command keeps the
state). Other standardize functions (the OXE transforms of `transforms_oxe.py`, user functions)
convert the gripper in their own way and have no inverse here: asking for their convention is an
error naming the function.

Pure numpy: runs on the serving path without TensorFlow.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np

GRIPPER_OUTPUTS = ("openvla", "dataset")

_INVERSES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "absolute": lambda g: g,
    "binarize": lambda g: g,
    "absolute_inverted": lambda g: 1.0 - g,
    "libero": lambda g: 1.0 - 2.0 * g,
    "relative": lambda g: np.where(g >= 0.5, -1.0, 1.0),
}
# Standardize functions with a fixed gripper reading, by registry name (generic_eef_pos: cfg.gripper).
_STANDARDIZE_CONVENTION = {"bridge_orig": "binarize", "libero": "libero"}


def dataset_convention(cfg: Any) -> str:
    """The inverse's key for a DatasetConfig (or its dict); ValueError when there is none."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    standardize, name = get("standardize", "generic_eef_pos"), get("name", "?")
    if standardize == "generic_eef_pos":
        return get("gripper", "absolute")
    if standardize in _STANDARDIZE_CONVENTION:
        return _STANDARDIZE_CONVENTION[standardize]
    raise ValueError(f"gripper='dataset': dataset {name!r} is read by standardize function {standardize!r}, whose "
                     f"gripper conversion is not invertible here (invertible: generic_eef_pos with gripper in "
                     f"{sorted(k for k in _INVERSES if k != 'libero')}, and {sorted(_STANDARDIZE_CONVENTION)}); "
                     f"use gripper='openvla' (1 = open, 0 = closed)")


def check_gripper_output(gripper: str) -> str:
    if gripper not in GRIPPER_OUTPUTS:
        raise ValueError(f"gripper={gripper!r}; expected one of {GRIPPER_OUTPUTS} ('openvla': 1 = open, 0 = closed; "
                         f"'dataset': the convention the dataset was registered with)")
    return gripper


def to_dataset_gripper(actions: np.ndarray, cfg: Any) -> np.ndarray:
    """float64 [..., D] actions with the gripper last in OpenVLA's convention -> the same with the gripper
    in `cfg`'s convention (a new array)."""
    inverse = _INVERSES[dataset_convention(cfg)]
    out = np.array(actions, np.float64, copy=True)
    out[..., -1] = inverse(out[..., -1])
    return out
