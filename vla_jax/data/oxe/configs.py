"""`DatasetConfig` (how to read one RLDS dataset into the OpenVLA action space) and the built-in entries."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

# Action encodings OpenVLA trains on; the others in OXE (joint positions, bimanual) are rejected.
ACTION_DIMS = {"EEF_POS": 7, "EEF_R6": 10}
# How the generic standardize reads a raw gripper value (see transforms.generic_eef_pos).
GRIPPER_MODES = ("absolute", "absolute_inverted", "relative", "binarize")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One dataset of the registry.

    name: registry key (also the key of its statistics in dataset_statistics.json), e.g. 'bridge_orig'.
    image_key: primary camera key under steps/observation, e.g. 'image_0'.
    standardize: name of a registered standardize function `fn(traj, cfg) -> traj`.
    builder_name: TFDS builder directory under data_dir (defaults to `name`).
    version: TFDS version to load (None: the builder's default / only version).
    language_key: key of the instruction in the *standardized* trajectory.
    action_encoding: 'EEF_POS' (xyz, rpy deltas + gripper: 7-D) or 'EEF_R6' (xyz + 6-D rotation + gripper: 10-D).
    action_key, instruction_key, gripper: read only by the generic standardize ('generic_eef_pos'):
      the raw step keys of the action and the instruction ('/' descends into nested features, e.g.
      'observation/natural_language_instruction'), and how to read the raw gripper value:
      'absolute' (1 = open), 'absolute_inverted' (1 = closed), 'relative' (+1 close / -1 open
      commands) or 'binarize' (continuous, 1 = open, snapped to {0, 1}).
    frame_filter: optional name of a registered frame filter the pipeline applies after
      normalization (DROID drops frames whose motion is all zero).
    image_keys: every camera under steps/observation, primary first (e.g. ('image', 'wrist_image')).
      Give `image_key` or `image_keys` or both (then image_key must equal image_keys[0]); each is
      derived from the other. The pipeline reads the first `DataConfig.cameras` of them.
    proprio_key: the robot state under steps/observation (e.g. 'state'), float [T, D] per episode,
      read when `DataConfig.use_proprio` is set; None: the dataset has none.
    proprio_indices: optional dims of that state to keep, in order, negative counting from the end
      (LIBERO's 8-D proprio `state[:6] + state[-2:]` is (0, 1, 2, 3, 4, 5, -2, -1)); None keeps all.
    """

    name: str
    image_key: str = ""
    standardize: str = "generic_eef_pos"
    builder_name: str | None = None
    version: str | None = None
    language_key: str = "language_instruction"
    action_encoding: str = "EEF_POS"
    action_key: str = "action"
    instruction_key: str = "language_instruction"
    gripper: str = "absolute"
    frame_filter: str | None = None
    image_keys: Tuple[str, ...] = ()
    proprio_key: Optional[str] = None
    proprio_indices: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        self._resolve_cameras()
        if self.proprio_key is not None and (not isinstance(self.proprio_key, str) or not self.proprio_key):
            raise ValueError(f"dataset {self.name!r}: proprio_key must be None or a non-empty string, "
                             f"got {self.proprio_key!r}")
        if self.proprio_indices is not None:
            idx = self.proprio_indices
            if (isinstance(idx, (str, bytes)) or not hasattr(idx, "__iter__")
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx) or len(idx) == 0):
                raise ValueError(f"dataset {self.name!r}: proprio_indices must be a non-empty list of integers "
                                 f"(dims of the state, negative from the end), got {idx!r}")
            if self.proprio_key is None:
                raise ValueError(f"dataset {self.name!r}: proprio_indices {list(idx)} given without a proprio_key")
            object.__setattr__(self, "proprio_indices", tuple(int(i) for i in idx))
        for field in ("name", "image_key", "standardize", "language_key", "action_key", "instruction_key"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"DatasetConfig.{field} must be a non-empty string, got {value!r}")
        if self.builder_name is None or self.builder_name == "":
            object.__setattr__(self, "builder_name", self.name)
        if self.action_encoding not in ACTION_DIMS:
            raise ValueError(
                f"dataset {self.name!r}: action_encoding {self.action_encoding!r} is not supported; "
                f"expected one of {sorted(ACTION_DIMS)} (OpenVLA trains on end-effector actions only; "
                "joint-position datasets are left out)")
        if self.gripper not in GRIPPER_MODES:
            raise ValueError(f"dataset {self.name!r}: gripper {self.gripper!r} is not one of {GRIPPER_MODES}")

    def _resolve_cameras(self) -> None:
        keys = self.image_keys
        if isinstance(keys, str) or not hasattr(keys, "__iter__"):
            raise ValueError(f"dataset {self.name!r}: image_keys must be a list of camera keys (primary "
                             f"first), got {keys!r}")
        keys = tuple(keys)
        if any(not isinstance(k, str) or not k for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"dataset {self.name!r}: image_keys {list(keys)} must be distinct non-empty strings")
        if not keys and self.image_key:
            keys = (self.image_key,)
        if keys and not self.image_key:
            object.__setattr__(self, "image_key", keys[0])
        if keys and self.image_key != keys[0]:
            raise ValueError(f"dataset {self.name!r}: image_key {self.image_key!r} must be the primary camera, "
                             f"image_keys[0] = {keys[0]!r} (image_keys lists every camera, primary first); "
                             "give one of the two or make them agree")
        object.__setattr__(self, "image_keys", keys)

    def __repr__(self) -> str:
        # The statistics cache key hashes this repr: the camera and proprio fields appear only when
        # they differ from the one-camera defaults, so caches written before they existed still match.
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "image_keys" and v == (self.image_key,):
                continue
            if f.name in ("proprio_key", "proprio_indices") and v is None:
                continue
            parts.append(f"{f.name}={v!r}")
        return f"DatasetConfig({', '.join(parts)})"

    @property
    def num_cameras(self) -> int:
        return len(self.image_keys)

    @property
    def action_dim(self) -> int:
        """7 for EEF_POS, 10 for EEF_R6."""
        return ACTION_DIMS[self.action_encoding]

    @property
    def normalization_mask(self) -> list[bool]:
        """Which action dims BOUNDS_Q99 normalizes: all but the (absolute, {0,1}) gripper."""
        return [True] * (self.action_dim - 1) + [False]

    @property
    def absolute_action_mask(self) -> list[bool]:
        """Which action dims are absolute (only the gripper); the others are deltas."""
        return [False] * (self.action_dim - 1) + [True]

    @property
    def tfds_name(self) -> str:
        """The name to pass to `tfds.builder`: 'builder' or 'builder:version'."""
        return f"{self.builder_name}:{self.version}" if self.version else str(self.builder_name)

    @classmethod
    def from_dict(cls, d: dict) -> "DatasetConfig":
        """Build from a plain dict (a JSON entry); unknown keys are an error naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"a dataset config entry must be a dict of DatasetConfig fields, got {type(d).__name__}: {d!r}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"dataset config {d.get('name', '?')!r}: unknown field(s) {unknown}; "
                             f"allowed fields are {sorted(allowed)}")
        if "name" not in d or ("image_key" not in d and not d.get("image_keys")):
            raise ValueError(f"dataset config {d!r} lacks required field(s): 'name' and 'image_key' "
                             "(or 'image_keys', every camera, primary first)")
        d = dict(d)
        d.setdefault("image_key", "")
        for key in ("image_keys", "proprio_indices"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


LIBERO_PROPRIO_INDICES = (0, 1, 2, 3, 4, 5, -2, -1)


def _cfg(name: str, image_key: str, standardize: str, **kw) -> DatasetConfig:
    return DatasetConfig(name=name, image_key=image_key, standardize=standardize, **kw)


# Built-in entries: every dataset of the OpenVLA mixtures (mixtures.py), the LIBERO and DROID
# fine-tuning sets, and the shared Bridge debug data. Primary camera keys are OpenVLA's
# `image_obs_keys["primary"]`; joint-position datasets (e.g. berkeley_rpt) are not listed.
BUILTIN_DATASETS: tuple[DatasetConfig, ...] = (
    # Bridge V2 as published on the project website. OpenVLA's instructions rename the download's
    # 'bridge_dataset' folder to 'bridge_orig'; the unrenamed folder (and the shared debug data)
    # loads as 'bridge_dataset', same transform, statistics under that name.
    _cfg("bridge_orig", "image_0", "bridge_orig"),
    _cfg("bridge_dataset", "image_0", "bridge_orig"),
    _cfg("fractal20220817_data", "image", "rt1"),
    _cfg("kuka", "image", "kuka"),
    _cfg("taco_play", "rgb_static", "taco_play"),
    _cfg("jaco_play", "image", "jaco_play"),
    _cfg("berkeley_cable_routing", "image", "berkeley_cable_routing"),
    _cfg("roboturk", "front_rgb", "rtx_clip_invert"),
    _cfg("viola", "agentview_rgb", "rtx_clip_invert"),
    _cfg("berkeley_autolab_ur5", "image", "berkeley_autolab_ur5"),
    _cfg("toto", "image", "toto"),
    _cfg("language_table", "rgb", "language_table"),
    _cfg("stanford_hydra_dataset_converted_externally_to_rlds", "image", "invert_gripper"),
    _cfg("austin_buds_dataset_converted_externally_to_rlds", "image", "clip_invert_gripper"),
    _cfg("nyu_franka_play_dataset_converted_externally_to_rlds", "image", "nyu_franka_play"),
    _cfg("furniture_bench_dataset_converted_externally_to_rlds", "image", "furniture_bench"),
    _cfg("ucsd_kitchen_dataset_converted_externally_to_rlds", "image", "drop_last_dim"),
    _cfg("austin_sailor_dataset_converted_externally_to_rlds", "image", "clip_invert_gripper"),
    _cfg("austin_sirius_dataset_converted_externally_to_rlds", "image", "clip_invert_gripper"),
    _cfg("dlr_edan_shared_control_converted_externally_to_rlds", "image", "invert_gripper"),
    _cfg("iamlab_cmu_pickup_insert_converted_externally_to_rlds", "image", "iamlab_cmu_pickup_insert"),
    _cfg("utaustin_mutex", "image", "clip_invert_gripper"),
    _cfg("berkeley_fanuc_manipulation", "image", "berkeley_fanuc"),
    _cfg("cmu_stretch", "image", "drop_last_dim"),
    # OpenVLA notes that bc_z versions after 0.1.0 are broken: keep 0.1.0 in the data dir.
    _cfg("bc_z", "image", "bc_z"),
    _cfg("fmb_dataset", "image_side_1", "passthrough"),
    _cfg("dobbe", "wrist_image", "passthrough"),
    _cfg("droid", "exterior_image_1_left", "droid", frame_filter="droid_zero_action"),
    # rtx_franka only.
    _cfg("maniskill_dataset_converted_externally_to_rlds", "image", "passthrough"),
    _cfg("cmu_franka_exploration_dataset_converted_externally_to_rlds", "highres_image", "drop_last_dim"),
    _cfg("kaist_nonprehensile_converted_externally_to_rlds", "image", "kaist_nonprehensile"),
    _cfg("stanford_robocook_converted_externally_to_rlds", "image_1", "passthrough"),
    _cfg("cmu_play_fusion", "image", "cmu_play_fusion"),
    # Fine-tuning sets.
    _cfg("droid_wipe", "exterior_image_2_left", "droid_finetune"),
    # LIBERO with OpenVLA-OFT's inputs: third-person 'image' + 'wrist_image', and the 8-D proprio
    # state[:6] + state[-2:] (eef position, axis-angle, 2 gripper joints; OFT_REFERENCE.md §7).
    *(_cfg(f"libero_{suite}_no_noops", "image", "libero", image_keys=("image", "wrist_image"),
           proprio_key="state", proprio_indices=LIBERO_PROPRIO_INDICES)
      for suite in ("spatial", "object", "goal", "10")),
)
