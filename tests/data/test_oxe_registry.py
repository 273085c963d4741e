"""The OXE dataset registry: configs, mixtures, gripper helpers, rotations and every standardize
transform, checked against plain numpy/scipy implementations of the documented semantics
(OPENVLA_REFERENCE.md sections 4-6), on synthetic episodes with each dataset's real feature keys
and on one real Bridge episode."""

import json
import zlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from scipy.spatial.transform import Rotation

from vla_jax.data import oxe

T = 9  # steps of every synthetic episode
ATOL = 1e-6  # float32 transforms that only copy, slice or subtract


# ---------------------------------------------------------------------------------------------
# Independent numpy references (plain loops over the documented rules)
# ---------------------------------------------------------------------------------------------

def binarize_np(a):
    """>0.95 -> 1, <0.05 -> 0, else the next decided value; the carry starts at the raw last value."""
    out, carry = np.zeros(len(a), np.float32), a[-1]
    for t in range(len(a) - 1, -1, -1):
        if a[t] > 0.95:
            carry = 1.0
        elif a[t] < 0.05:
            carry = 0.0
        out[t] = carry
    return out


def rel2abs_np(a):
    """+1 close / -1 open (dead band 0.1) -> absolute 1 open / 0 closed; starts opposite to the first command."""
    commands = [1 if x < -0.1 else (-1 if x > 0.1 else 0) for x in a]
    first = next((c for c in commands if c != 0), 0)
    state = -first if first != 0 else 1
    out = []
    for c in commands:
        if c != 0:
            state = c
        out.append((state + 1) / 2)
    return np.asarray(out, np.float32)


def bridge_np(action, state):
    """Drop step 0, binarize the gripper, relabel motion from state deltas, drop the last step."""
    action, state = action[1:], state[1:]
    gripper = binarize_np(action[:, -1])
    motion = state[1:, :6] - state[:-1, :6]
    return np.concatenate([motion, gripper[:-1, None]], axis=1)


def euler_np(quat_xyzw):
    return Rotation.from_quat(quat_xyzw.astype(np.float64)).as_euler("xyz")


def angle_diff(a, b):
    return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)


# ---------------------------------------------------------------------------------------------
# Gripper helpers and rotations
# ---------------------------------------------------------------------------------------------

def test_binarize_matches_loop():
    rng = np.random.default_rng(0)
    for trial in range(30):
        a = rng.choice([0.0, 0.01, 0.3, 0.5, 0.7, 0.97, 1.0], size=rng.integers(1, 20)).astype(np.float32)
        np.testing.assert_array_equal(oxe.binarize_gripper_actions(tf.constant(a)).numpy(), binarize_np(a))
    # Trailing undecided values keep the raw last value (carry initialized with it).
    np.testing.assert_array_equal(oxe.binarize_gripper_actions(tf.constant([1.0, 0.5, 0.4], tf.float32)).numpy(),
                                  np.float32([1.0, 0.4, 0.4]))
    assert oxe.binarize_gripper_actions(tf.zeros([0])).shape == (0,)


def test_rel2abs_matches_loop():
    rng = np.random.default_rng(1)
    for trial in range(30):
        a = rng.choice([-1.0, -0.5, -0.05, 0.0, 0.0, 0.0, 0.08, 0.6, 1.0], size=rng.integers(1, 20)).astype(np.float32)
        np.testing.assert_array_equal(oxe.rel2abs_gripper_actions(tf.constant(a)).numpy(), rel2abs_np(a))
    np.testing.assert_array_equal(oxe.rel2abs_gripper_actions(tf.zeros([4])).numpy(), np.ones(4, np.float32))
    np.testing.assert_array_equal(oxe.rel2abs_gripper_actions(tf.constant([0.0, 1.0, 0.0, -1.0])).numpy(),
                                  np.float32([1, 0, 0, 1]))
    np.testing.assert_array_equal(oxe.invert_gripper_actions(tf.constant([0.0, 0.25, 1.0])).numpy(),
                                  np.float32([1, 0.75, 0]))


