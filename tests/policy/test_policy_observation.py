"""Observation dicts (vla_jax/policy/observation.py): camera names and OpenVLA-OFT's aliases, the errors
naming the field, and the proprio normalization at inference against a numpy float64 formula written out
from OFT_REFERENCE.md §7 (upstream's `normalize_proprio`: q01/q99, clip, no zeroing of constant dims),
beside the training rule (constant dims -> 0) it differs from. A one-camera policy takes an observation
dict the same as a bare image."""

import numpy as np
import pytest

from tests.policy.test_policy_helpers import cached_policy, random_images
from vla_jax.policy import observation as obs_lib

TWO = ("primary", "wrist")


def images(n, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def test_camera_keys_and_aliases():
    assert obs_lib.camera_keys(("primary",)) == {"primary": 0, "image": 0, "full_image": 0}
    assert obs_lib.camera_keys(TWO) == {"primary": 0, "wrist": 1, "image": 0, "full_image": 0, "wrist_image": 1}
    # The RLDS key names as camera names: each is its own key, 'wrist_image' is the wrist camera.
    assert obs_lib.camera_keys(("image", "wrist_image")) == {"image": 0, "wrist_image": 1, "full_image": 0}
    # Two cameras, neither named *wrist*: OFT's 'wrist_image' is the second one.
    assert obs_lib.camera_keys(("front", "side"))["wrist_image"] == 1
    # ALOHA's order: two wrist cameras, so 'wrist_image' names neither (ambiguous).
    aloha = obs_lib.camera_keys(("primary", "left_wrist", "right_wrist"))
    assert "wrist_image" not in aloha and aloha["right_wrist"] == 2


def test_rows_by_name_alias_and_batched_dict_agree():
    a, b, c, d = images(4)
    state = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    by_name = [{"primary": a, "wrist": b, "state": state[0]}, {"primary": c, "wrist": d, "state": state[1]}]
    oft = [{"full_image": a, "wrist_image": b, "state": state[0]}, {"image": c, "wrist_image": d, "proprio": state[1]}]
    batched = {"full_image": np.stack([a, c]), "wrist": [b, d], "state": state}
    for inputs in (by_name, oft, batched):
        per_cam, got_state, instr = obs_lib.rows(inputs, "open the drawer", TWO, 4)
        for got, want in zip(per_cam, ([a, c], [b, d])):
            assert len(got) == 2 and all(np.array_equal(g, w) for g, w in zip(got, want))
        np.testing.assert_array_equal(got_state, state)
        assert got_state.dtype == np.float64 and instr == ["open the drawer"] * 2


@pytest.mark.parametrize("obs, match", [
    ({"primary": 0}, r"observation 0: missing camera\(s\) \['wrist'\]; this checkpoint takes camera 'primary' as "
                     r"'primary' / 'image' / 'full_image'; camera 'wrist' as 'wrist' / 'wrist_image'"),
    ({"primary": 0, "wrist": 0, "left_wrist_image": 0, "state": [0] * 4},
     r"observation 0: unknown key\(s\) \['left_wrist_image'\]: not a camera of this checkpoint"),
    ({"image": 0, "full_image": 0, "wrist": 0, "state": [0] * 4},
     r"camera\(s\) given twice: 'primary' as \['image', 'full_image'\]"),
    ({"primary": 0, "wrist": 0}, r"observation 0: missing 'state': this checkpoint takes a raw 4-D proprio state"),
    ({"primary": 0, "wrist": 0, "state": [0.0] * 3},
     r"observation 0\['state'\] \(the proprio state\) must have shape \[4\] \(4 values = the checkpoint's "
     r"proprio_dim\), got \[3\]"),
    ({"primary": 0, "wrist": 0, "state": [0.0, np.nan, 0.0, 0.0]}, r"\['state'\] .* holds non-finite values"),
    ({"primary": 0, "wrist": 0, "state": "high"}, r"\['state'\] \(the proprio state\) must be numbers"),
    ({"primary": 0, "wrist": 0, "state": [0] * 4, "proprio": [0] * 4}, r"proprio state is given twice"),
])
def test_bad_observations_name_the_field(obs, match):
    obs = {k: (images(1)[0] if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in obs.items()}
    with pytest.raises(ValueError, match=match):
        obs_lib.rows([obs], "x", TWO, 4)


def test_state_refused_without_proprio_and_images_refused_with_cameras():
    with pytest.raises(ValueError, match=r"'state' given, but this checkpoint takes no proprio state .*proprio_dim=None"):
        obs_lib.rows([{"image": images(1)[0], "state": [1.0]}], "x", ("primary",), None)
    with pytest.raises(ValueError, match=r"takes an observation dict per row \(camera 'primary' .*camera 'wrist'"):
        obs_lib.rows(images(2), "x", TWO, None)
    with pytest.raises(ValueError, match=r"batched observation takes images \[B, H, W, 3\], got shape \[8, 8, 3\]"):
        obs_lib.rows({"primary": images(1)[0], "wrist": images(1)[0]}, "x", TWO, None)
    with pytest.raises(ValueError, match=r"same number of images.*'primary': 2, 'wrist': 1"):
        obs_lib.rows({"primary": images(2), "wrist": images(1)}, "x", TWO, None)
    with pytest.raises(ValueError, match=r"must have shape \[2, 4\]"):
        obs_lib.rows({"primary": images(2), "wrist": images(2), "state": np.zeros(4)}, "x", TWO, 4)
    with pytest.raises(ValueError, match="2 observations but 3 instructions"):
        obs_lib.rows({"primary": images(2), "wrist": images(2)}, ["a", "b", "c"], TWO, None)


def proprio_entry(q01, q99):
    q01, q99 = np.asarray(q01, np.float64), np.asarray(q99, np.float64)
    return {"proprio": {"q01": q01.tolist(), "q99": q99.tolist(), "min": (q01 - 1).tolist(),
                        "max": np.where(q01 == q99, q01 - 1, q99 + 1).tolist(),
                        "mean": q01.tolist(), "std": q01.tolist()}}


def test_inference_normalization_against_float64_formula():
    q01 = np.array([-0.3, 0.0, 1.0, 0.5])
    q99 = np.array([0.3, 0.08, 3.0, 0.5])  # dim 3 constant in training (min == max == q01 == q99 = 0.5)
    entry = proprio_entry(q01, q99)
    entry["proprio"]["min"][3] = entry["proprio"]["max"][3] = 0.5
    rng = np.random.default_rng(3)
    x = np.stack([rng.uniform(q01 - 0.2, q99 + 0.2) for _ in range(64)])
    x[:3, 3] = [0.5, 0.5 + 1e-3, 0.5 - 1e-3]  # at, above and below the constant value
    # OFT_REFERENCE §7, upstream's inference rule (OU:649-679): every dim, no min == max zeroing.
    want = np.clip(2.0 * (x - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0)
    got = obs_lib.normalize_state(x, entry, "test statistics")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(got[:3, 3], [-1.0, 1.0, -1.0])  # the constant dim is not zeroed ...
    from vla_jax.data.normalization import normalize_proprio

    train = normalize_proprio(x, entry)  # ... while training (the data pipeline's rule) feeds it 0
    np.testing.assert_array_equal(train[:, 3], 0.0)
    np.testing.assert_array_equal(train[:, :3], got[:, :3])  # the rules agree on every dim that varied
    with pytest.raises(ValueError, match=r"test statistics: the proprio statistics have 4 dims but the "
                                         r"checkpoint's proprio_dim is 3"):
        obs_lib.normalize_state(x[:, :3], entry, "test statistics")
    with pytest.raises(ValueError, match=r"test statistics have no 'proprio' q01/q99"):
        obs_lib.normalize_state(x, {"action": {}}, "test statistics")


def test_one_camera_policy_takes_observation_dicts(llama_tokenizer_path):
    policy = cached_policy(str(llama_tokenizer_path))
    img_a, img_b = random_images(2, seed=31)
    want = policy.predict_actions([img_a, img_b], ["open the drawer", "stack the cups"])
    for key in ("image", "full_image", "primary"):
        got = policy.predict_actions([{key: img_a}, {key: img_b}], ["open the drawer", "stack the cups"])
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(policy.predict_action({"full_image": img_a}, "open the drawer"), want[0])
    np.testing.assert_array_equal(policy.predict_actions({"image": np.stack([img_a, img_b])},
                                                         ["open the drawer", "stack the cups"]), want)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['wrist_image'\].*camera 'primary'"):
        policy.predict_action({"image": img_a, "wrist_image": img_b}, "open the drawer")
    with pytest.raises(ValueError, match=r"'state' given, but this checkpoint takes no proprio state"):
        policy.predict_action({"image": img_a, "state": [0.0] * 4}, "open the drawer")
    with pytest.raises(ValueError, match=r"missing camera\(s\) \['primary'\]"):
        policy.predict_action({}, "open the drawer")
    with pytest.raises(ValueError, match=r"image 0: expected an RGB image of shape \[H, W, 3\], got shape \(64, 64\)"):
        policy.predict_action({"image": img_a[..., 0]}, "open the drawer")
