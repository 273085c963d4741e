"""Standardize transforms: one raw RLDS episode -> the OpenVLA action space.

Contract of every standardize function `fn(traj, cfg) -> traj` (pure TF ops, runs in graph mode
inside `tf.data.Dataset.map`):
- in: one episode with every step feature batched over time T: `traj["observation"][k]` [T, ...]
  (images still encoded, tf.string [T]), `traj["action"]` [T, A] or a dict of such tensors,
  `traj["language_instruction"]` tf.string [T] where the dataset has one, other step keys
  (is_first, reward, ...) and optionally episode-level keys ("traj_metadata", "episode_metadata").
- out: the same dict with `action` float32 [T', cfg.action_dim] (gripper last: 1 = open,
  0 = closed), `traj[cfg.language_key]` tf.string [T'] and `observation` still holding
  `cfg.image_key`. Steps may be dropped (T' <= T); every step-level tensor is cut alike.

This file holds the shared helpers and the transforms the pipeline needs first (Bridge, the
generic user transform, LIBERO, DROID); the other OXE datasets are in `transforms_oxe.py`.
"""

from __future__ import annotations

from typing import Any, Callable

import tensorflow as tf

from vla_jax.data.oxe.configs import DatasetConfig
from vla_jax.data.oxe.gripper import binarize_gripper_actions, invert_gripper_actions, rel2abs_gripper_actions

Traj = dict[str, Any]
StandardizeFn = Callable[[Traj, DatasetConfig], Traj]

# Episode-level entries: not batched over steps, so never sliced with them.
EPISODE_KEYS = ("traj_metadata", "episode_metadata")


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------

def slice_steps(traj: Traj, start: int | None = None, stop: int | None = None) -> Traj:
    """Keep steps [start:stop] of every step-level tensor (nested dicts included)."""
    out = {}
    for key, value in traj.items():
        if key in EPISODE_KEYS:
            out[key] = value
        else:
            out[key] = tf.nest.map_structure(lambda x: x[start:stop], value)
    return out


def get_path(traj: Traj, path: str, dataset: str = "?") -> tf.Tensor:
    """`traj` lookup by a '/'-separated path ('observation/natural_language_instruction').

    Feature names that themselves contain '/' (kuka's 'clip_function_input/base_pose_tool_reached')
    are matched whole first.
    """
    node: Any = traj
    parts = path.split("/")
    i = 0
    while i < len(parts):
        if not isinstance(node, dict):
            raise ValueError(f"dataset {dataset!r}: key path {path!r} descends into a non-dict at {parts[i]!r}")
        # Longest key made of the remaining parts that exists at this level.
        for j in range(len(parts), i, -1):
            candidate = "/".join(parts[i:j])
            if candidate in node:
                node, i = node[candidate], j
                break
        else:
            raise ValueError(f"dataset {dataset!r}: key {parts[i]!r} of path {path!r} not found; "
                             f"available keys there: {sorted(node)}")
    return node


def finish(traj: Traj, action: tf.Tensor, cfg: DatasetConfig, instruction: tf.Tensor | None = None) -> Traj:
    """Install the standardized action (and instruction) and check the output contract.

    action: [T, cfg.action_dim] (any float/int dtype; cast to float32).
    instruction: tf.string [T]; default: traj[cfg.language_key], else traj['language_instruction'],
    else empty strings (the pipeline's skip_unlabeled then drops the episode).
    """
    traj = dict(traj)  # never mutate the caller's dict (matters when run eagerly)
    action = tf.cast(action, tf.float32)
    if action.shape.rank != 2 or (action.shape[-1] is not None and action.shape[-1] != cfg.action_dim):
        raise ValueError(f"dataset {cfg.name!r}: standardized action has shape {action.shape}, "
                         f"expected [T, {cfg.action_dim}] for {cfg.action_encoding}")
    traj["action"] = tf.ensure_shape(action, [None, cfg.action_dim])
    if instruction is None:
        if cfg.language_key in traj:
            instruction = traj[cfg.language_key]
        elif "language_instruction" in traj:
            instruction = traj["language_instruction"]
        else:
            instruction = tf.fill([tf.shape(action)[0]], "")
    if instruction.dtype != tf.string:
        raise ValueError(f"dataset {cfg.name!r}: language instruction has dtype {instruction.dtype}, expected tf.string")
    traj[cfg.language_key] = instruction
    observation = traj.get("observation")
    if not isinstance(observation, dict) or cfg.image_key not in observation:
        keys = sorted(observation) if isinstance(observation, dict) else observation
        raise ValueError(f"dataset {cfg.name!r}: primary image key {cfg.image_key!r} not in the "
                         f"trajectory's observation keys {keys}")
    return traj