def test_quaternion_to_euler_matches_scipy():
    q = Rotation.random(2000, random_state=0).as_quat()  # [x, y, z, w]
    ours = oxe.quaternion_to_euler(tf.constant(q, tf.float64)).numpy()
    assert angle_diff(ours, euler_np(q)).max() < 1e-9
    ours32 = oxe.quaternion_to_euler(tf.constant(q, tf.float32)).numpy()
    assert ours32.dtype == np.float32 and angle_diff(ours32, euler_np(q)).max() < 2e-3
    # Gimbal lock (pitch = +-90 deg): yaw is 0, pitch exact, and the angles rebuild the rotation.
    for pitch in (np.pi / 2, -np.pi / 2):
        for roll, yaw in ((0.3, -1.1), (2.0, 0.5), (-2.5, 2.9)):
            rot = Rotation.from_euler("xyz", [roll, pitch, yaw])
            ours = oxe.quaternion_to_euler(tf.constant(rot.as_quat(), tf.float64)).numpy()
            assert ours[2] == 0.0 and abs(ours[1] - pitch) < 1e-12
            np.testing.assert_allclose(Rotation.from_euler("xyz", ours).as_matrix(), rot.as_matrix(), atol=1e-6)
    with pytest.raises(ValueError, match="4"):
        oxe.quaternion_to_euler(tf.zeros([2, 3]))


# ---------------------------------------------------------------------------------------------
# Synthetic episodes with each dataset's real feature keys and shapes
# ---------------------------------------------------------------------------------------------

IMG, STR = "img", "str"


def f32(*shape, low=-1.0, high=1.0):
    return lambda rng: rng.uniform(low, high, (T, *shape)).astype(np.float32)


def pick(values, *shape, dtype=np.float32):
    return lambda rng: rng.choice(np.asarray(values), (T, *shape)).astype(dtype)


REL = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.05]  # relative gripper commands
PM1 = [-1.0, 1.0]                        # -1/+1 absolute gripper


def with_gripper(n, values, index=-1):
    """[T, n] float action whose dim `index` (the gripper) is drawn from `values`."""
    def gen(rng):
        a = rng.uniform(-1, 1, (T, n)).astype(np.float32)
        a[:, index] = rng.choice(values, T)
        return a
    return gen


OPEN_CLOSED = [0.0, 1.0]


def quat_action(gripper_values):
    """[T, 8]: xyz, unit quaternion [x, y, z, w], gripper."""
    def gen(rng):
        q = Rotation.random(T, random_state=int(rng.integers(1 << 30))).as_quat()
        return np.concatenate([rng.uniform(-1, 1, (T, 3)), q, rng.choice(gripper_values, (T, 1))], 1).astype(np.float32)
    return gen


def zlib_floats(width):
    def gen(rng):
        values = rng.uniform(-1, 1, (T, width)).astype(np.float32)
        return np.array([zlib.compress(v.tobytes()) for v in values], dtype=object), values
    return gen


LT_TEXT = "push the red star to the top left corner é"


def lt_instruction(rng):
    codes = np.zeros((T, 512), np.int32)
    codes[:, :len(LT_TEXT)] = [ord(c) for c in LT_TEXT]
    return codes


def build(spec, rng, extras):
    """Nested numpy episode from a spec; leaves are IMG, STR or generators."""
    out = {}
    for key, leaf in spec.items():
        if isinstance(leaf, dict):
            out[key] = build(leaf, rng, extras)
        elif leaf == IMG:
            out[key] = np.array([f"{key}-{t}".encode() for t in range(T)], dtype=object)
        elif leaf == STR:
            out[key] = np.array([b"pick up the spoon"] * T, dtype=object)
        else:
            value = leaf(rng)
            if isinstance(value, tuple):  # (encoded, decoded) pairs: keep the decoded for checks
                value, extras[key] = value
            out[key] = value
    return out


def rtx_obs(image_key, **more):
    return {image_key: IMG, "natural_language_instruction": STR, **more}


def rtx_act(gripper=None, rotation=True, **more):
    act = {"world_vector": f32(3), "terminate_episode": pick([0, 1], 3, dtype=np.int32), **more}
    if rotation:
        act["rotation_delta"] = f32(3)
    if gripper is not None:
        act["gripper_closedness_action"] = gripper
    return act


def flat(obs, action):
    return {"observation": obs, "action": action, "language_instruction": STR}


STEP_KEYS = {"is_first": pick([False], dtype=bool), "is_last": pick([False], dtype=bool),
             "is_terminal": pick([False], dtype=bool), "reward": f32(), "discount": f32()}


def wvrd(r):
    return np.concatenate([r["action"]["world_vector"], r["action"]["rotation_delta"]], 1)


def clip_inv(g):
    return 1.0 - np.clip(g, 0, 1)


BRIDGE = flat({"image_0": IMG, "image_1": IMG, "image_2": IMG, "image_3": IMG, "state": f32(7)},
              with_gripper(7, [0.0, 0.02, 0.5, 0.97, 1.0]))
