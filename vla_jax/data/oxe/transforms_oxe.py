"""Standardize transforms of the Open X-Embodiment datasets in the OpenVLA mixtures.

Same contract as transforms.py (`fn(traj, cfg) -> traj`, pure TF, action [T, 7] float32 with an
absolute gripper, 1 = open). Only the action and the instruction are produced: vla_jax loads no
proprioception or depth, so OpenVLA's state/depth re-keying is left out (except kuka's state
decoding, kept so the episode's state is usable). Raw feature layouts are noted per dataset.
"""

from __future__ import annotations

import tensorflow as tf

from vla_jax.data.oxe.configs import DatasetConfig
from vla_jax.data.oxe.gripper import invert_gripper_actions, rel2abs_gripper_actions
from vla_jax.data.oxe.rotations import quaternion_to_euler
from vla_jax.data.oxe.transforms import StandardizeFn, Traj, clip01, eef_action, finish

_NL = "natural_language_instruction"  # RT-X style datasets keep the instruction in the observation


def _rtx_instruction(traj: Traj) -> tf.Tensor:
    return traj["observation"][_NL]


def _last(x: tf.Tensor) -> tf.Tensor:
    """The gripper channel as [T]: accepts [T] or [T, 1] (layouts differ between datasets)."""
    x = tf.cast(x, tf.float32)
    return x[:, 0] if x.shape.rank == 2 else x


# --- RT-X format: action is a dict {world_vector [T,3], rotation_delta [T,3], gripper ...} ---

def rt1(traj: Traj, cfg: DatasetConfig) -> Traj:
    """fractal20220817_data: gripper_closedness_action [T,1] is relative (+1 close, -1 open)."""
    a = traj["action"]
    gripper = rel2abs_gripper_actions(_last(a["gripper_closedness_action"]))
    return finish(traj, eef_action(a["world_vector"], a["rotation_delta"], gripper), cfg, _rtx_instruction(traj))


def kuka(traj: Traj, cfg: DatasetConfig) -> Traj:
    """kuka: relative gripper like RT-1; its state features are ZLIB-compressed float32 bytes
    (base pose [T] -> [T, 7], gripper_closed [T] -> [T, 1])."""
    a = traj["action"]
    gripper = rel2abs_gripper_actions(_last(a["gripper_closedness_action"]))
    obs = dict(traj["observation"])
    for key, width in (("clip_function_input/base_pose_tool_reached", 7), ("gripper_closed", 1)):
        if key in obs and obs[key].dtype == tf.string:
            raw = tf.io.decode_raw(tf.io.decode_compressed(obs[key], compression_type="ZLIB"), tf.float32)
            obs[key] = tf.reshape(raw, [-1, width])
    traj = dict(traj, observation=obs)
    return finish(traj, eef_action(a["world_vector"], a["rotation_delta"], gripper), cfg, _rtx_instruction(traj))


def taco_play(traj: Traj, cfg: DatasetConfig) -> Traj:
    """taco_play: action['rel_actions_world'] [T,7], gripper -1 close / +1 open -> clip to [0,1]."""
    a = tf.cast(traj["action"]["rel_actions_world"], tf.float32)
    return finish(traj, tf.concat([a[:, :6], clip01(a[:, -1:])], -1), cfg, _rtx_instruction(traj))


def jaco_play(traj: Traj, cfg: DatasetConfig) -> Traj:
    """jaco_play: no rotation in the action (zeros); relative gripper [T,1]."""
    a = traj["action"]
    gripper = rel2abs_gripper_actions(_last(a["gripper_closedness_action"]))
    translation = a["world_vector"]
    return finish(traj, eef_action(translation, tf.zeros_like(translation), gripper), cfg, _rtx_instruction(traj))


def berkeley_cable_routing(traj: Traj, cfg: DatasetConfig) -> Traj:
    """berkeley_cable_routing: no gripper in the action; it is 0 (closed: the cable is held)."""
    a = traj["action"]
    zero = tf.zeros_like(tf.cast(a["world_vector"][:, 0], tf.float32))
    return finish(traj, eef_action(a["world_vector"], a["rotation_delta"], zero), cfg, _rtx_instruction(traj))


