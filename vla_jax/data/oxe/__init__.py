"""Open X-Embodiment dataset registry: per-dataset configs, standardize transforms and mixtures.

Typical use by the pipeline:

    cfg = get_dataset_config("bridge_orig")
    builder = tfds.builder(cfg.builder_name, data_dir=...)      # or cfg.tfds_name with a version
    traj = get_standardize(cfg.standardize)(traj, cfg)          # inside tf.data map
    for name, weight in get_mixture("oxe_magic_soup_plus_minus"): ...
"""

from vla_jax.data.oxe.config_files import load_dataset_configs
from vla_jax.data.oxe.configs import ACTION_DIMS, BUILTIN_DATASETS, GRIPPER_MODES, DatasetConfig
from vla_jax.data.oxe.gripper import binarize_gripper_actions, invert_gripper_actions, rel2abs_gripper_actions
from vla_jax.data.oxe.mixtures import MIXTURES, get_mixture, register_mixture
from vla_jax.data.oxe.registry import (
    get_dataset_config,
    get_frame_filter,
    get_standardize,
    register_dataset,
    register_frame_filter,
    register_standardize,
    registered_datasets,
)
from vla_jax.data.oxe.rotations import quaternion_to_euler
from vla_jax.data.oxe.transforms import relabel_bridge_actions

__all__ = [
    "ACTION_DIMS",
    "BUILTIN_DATASETS",
    "GRIPPER_MODES",
    "DatasetConfig",
    "MIXTURES",
    "binarize_gripper_actions",
    "get_dataset_config",
    "get_frame_filter",
    "get_mixture",
    "get_standardize",
    "invert_gripper_actions",
    "load_dataset_configs",
    "quaternion_to_euler",
    "register_dataset",
    "register_frame_filter",
    "register_mixture",
    "register_standardize",
    "registered_datasets",
    "rel2abs_gripper_actions",
    "relabel_bridge_actions",
]