LIBERO = flat({"image": IMG, "wrist_image": IMG, "state": f32(8), "joint_state": f32(7)}, with_gripper(7, PM1))
DROID = {
    "observation": {"exterior_image_1_left": IMG, "exterior_image_2_left": IMG, "wrist_image_left": IMG,
                    "cartesian_position": f32(6), "gripper_position": f32(1, low=0), "joint_position": f32(7)},
    "action_dict": {"cartesian_position": f32(6), "cartesian_velocity": f32(6), "gripper_position": f32(1, low=0),
                    "gripper_velocity": f32(1), "joint_position": f32(7), "joint_velocity": f32(7)},
    "action": f32(7), "language_instruction": STR, "language_instruction_2": STR, "language_instruction_3": STR,
}


def clip_inv6(r):
    return np.c_[r["action"][:, :6], clip_inv(r["action"][:, 6])]


AUSTIN = flat({"image": IMG, "wrist_image": IMG}, with_gripper(7, PM1))  # state (8-D or 24-D) unused


def droid_expected(r):
    return np.concatenate([r["action_dict"]["cartesian_velocity"], 1 - r["action_dict"]["gripper_position"]], 1)


# name -> (spec, expected action from the raw numpy episode r)
CASES = {
    "bridge_orig": (BRIDGE, lambda r: bridge_np(r["action"], r["observation"]["state"])),
    "bridge_dataset": (BRIDGE, lambda r: bridge_np(r["action"], r["observation"]["state"])),
    "fractal20220817_data": (
        {"observation": rtx_obs("image", base_pose_tool_reached=f32(7), gripper_closed=f32(1)),
         "action": rtx_act(pick(REL, 1), base_displacement_vector=f32(2), base_displacement_vertical_rotation=f32(1))},
        lambda r: np.c_[wvrd(r), rel2abs_np(r["action"]["gripper_closedness_action"][:, 0])]),
    "kuka": (
        {"observation": rtx_obs("image", **{"clip_function_input/base_pose_tool_reached": zlib_floats(7),
                                            "gripper_closed": zlib_floats(1)}),
         "action": rtx_act(pick(REL, 1), base_displacement_vector=f32(2), base_displacement_vertical_rotation=f32(1))},
        lambda r: np.c_[wvrd(r), rel2abs_np(r["action"]["gripper_closedness_action"][:, 0])]),
    "taco_play": (
        {"observation": rtx_obs("rgb_static", rgb_gripper=IMG, robot_obs=f32(15)),
         "action": {"rel_actions_world": with_gripper(7, PM1), "rel_actions_gripper": f32(7), "actions": f32(7),
                    "terminate_episode": pick([0, 1], dtype=np.int32)}},
        lambda r: np.c_[r["action"]["rel_actions_world"][:, :6], np.clip(r["action"]["rel_actions_world"][:, 6], 0, 1)]),
    "jaco_play": (
        {"observation": rtx_obs("image", image_wrist=IMG, end_effector_cartesian_pos=f32(7)),
         "action": rtx_act(pick(REL, 1), rotation=False)},
        lambda r: np.c_[r["action"]["world_vector"], np.zeros((T, 3)),
                        rel2abs_np(r["action"]["gripper_closedness_action"][:, 0])]),
    "berkeley_cable_routing": (
        {"observation": rtx_obs("image", top_image=IMG, wrist45_image=IMG, wrist225_image=IMG, robot_state=f32(7)),
         "action": rtx_act()},
        lambda r: np.c_[wvrd(r), np.zeros(T)]),
    "roboturk": ({"observation": rtx_obs("front_rgb"), "action": rtx_act(pick(PM1, 1))},
                 lambda r: np.c_[wvrd(r), clip_inv(r["action"]["gripper_closedness_action"][:, 0])]),
    "viola": (
        {"observation": rtx_obs("agentview_rgb", eye_in_hand_rgb=IMG, joint_states=f32(7), gripper_states=f32(2),
                                ee_states=f32(16)),
         "action": rtx_act(pick(PM1))},
        lambda r: np.c_[wvrd(r), clip_inv(r["action"]["gripper_closedness_action"])]),
    "berkeley_autolab_ur5": (
        {"observation": rtx_obs("image", hand_image=IMG, image_with_depth=f32(4, 4, 1), robot_state=f32(15)),
         "action": rtx_act(pick(REL))},
        lambda r: np.c_[wvrd(r), rel2abs_np(r["action"]["gripper_closedness_action"])]),
    "toto": ({"observation": rtx_obs("image", state=f32(7)), "action": rtx_act(open_gripper=pick([False, True], dtype=bool))},
             lambda r: np.c_[wvrd(r), r["action"]["open_gripper"].astype(np.float32)]),
    "language_table": (
        {"observation": {"rgb": IMG, "effector_translation": f32(2), "effector_target_translation": f32(2),
                         "instruction": lt_instruction},
         "action": f32(2)},
        lambda r: np.c_[r["action"], np.zeros((T, 4)), np.ones(T)]),
    "stanford_hydra_dataset_converted_externally_to_rlds": (
        flat({"image": IMG, "wrist_image": IMG, "state": f32(27)}, with_gripper(7, [0.0, 0.3, 1.0])),
        lambda r: np.c_[r["action"][:, :6], 1 - r["action"][:, 6]]),
    "austin_buds_dataset_converted_externally_to_rlds": (AUSTIN, clip_inv6),
    "nyu_franka_play_dataset_converted_externally_to_rlds": (
        flat({"image": IMG, "image_additional_view": IMG, "depth": f32(4, 4, 1), "depth_additional_view": f32(4, 4, 1),
              "state": f32(13)},
             lambda rng: np.c_[with_gripper(14, PM1)(rng), rng.uniform(-1, 1, (T, 1))].astype(np.float32)),
        lambda r: np.c_[r["action"][:, 7:13], np.clip(r["action"][:, 13], 0, 1)]),
    "furniture_bench_dataset_converted_externally_to_rlds": (  # quaternion -> Euler, then clip + invert
        flat({"image": IMG, "wrist_image": IMG, "state": f32(35)}, quat_action(PM1)),
        lambda r: np.c_[r["action"][:, :3], euler_np(r["action"][:, 3:7]), clip_inv(r["action"][:, 7])]),
    "ucsd_kitchen_dataset_converted_externally_to_rlds": (
        flat({"image": IMG, "state": f32(21)}, with_gripper(8, OPEN_CLOSED, 6)), lambda r: r["action"][:, :7]),
    "austin_sailor_dataset_converted_externally_to_rlds": (AUSTIN, clip_inv6),
    "austin_sirius_dataset_converted_externally_to_rlds": (AUSTIN, clip_inv6),
    "dlr_edan_shared_control_converted_externally_to_rlds": (
        flat({"image": IMG, "state": f32(7)}, with_gripper(7, [0.0, 1.0])),
        lambda r: np.c_[r["action"][:, :6], 1 - r["action"][:, 6]]),
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": (
        flat({"image": IMG, "wrist_image": IMG, "state": f32(20)}, quat_action([0.0, 1.0])),
        lambda r: np.c_[r["action"][:, :3], euler_np(r["action"][:, 3:7]), r["action"][:, 7]]),
    "utaustin_mutex": (AUSTIN, clip_inv6),
    "berkeley_fanuc_manipulation": (
        flat({"image": IMG, "wrist_image": IMG, "end_effector_state": f32(7),
              "state": lambda rng: np.c_[rng.uniform(-1, 1, (T, 6)), rng.choice([0.0, 1.0], (T, 1)),
                                         rng.uniform(-1, 1, (T, 6))].astype(np.float32)}, f32(6)),
        lambda r: np.c_[r["action"], 1 - r["observation"]["state"][:, 6]]),
    "cmu_stretch": (flat({"image": IMG, "state": f32(4)}, with_gripper(8, OPEN_CLOSED, 6)), lambda r: r["action"][:, :7]),
    "bc_z": (
        {"observation": rtx_obs("image", **{"present/xyz": f32(3), "present/axis_angle": f32(3),
                                            "present/sensed_close": f32(1)}),
         "action": {"future/xyz_residual": f32(30), "future/axis_angle_residual": f32(30),
                    "future/target_close": pick([0, 1], 10, dtype=np.int64)}},
        lambda r: np.c_[r["action"]["future/xyz_residual"][:, :3], r["action"]["future/axis_angle_residual"][:, :3],
                        1 - r["action"]["future/target_close"][:, 0]]),
    "fmb_dataset": (
        flat({"image_side_1": IMG, "image_side_2": IMG, "image_wrist_1": IMG, "image_wrist_2": IMG,
              "eef_pose": f32(7), "state_gripper_pose": f32()}, with_gripper(7, OPEN_CLOSED)), lambda r: r["action"]),
    "dobbe": (flat({"wrist_image": IMG, "state": f32(7)}, with_gripper(7, OPEN_CLOSED)), lambda r: r["action"]),
    "droid": (DROID, droid_expected),
    "droid_wipe": (DROID, droid_expected),
    "maniskill_dataset_converted_externally_to_rlds": (
        flat({"image": IMG, "wrist_image": IMG, "depth": f32(4, 4, 1), "wrist_depth": f32(4, 4, 1), "state": f32(18),
              "tcp_pose": f32(7), "base_pose": f32(7)}, with_gripper(7, OPEN_CLOSED)), lambda r: r["action"]),
    "cmu_franka_exploration_dataset_converted_externally_to_rlds": (
        flat({"highres_image": IMG, "image": IMG}, with_gripper(8, OPEN_CLOSED, 6)), lambda r: r["action"][:, :7]),
    "kaist_nonprehensile_converted_externally_to_rlds": (
        flat({"image": IMG, "state": f32(21)}, f32(20)), lambda r: np.c_[r["action"][:, :6], np.zeros(T)]),
    "stanford_robocook_converted_externally_to_rlds": (
        flat({"image_1": IMG, "image_2": IMG, "image_3": IMG, "image_4": IMG, "depth_1": f32(4, 4), "state": f32(7)},
             with_gripper(7, OPEN_CLOSED)), lambda r: r["action"]),
    "cmu_play_fusion": (flat({"image": IMG, "state": f32(8)}, with_gripper(9, OPEN_CLOSED)),
                        lambda r: np.c_[r["action"][:, :3], r["action"][:, 5:9]]),
    "libero_spatial_no_noops": (LIBERO, clip_inv6),
    "libero_object_no_noops": (LIBERO, clip_inv6),
    "libero_goal_no_noops": (LIBERO, clip_inv6),
    "libero_10_no_noops": (LIBERO, clip_inv6),
}


