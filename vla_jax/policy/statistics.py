"""The checkpoint's dataset statistics as `Policy` uses them: which datasets it can un-normalize for,
their action dims, the un-normalization, and each dataset's gripper convention (a mixin of `Policy`,
reading its `norm_stats`, `codec`, `dataset_configs` and `source`)."""

from __future__ import annotations

from typing import Any, List, Mapping, Optional

import numpy as np


class DatasetStatistics:
    """Statistics and gripper conventions of the datasets a checkpoint trained on."""

    @property
    def unnorm_keys(self) -> List[str]:
        """Datasets whose action statistics the checkpoint carries."""
        return sorted(k for k, v in self.norm_stats.items() if isinstance(v, Mapping) and "action" in v)

    def resolve_unnorm_key(self, unnorm_key: Optional[str] = None) -> str:
        """OpenVLA's rule: None is allowed only with exactly one dataset; otherwise the key must exist."""
        keys = self.unnorm_keys
        if not keys:
            raise ValueError(f"the checkpoint ({self.source or 'in memory'}) carries no action statistics, so actions "
                             f"cannot be un-normalized (dataset_statistics keys: {sorted(self.norm_stats)})")
        if unnorm_key is None:
            if len(keys) != 1:
                raise ValueError(f"the checkpoint was trained on {len(keys)} datasets; pass unnorm_key, one of {keys}")
            return keys[0]
        if not isinstance(unnorm_key, str) or unnorm_key not in keys:
            raise ValueError(f"unknown unnorm_key {unnorm_key!r}; the checkpoint has statistics for {keys}")
        return unnorm_key

    def action_dim(self, unnorm_key: Optional[str] = None) -> int:
        """len(q01) of the dataset's statistics (sets how many tokens are decoded, as in OpenVLA): the one
        place the policy, the server and the evaluators read it."""
        key = self.resolve_unnorm_key(unnorm_key)
        return len(self.codec.action_statistics(self.norm_stats[key], f"{key!r} statistics")[0])

    def tokens_to_normalized(self, tokens) -> np.ndarray:
        """Action token ids [..., D] -> float64 normalized actions (`ActionCodec.decode`: OpenVLA's bin centers;
        non-action ids clipped)."""
        return self.codec.decode(tokens)

    def unnormalize(self, normalized: np.ndarray, unnorm_key: Optional[str] = None) -> np.ndarray:
        """float64 [..., D] in [-1, 1] -> raw actions with the key's q01/q99 (`ActionCodec.unnormalize`)."""
        key = self.resolve_unnorm_key(unnorm_key)
        return self.codec.unnormalize(normalized, self.norm_stats[key], f"{key!r} statistics")

    def dataset_config(self, unnorm_key: Optional[str] = None) -> Mapping[str, Any]:
        """DatasetConfig fields of the dataset behind `unnorm_key`: as the checkpoint recorded them, else
        as registered in this process (built-in datasets, `vla_jax.data.oxe.load_dataset_configs`)."""
        key = self.resolve_unnorm_key(unnorm_key)
        if key in self.dataset_configs:
            return self.dataset_configs[key]
        import dataclasses

        from vla_jax.data import oxe  # the registry (and TensorFlow): only for checkpoints without the record

        if key in oxe.registered_datasets():
            return dataclasses.asdict(oxe.get_dataset_config(key))
        raise ValueError(f"gripper='dataset': the checkpoint ({self.source or 'in memory'}) does not record how dataset "
                         f"{key!r} was registered (written before checkpoints kept their dataset configs) and it is "
                         f"not registered here; pass its dataset-config file (eval.py --dataset_configs=FILE.json, "
                         f"or vla_jax.data.oxe.load_dataset_configs(FILE) before predicting)")

    def check_gripper(self, gripper: str, unnorm_key: Optional[str] = None) -> None:
        """ValueError unless actions for `unnorm_key` can be returned in convention `gripper`."""
        from vla_jax.spec.gripper import check_gripper_output, dataset_convention

        if check_gripper_output(gripper) == "dataset":
            dataset_convention(self.dataset_config(unnorm_key))

    def convert_gripper(self, actions: np.ndarray, unnorm_key: Optional[str] = None,
                        gripper: str = "openvla") -> np.ndarray:
        """float64 [..., D] actions in OpenVLA's gripper convention -> `gripper`'s: 'openvla' (unchanged,
        1 = open, 0 = closed) or 'dataset' (the convention the dataset was registered with)."""
        from vla_jax.spec.gripper import check_gripper_output, to_dataset_gripper

        if check_gripper_output(gripper) == "openvla":
            return actions
        return to_dataset_gripper(actions, self.dataset_config(unnorm_key))