def _rtx_clip_invert(traj: Traj, cfg: DatasetConfig) -> Traj:
    """roboturk ([T,1]) / viola ([T]): absolute gripper with 1 = closed (-1 open): clip, invert."""
    a = traj["action"]
    gripper = invert_gripper_actions(clip01(_last(a["gripper_closedness_action"])))
    return finish(traj, eef_action(a["world_vector"], a["rotation_delta"], gripper), cfg, _rtx_instruction(traj))


def berkeley_autolab_ur5(traj: Traj, cfg: DatasetConfig) -> Traj:
    """berkeley_autolab_ur5: gripper_closedness_action [T] relative."""
    a = traj["action"]
    gripper = rel2abs_gripper_actions(_last(a["gripper_closedness_action"]))
    return finish(traj, eef_action(a["world_vector"], a["rotation_delta"], gripper), cfg, _rtx_instruction(traj))


def toto(traj: Traj, cfg: DatasetConfig) -> Traj:
    """toto: action['open_gripper'] bool [T] is already 1 = open."""
    a = traj["action"]
    return finish(traj, eef_action(a["world_vector"], a["rotation_delta"], a["open_gripper"]), cfg,
                  _rtx_instruction(traj))


def language_table(traj: Traj, cfg: DatasetConfig) -> Traj:
    """language_table: planar action [T,2] -> [dx, dy, 0, 0, 0, 0, 1] (gripper constant open; the
    min == max rule of normalization later zeroes it). The instruction is observation['instruction']
    int32 [T, 512]: Unicode code points padded with zeros."""
    xy = tf.cast(traj["action"], tf.float32)
    action = tf.concat([xy, tf.zeros_like(xy), tf.zeros_like(xy), tf.ones_like(xy[:, :1])], axis=-1)
    codes = tf.cast(traj["observation"]["instruction"], tf.int32)
    # Length = number of code points before the first zero.
    lengths = tf.reduce_sum(tf.math.cumprod(tf.cast(codes != 0, tf.int32), axis=-1), axis=-1)
    ragged = tf.RaggedTensor.from_tensor(codes, lengths=lengths)
    instruction = tf.strings.unicode_encode(ragged, output_encoding="UTF-8")
    return finish(traj, action, cfg, instruction)


def bc_z(traj: Traj, cfg: DatasetConfig) -> Traj:
    """bc_z: action dict of 10-step future predictions; the first step is the action.
    future/target_close int [T,10] is 1 = close -> invert."""
    a = traj["action"]
    gripper = invert_gripper_actions(tf.cast(a["future/target_close"][:, 0], tf.float32))
    return finish(traj, eef_action(a["future/xyz_residual"][:, :3], a["future/axis_angle_residual"][:, :3], gripper),
                  cfg, _rtx_instruction(traj))


# --- Flat action tensors [T, A] with a step-level 'language_instruction' ---

def _flat(traj: Traj) -> tf.Tensor:
    return tf.cast(traj["action"], tf.float32)


def invert_gripper(traj: Traj, cfg: DatasetConfig) -> Traj:
    """stanford_hydra, dlr_edan: action [T,7] with 1 = closed in [0, 1]: invert (no clip)."""
    a = _flat(traj)
    return finish(traj, tf.concat([a[:, :6], invert_gripper_actions(a[:, -1:])], -1), cfg)


def clip_invert_gripper(traj: Traj, cfg: DatasetConfig) -> Traj:
    """austin_buds / sailor / sirius, utaustin_mutex: action [T,7], gripper -1 open / +1 close:
    clip to [0, 1], then invert."""
    a = _flat(traj)
    return finish(traj, tf.concat([a[:, :6], invert_gripper_actions(clip01(a[:, -1:]))], -1), cfg)