def run_standardize(name, raw):
    """Apply the registered transform inside tf.data.map (graph mode, as the pipeline does)."""
    cfg = oxe.get_dataset_config(name)
    fn = oxe.get_standardize(cfg.standardize)
    traj = tf.nest.map_structure(tf.constant, raw)
    ds = tf.data.Dataset.from_tensors(traj).map(lambda t: fn(t, cfg))
    return cfg, tf.nest.map_structure(lambda x: x.numpy(), ds.get_single_element())


def test_every_builtin_dataset_has_a_synthetic_case():
    assert sorted(CASES) == sorted(c.name for c in oxe.BUILTIN_DATASETS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_standardize_on_synthetic_episode(name):
    spec, expected_fn = CASES[name]
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    extras = {}
    raw = build({**spec, **STEP_KEYS}, rng, extras)
    raw["traj_metadata"] = {"episode_id": np.int32(3)}
    cfg, out = run_standardize(name, raw)
    expected = np.asarray(expected_fn(raw), np.float32)
    t_out = expected.shape[0]
    assert out["action"].dtype == np.float32 and out["action"].shape == (t_out, 7) == (t_out, cfg.action_dim)
    tol = 2e-4 if "furniture" in name or "iamlab" in name else ATOL  # float32 quaternion -> Euler
    if tol != ATOL:
        assert angle_diff(out["action"][:, 3:6], expected[:, 3:6]).max() < tol
        np.testing.assert_allclose(out["action"][:, [0, 1, 2, 6]], expected[:, [0, 1, 2, 6]], atol=ATOL, rtol=0)
    else:
        np.testing.assert_allclose(out["action"], expected, atol=tol, rtol=0)
    gripper = out["action"][:, -1]
    assert np.all((gripper >= 0) & (gripper <= 1)), gripper
    # Every step-level tensor is cut alike; the episode metadata is untouched; the image is kept.
    instruction = out[cfg.language_key]
    assert instruction.shape == (t_out,) and out["is_first"].shape == (t_out,)
    assert out["observation"][cfg.image_key].shape == (t_out,)
    assert out["traj_metadata"]["episode_id"] == 3
    if name == "language_table":
        assert [s.decode("utf-8") for s in instruction] == [LT_TEXT] * T
    elif name.startswith("bridge"):
        np.testing.assert_array_equal(out["observation"]["image_0"], raw["observation"]["image_0"][1:-1])
    else:
        assert set(instruction) == {b"pick up the spoon"}
    if name == "kuka":
        for key, width in (("clip_function_input/base_pose_tool_reached", 7), ("gripper_closed", 1)):
            np.testing.assert_array_equal(out["observation"][key], extras[key])
    if name == "droid":  # exterior cameras swapped or not, consistently over the episode
        o1, o2 = out["observation"]["exterior_image_1_left"], out["observation"]["exterior_image_2_left"]
        r1, r2 = raw["observation"]["exterior_image_1_left"], raw["observation"]["exterior_image_2_left"]
        assert ((o1 == r1).all() and (o2 == r2).all()) or ((o1 == r2).all() and (o2 == r1).all())


def test_droid_swap_is_balanced_and_deterministic():
    cfg = oxe.get_dataset_config("droid")
    fn = oxe.get_standardize(cfg.standardize)
    raw = build(DROID, np.random.default_rng(0), {})
    swaps = []
    for i in range(40):  # eager: same op graph, much faster than 40 tf.data pipelines
        raw["observation"]["exterior_image_1_left"] = np.array([f"ep{i}-{t}".encode() for t in range(T)], dtype=object)
        outs = [fn(tf.nest.map_structure(tf.constant, raw), cfg)["observation"]["exterior_image_1_left"].numpy()
                for _ in range(2)]
        np.testing.assert_array_equal(outs[0], outs[1])
        swaps.append(outs[0][0] != raw["observation"]["exterior_image_1_left"][0])
    assert 8 <= sum(swaps) <= 32, sum(swaps)


def test_droid_zero_action_filter():
    keep = oxe.get_frame_filter(oxe.get_dataset_config("droid").frame_filter)
    q01 = np.float32([-0.7776297926902771, -0.5803514122962952, -0.5795090794563293,
                      -0.6464047729969025, -0.7041108310222626, -0.8895104378461838])
    q99 = np.float32([0.7597932070493698, 0.5726242214441299, 0.7351000607013702,
                      0.6705610305070877, 0.6464948207139969, 0.8897542208433151])
    zero = 2 * (0 - q01) / (q99 - q01 + 1e-8) - 1
    still = np.r_[zero, 1.0].astype(np.float32)[None]  # window of 1, gripper differs: still dropped
    moving = still.copy()
    moving[0, 2] += 0.01
    assert not bool(keep({"action": tf.constant(still)}))
    assert bool(keep({"action": tf.constant(moving)}))


# ---------------------------------------------------------------------------------------------
# Real Bridge episode
# ---------------------------------------------------------------------------------------------

def test_bridge_transform_on_real_episode(bridge_data_dir):
    builder = tfds.builder_from_directory(str(bridge_data_dir / "bridge_dataset" / "1.0.0"))
    decoders = {"steps": {"observation": {f"image_{i}": tfds.decode.SkipDecoding() for i in range(4)}}}
    ds = builder.as_dataset(split="train", decoders=decoders, read_config=tfds.ReadConfig(try_autocache=False))
    episode = next(iter(ds.take(1)))
    steps = episode["steps"].batch(1000).get_single_element()
    raw = tf.nest.map_structure(lambda x: x.numpy(), dict(steps))
    assert raw["observation"]["image_0"].dtype == object  # still JPEG bytes
    traj = dict(steps, traj_metadata=episode["episode_metadata"])
    cfg = oxe.get_dataset_config("bridge_dataset")
    out = oxe.get_standardize(cfg.standardize)(traj, cfg)  # eager
    expected = bridge_np(raw["action"], raw["observation"]["state"])
    assert expected.shape == (len(raw["action"]) - 2, 7)
    np.testing.assert_allclose(out["action"].numpy(), expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(out["language_instruction"].numpy(), raw["language_instruction"][1:-1])
    np.testing.assert_array_equal(out["observation"]["image_0"].numpy(), raw["observation"]["image_0"][1:-1])
    # Relabeled motion is the achieved state delta, not the recorded command.
    assert not np.allclose(out["action"].numpy()[:, :6], raw["action"][1:-1, :6])


# ---------------------------------------------------------------------------------------------
# Configs, mixtures and user registration
# ---------------------------------------------------------------------------------------------

# OPENVLA_REFERENCE.md section 6, oxe_magic_soup_plus.
MAGIC_SOUP_PLUS = {
    "fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_orig": 1.0, "taco_play": 2.0,
    "jaco_play": 1.0, "berkeley_cable_routing": 1.0, "roboturk": 2.0, "viola": 2.0, "berkeley_autolab_ur5": 2.0,
    "toto": 1.0, "language_table": 0.1, "stanford_hydra_dataset_converted_externally_to_rlds": 2.0,
    "fmb_dataset": 1.0, "droid": 0.06, "austin_buds_dataset_converted_externally_to_rlds": 1.0,
    "nyu_franka_play_dataset_converted_externally_to_rlds": 3.0,
    "furniture_bench_dataset_converted_externally_to_rlds": 0.1,
    "ucsd_kitchen_dataset_converted_externally_to_rlds": 2.0,
    "austin_sailor_dataset_converted_externally_to_rlds": 1.0,
    "austin_sirius_dataset_converted_externally_to_rlds": 1.0,
    "dlr_edan_shared_control_converted_externally_to_rlds": 1.0,
    "iamlab_cmu_pickup_insert_converted_externally_to_rlds": 1.0, "utaustin_mutex": 1.0,
    "berkeley_fanuc_manipulation": 2.0, "cmu_stretch": 1.0, "bc_z": 0.2, "dobbe": 0.2,
}


def test_mixtures():
    required = ["bridge", "bridge_rt_1", "rtx", "rtx_franka", "oxe_magic_soup", "oxe_magic_soup_plus",
                "oxe_magic_soup_plus_minus", "droid_wipe"] + [f"libero_{s}_no_noops" for s in ("spatial", "object", "goal", "10")]
    assert set(required) <= set(oxe.MIXTURES)
    for name in oxe.MIXTURES:
        for dataset, weight in oxe.get_mixture(name):
            assert oxe.get_dataset_config(dataset).name == dataset and weight > 0
    plus = oxe.get_mixture("oxe_magic_soup_plus")
    assert len(plus) == 27 and dict(plus) == MAGIC_SOUP_PLUS
    minus = dict(oxe.get_mixture("oxe_magic_soup_plus_minus"))
    expected_minus = {k: v for k, v in MAGIC_SOUP_PLUS.items() if k not in ("language_table", "droid")}
    expected_minus["fractal20220817_data"] = 1.0
    assert len(minus) == 25 and minus == expected_minus
    rtx = dict(oxe.get_mixture("rtx"))
    assert rtx["jaco_play"] == 2.0 and rtx["berkeley_cable_routing"] == 3.0 and rtx["roboturk"] == 1.0 and len(rtx) == 10
    franka = dict(oxe.get_mixture("rtx_franka"))
    assert franka["taco_play"] == 2.0 and franka["cmu_franka_exploration_dataset_converted_externally_to_rlds"] == 5.0
    assert "berkeley_rpt_converted_externally_to_rlds" not in franka
    assert oxe.get_mixture("bridge") == [("bridge_orig", 1.0)]
    assert oxe.get_mixture("bridge_dataset") == [("bridge_dataset", 1.0)]
    with pytest.raises(ValueError, match="oxe_magic_soup_plus_minus"):
        oxe.get_mixture("no_such_mixture")


def test_config_fields_and_errors():
    cfg = oxe.get_dataset_config("bridge_orig")
    assert (cfg.image_key, cfg.builder_name, cfg.action_dim) == ("image_0", "bridge_orig", 7)
    assert oxe.get_dataset_config("bridge_dataset").image_key == "image_0"
    assert cfg.normalization_mask == [True] * 6 + [False] and cfg.absolute_action_mask == [False] * 6 + [True]
    r6 = oxe.DatasetConfig(name="r6_robot", image_key="cam", action_encoding="EEF_R6")
    assert r6.action_dim == 10 and r6.normalization_mask == [True] * 9 + [False] and r6.builder_name == "r6_robot"
    with pytest.raises(ValueError, match="JOINT_POS"):
        oxe.DatasetConfig(name="joints", image_key="cam", action_encoding="JOINT_POS")
    with pytest.raises(ValueError, match="gripper"):
        oxe.DatasetConfig(name="g", image_key="cam", gripper="sometimes")
    with pytest.raises(ValueError) as err:
        oxe.get_dataset_config("no_such_dataset")
    msg = str(err.value)
    assert "no_such_dataset" in msg and all(name in msg for name in oxe.registered_datasets())
    assert "register_dataset(" in msg and "--config.data.dataset_configs=FILE.json" in msg
    with pytest.raises(ValueError, match="already registered"):
        oxe.register_dataset(oxe.DatasetConfig(name="bridge_orig", image_key="image_1", standardize="bridge_orig"))
    oxe.register_dataset(oxe.get_dataset_config("bridge_orig"))  # identical: no-op
    with pytest.raises(ValueError, match="unknown standardize"):
        oxe.register_dataset(oxe.DatasetConfig(name="x_robot", image_key="cam", standardize="missing_fn"))


def _generic_episode(gripper_values, n=7, action_key="action", obs_key="front"):
    rng = np.random.default_rng(5)
    raw = {"observation": {obs_key: np.array([b"x"] * T, dtype=object)},
           action_key: with_gripper(n, gripper_values)(rng),
           "language_instruction": np.array([b"wipe the table"] * T, dtype=object), **build(STEP_KEYS, rng, {})}
    return raw


def test_register_from_json_and_generic_gripper_modes(tmp_path):
    entries = [
        {"name": "json_abs", "image_key": "front", "standardize": "generic_eef_pos", "gripper": "absolute"},
        {"name": "json_inv", "image_key": "front", "gripper": "absolute_inverted"},
        {"name": "json_rel", "image_key": "front", "gripper": "relative", "builder_name": "my_builder",
         "version": "1.0.0"},
        {"name": "json_bin", "image_key": "front", "gripper": "binarize"},
    ]
    path = tmp_path / "datasets.json"
    path.write_text(json.dumps({"datasets": entries, "mixtures": {"json_mix": [["json_abs", 1.0], ["json_rel", 0.5]]}}))
    assert oxe.load_dataset_configs(path) == ["json_abs", "json_inv", "json_rel", "json_bin"]
    assert oxe.load_dataset_configs(path) == ["json_abs", "json_inv", "json_rel", "json_bin"]  # reload: no-op
    assert oxe.get_mixture("json_mix") == [("json_abs", 1.0), ("json_rel", 0.5)]
    assert oxe.get_dataset_config("json_rel").tfds_name == "my_builder:1.0.0"
    cases = {"json_abs": ([-1.0, 0.0, 0.4, 1.0], lambda g: np.clip(g, 0, 1)),
             "json_inv": ([-1.0, 1.0], lambda g: 1 - np.clip(g, 0, 1)),
             "json_rel": (REL, rel2abs_np),
             "json_bin": ([0.0, 0.5, 0.99, 1.0], binarize_np)}
    for name, (values, expected_gripper) in cases.items():
        raw = _generic_episode(values)
        _, out = run_standardize(name, raw)
        np.testing.assert_allclose(out["action"], np.c_[raw["action"][:, :6], expected_gripper(raw["action"][:, 6])],
                                   atol=ATOL, rtol=0)
        assert set(out["language_instruction"]) == {b"wipe the table"}
    # '/' paths reach nested features; the raw action need not be called 'action'.
    nested = oxe.DatasetConfig(name="json_nested", image_key="front", action_key="action_dict/eef",
                               instruction_key="observation/task")
    oxe.register_dataset(nested)
    raw = _generic_episode([0.0, 1.0], action_key="eef")
    raw["action_dict"] = {"eef": raw.pop("eef")}
    raw["observation"]["task"] = np.array([b"stack the cups"] * T, dtype=object)
    _, out = run_standardize("json_nested", raw)
    np.testing.assert_allclose(out["action"], raw["action_dict"]["eef"], atol=ATOL, rtol=0)
    assert set(out["language_instruction"]) == {b"stack the cups"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"name": "bad_one", "image_key": "cam", "camera": "oops"}]))
    with pytest.raises(ValueError, match="camera"):
        oxe.load_dataset_configs(bad)
    wrong_dim = oxe.DatasetConfig(name="json_wrong_dim", image_key="front")
    oxe.register_dataset(wrong_dim)
    with pytest.raises(ValueError, match=r"\[T, 7\]"):
        run_standardize("json_wrong_dim", _generic_episode([0.0, 1.0], n=8))