def eef_action(translation: tf.Tensor, rotation: tf.Tensor, gripper: tf.Tensor) -> tf.Tensor:
    """Concatenate [T, 3] translation, [T, 3] rotation and a [T] or [T, 1] gripper into [T, 7] float32."""
    gripper = tf.cast(gripper, tf.float32)
    if gripper.shape.rank == 1:
        gripper = gripper[:, None]
    return tf.concat([tf.cast(translation, tf.float32), tf.cast(rotation, tf.float32), gripper], axis=-1)


def clip01(x: tf.Tensor) -> tf.Tensor:
    """Clip to [0, 1] (turns a -1/+1 gripper into 0/1)."""
    return tf.clip_by_value(tf.cast(x, tf.float32), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Bridge
# ---------------------------------------------------------------------------------------------

def relabel_bridge_actions(traj: Traj) -> Traj:
    """Replace the 6 motion dims by the achieved end-effector motion and drop the last step.

    action[t, :6] = state[t+1, :6] - state[t, :6]; the gripper is kept. In: T steps; out: T-1.
    The recorded Bridge commands are noisy, the achieved motion is what the policy should predict.
    """
    if "state" not in traj.get("observation", {}):
        raise ValueError("relabel_bridge_actions needs observation['state'] [T, >=6] (end-effector pose)")
    state = tf.cast(traj["observation"]["state"], tf.float32)
    motion = state[1:, :6] - state[:-1, :6]
    out = slice_steps(traj, stop=-1)
    out["action"] = tf.concat([motion, tf.cast(traj["action"][:-1, -1:], tf.float32)], axis=-1)
    return out


def bridge_orig(traj: Traj, cfg: DatasetConfig) -> Traj:
    """BridgeData V2 from the project website ('bridge_orig', 'bridge_dataset'): T -> T-2 steps.

    The first step is dropped (its action is all zero), the gripper is binarized, then the
    motion is relabeled from state deltas (which drops the last step).
    """
    traj = slice_steps(traj, start=1)
    action = tf.cast(traj["action"], tf.float32)
    traj["action"] = tf.concat([action[:, :6], binarize_gripper_actions(action[:, -1])[:, None]], axis=-1)
    traj = relabel_bridge_actions(traj)
    return finish(traj, traj["action"], cfg)


# ---------------------------------------------------------------------------------------------
# Generic user datasets
# ---------------------------------------------------------------------------------------------

def generic_eef_pos(traj: Traj, cfg: DatasetConfig) -> Traj:
    """For a dataset whose raw action (at cfg.action_key) already is [T, cfg.action_dim]
    end-effector deltas with the gripper last; only the gripper is converted, per cfg.gripper:

    - 'absolute': 1 = open, 0 = closed; clipped to [0, 1] (so -1/+1 with +1 = open also works);
    - 'absolute_inverted': 1 = closed; clipped to [0, 1] then inverted (LIBERO-style -1 open / +1 close);
    - 'relative': +1 close / -1 open / 0 keep commands, made absolute;
    - 'binarize': continuous with 1 = open, snapped to {0, 1}.
    The instruction is read from cfg.instruction_key.
    """
    action = tf.cast(get_path(traj, cfg.action_key, cfg.name), tf.float32)
    if action.shape.rank != 2 or action.shape[-1] != cfg.action_dim:
        raise ValueError(f"dataset {cfg.name!r}: generic_eef_pos needs {cfg.action_key!r} of shape "
                         f"[T, {cfg.action_dim}] ({cfg.action_encoding}), got {action.shape}; write a "
                         "custom standardize function (register_standardize) for other layouts")
    raw = action[:, -1]
    if cfg.gripper == "absolute":
        gripper = clip01(raw)
    elif cfg.gripper == "absolute_inverted":
        gripper = invert_gripper_actions(clip01(raw))
    elif cfg.gripper == "relative":
        gripper = rel2abs_gripper_actions(raw)
    else:  # 'binarize' (DatasetConfig validated the value)
        gripper = binarize_gripper_actions(raw)
    instruction = get_path(traj, cfg.instruction_key, cfg.name)
    new_action = tf.concat([action[:, :-1], gripper[:, None]], axis=-1)
    return finish(traj, new_action, cfg, instruction)


# ---------------------------------------------------------------------------------------------
# LIBERO (OpenVLA's regenerated *_no_noops sets) and DROID
# ---------------------------------------------------------------------------------------------

def libero(traj: Traj, cfg: DatasetConfig) -> Traj:
    """LIBERO: raw gripper is -1 open / +1 close; clip to [0, 1] then invert."""
    action = tf.cast(traj["action"], tf.float32)
    gripper = invert_gripper_actions(clip01(action[:, -1:]))
    return finish(traj, tf.concat([action[:, :6], gripper], axis=-1), cfg)


def _droid_action(traj: Traj) -> tf.Tensor:
    """DROID base-frame velocity action: cartesian_velocity [T, 6] + (1 - gripper_position) [T, 1]."""
    acts = traj["action_dict"]
    return tf.concat([tf.cast(acts["cartesian_velocity"], tf.float32),
                      1.0 - tf.cast(acts["gripper_position"], tf.float32)], axis=-1)


def droid(traj: Traj, cfg: DatasetConfig) -> Traj:
    """DROID ('droid'): base-frame velocity action; the two exterior cameras are swapped for about
    half of the episodes so the single loaded view covers both.

    OpenVLA draws the swap with an unseeded random op; we derive it from a hash of the episode's
    first exterior frame instead, so the choice is deterministic (reproducible data order and
    statistics) yet balanced across episodes.
    """
    obs = traj["observation"]
    left, right = "exterior_image_1_left", "exterior_image_2_left"
    if left in obs and right in obs:
        # reduce_join: a scalar even for an empty episode.
        first_frame = tf.strings.reduce_join(obs[left][:1])
        swap = tf.equal(tf.strings.to_hash_bucket_fast(first_frame, 2), 1)
        img1, img2 = obs[left], obs[right]
        obs = dict(obs)
        obs[left] = tf.where(swap, img2, img1)
        obs[right] = tf.where(swap, img1, img2)
        traj = dict(traj, observation=obs)
    return finish(traj, _droid_action(traj), cfg)


def droid_finetune(traj: Traj, cfg: DatasetConfig) -> Traj:
    """DROID-format fine-tuning sets ('droid_wipe'): same action, no camera swap."""
    return finish(traj, _droid_action(traj), cfg)


# Hard-coded DROID action q01/q99 of the 6 motion dims (OpenVLA's droid_utils), used because the
# filter runs on *normalized* actions: a zero motion maps to these values, not to 0.
_DROID_Q01 = (-0.7776297926902771, -0.5803514122962952, -0.5795090794563293,
              -0.6464047729969025, -0.7041108310222626, -0.8895104378461838)
_DROID_Q99 = (0.7597932070493698, 0.5726242214441299, 0.7351000607013702,
              0.6705610305070877, 0.6464948207139969, 0.8897542208433151)


def droid_zero_action_filter(frame: Traj) -> tf.Tensor:
    """Frame filter for DROID: False (drop) when every motion dim of the *normalized* action equals
    the normalized zero within 1e-5. frame['action']: [W, A] (window of actions) or [A]. Returns a
    scalar tf.bool.
    """
    action = tf.cast(frame["action"], tf.float32)
    q01 = tf.constant(_DROID_Q01, tf.float32)
    q99 = tf.constant(_DROID_Q99, tf.float32)
    normalized_zero = 2.0 * (0.0 - q01) / (q99 - q01 + 1e-8) - 1.0
    return tf.reduce_any(tf.abs(action[..., :6] - normalized_zero) > 1e-5)


# Standardize functions defined here, by registry name.
CORE_STANDARDIZE: dict[str, StandardizeFn] = {
    "bridge_orig": bridge_orig,
    "generic_eef_pos": generic_eef_pos,
    "libero": libero,
    "droid": droid,
    "droid_finetune": droid_finetune,
}

FRAME_FILTERS: dict[str, Callable[[Traj], tf.Tensor]] = {
    "droid_zero_action": droid_zero_action_filter,
}