def nyu_franka_play(traj: Traj, cfg: DatasetConfig) -> Traj:
    """nyu_franka_play: action [T,15]; the EEF deltas are [-8:-2], the gripper [-2] in -1/+1 (1 = open): clip."""
    a = _flat(traj)
    return finish(traj, tf.concat([a[:, -8:-2], clip01(a[:, -2:-1])], -1), cfg)


def furniture_bench(traj: Traj, cfg: DatasetConfig) -> Traj:
    """furniture_bench: action [T,8] = xyz, quaternion [x,y,z,w], gripper -1 open / +1 close."""
    a = _flat(traj)
    gripper = invert_gripper_actions(clip01(a[:, -1:]))
    return finish(traj, tf.concat([a[:, :3], quaternion_to_euler(a[:, 3:7]), gripper], -1), cfg)


def iamlab_cmu_pickup_insert(traj: Traj, cfg: DatasetConfig) -> Traj:
    """iamlab_cmu_pickup_insert: action [T,8] = xyz, quaternion [x,y,z,w], gripper (1 = open)."""
    a = _flat(traj)
    return finish(traj, tf.concat([a[:, :3], quaternion_to_euler(a[:, 3:7]), a[:, 7:8]], -1), cfg)


def drop_last_dim(traj: Traj, cfg: DatasetConfig) -> Traj:
    """ucsd_kitchen, cmu_stretch, cmu_franka_exploration: action [T,8] whose last dim is not part
    of the EEF action (a terminate flag); dims 0..6 are used as is."""
    return finish(traj, _flat(traj)[:, :-1], cfg)


def berkeley_fanuc(traj: Traj, cfg: DatasetConfig) -> Traj:
    """berkeley_fanuc_manipulation: action [T,6] has no gripper; use the gripper *state*
    (observation['state'][:, 6], 1 = closed) inverted."""
    state = tf.cast(traj["observation"]["state"], tf.float32)
    return finish(traj, tf.concat([_flat(traj), invert_gripper_actions(state[:, 6:7])], -1), cfg)


def passthrough(traj: Traj, cfg: DatasetConfig) -> Traj:
    """fmb_dataset, dobbe, maniskill, stanford_robocook: action [T,7] already in the target layout."""
    return finish(traj, _flat(traj), cfg)


def kaist_nonprehensile(traj: Traj, cfg: DatasetConfig) -> Traj:
    """kaist_nonprehensile: action [T,20]; the first 6 are EEF deltas; no gripper (0)."""
    a = _flat(traj)
    return finish(traj, tf.concat([a[:, :6], tf.zeros_like(a[:, :1])], -1), cfg)


def cmu_play_fusion(traj: Traj, cfg: DatasetConfig) -> Traj:
    """cmu_play_fusion: action [T,9] -> dims [0:3] and [-4:] (rotation and gripper)."""
    a = _flat(traj)
    return finish(traj, tf.concat([a[:, :3], a[:, -4:]], -1), cfg)


OXE_STANDARDIZE: dict[str, StandardizeFn] = {
    "rt1": rt1,
    "kuka": kuka,
    "taco_play": taco_play,
    "jaco_play": jaco_play,
    "berkeley_cable_routing": berkeley_cable_routing,
    "rtx_clip_invert": _rtx_clip_invert,
    "berkeley_autolab_ur5": berkeley_autolab_ur5,
    "toto": toto,
    "language_table": language_table,
    "bc_z": bc_z,
    "invert_gripper": invert_gripper,
    "clip_invert_gripper": clip_invert_gripper,
    "nyu_franka_play": nyu_franka_play,
    "furniture_bench": furniture_bench,
    "iamlab_cmu_pickup_insert": iamlab_cmu_pickup_insert,
    "drop_last_dim": drop_last_dim,
    "berkeley_fanuc": berkeley_fanuc,
    "passthrough": passthrough,
    "kaist_nonprehensile": kaist_nonprehensile,
    "cmu_play_fusion": cmu_play_fusion,
}