def test_register_from_python_file(tmp_path):
    path = tmp_path / "my_datasets.py"
    path.write_text(
        "import tensorflow as tf\n"
        "from vla_jax.data.oxe import DatasetConfig, register_dataset, register_standardize\n"
        "\n"
        "def doubled(traj, cfg):\n"
        "    a = tf.cast(traj['action'], tf.float32)\n"
        "    traj['action'] = tf.concat([2.0 * a[:, :6], a[:, 6:]], axis=-1)\n"
        "    traj['language_instruction'] = traj['observation']['task']\n"
        "    return traj\n"
        "\n"
        "register_standardize('py_doubled', doubled)\n"
        "register_dataset(DatasetConfig(name='py_robot', image_key='front', standardize='py_doubled'))\n")
    assert oxe.load_dataset_configs(path) == ["py_robot"]
    assert oxe.load_dataset_configs(path) == ["py_robot"]  # unchanged file: not executed again
    assert "py_robot" in oxe.registered_datasets() and oxe.get_mixture("py_robot") == [("py_robot", 1.0)]
    raw = _generic_episode([0.0, 1.0])
    raw["observation"]["task"] = np.array([b"open the drawer"] * T, dtype=object)
    _, out = run_standardize("py_robot", raw)
    np.testing.assert_allclose(out["action"], np.c_[2 * raw["action"][:, :6], raw["action"][:, 6]], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "cfg.yaml").write_text("x: 1")
        oxe.load_dataset_configs(tmp_path / "cfg.yaml")
