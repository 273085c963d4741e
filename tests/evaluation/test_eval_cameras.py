"""Offline evaluation of a policy with several cameras and proprio reads every camera and the raw state of
held-out episodes: checked on the multi-camera RLDS fixture written with plain tfds
(tests/fixtures/multicam_rlds.py) against the arrays it wrote (PNG: lossless), and the batched observation
an episode hands the policy uses the policy's camera names in image_keys order."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"))
import multicam_rlds as fx  # noqa: E402  (top-level module: tfds resolves a builder's files from it)

PROPRIO_INDICES = [0, 1, 2, 3, 4, 5, -2, -1]


@pytest.fixture(scope="module")
def multicam(tmp_path_factory):
    root = tmp_path_factory.mktemp("multicam_eval")
    data_dir = str(root / "data")
    fx.MulticamDebug(data_dir=data_dir).download_and_prepare()
    cfg = root / "cameras.json"
    cfg.write_text(json.dumps({"datasets": [{"name": "multicam_debug", "image_keys": ["image", "wrist_image"],
                                             "proprio_key": "state", "proprio_indices": PROPRIO_INDICES,
                                             "gripper": "absolute"}]}))
    return data_dir, str(cfg)


def test_episodes_carry_every_camera_and_the_raw_state(multicam):
    from vla_jax.evaluation.episodes import iter_episodes

    data_dir, cfg = multicam
    (ep,) = list(iter_episodes(data_dir, "multicam_debug", "val", dataset_configs=cfg, cameras=2, proprio=True))
    (raw,) = fx.raw_episodes("val")
    np.testing.assert_array_equal(ep.images, raw["image"])
    assert len(ep.more_images) == 1
    np.testing.assert_array_equal(ep.more_images[0], raw["wrist_image"])  # its own size: 24 x 24
    want_state = raw["state"][:, [i % fx.STATE_DIM for i in PROPRIO_INDICES]]
    np.testing.assert_array_equal(ep.proprio, want_state)  # raw: the policy normalizes it itself
    np.testing.assert_array_equal(ep.actions, raw["action"])
    rows = np.array([1, 3])
    obs = ep.observations(("primary", "wrist"), rows, with_state=True)
    assert list(obs) == ["primary", "wrist", "state"]
    np.testing.assert_array_equal(obs["wrist"], raw["wrist_image"][rows])
    np.testing.assert_array_equal(obs["state"], want_state[rows])
    with pytest.raises(ValueError, match=r"has 2 camera\(s\) but the policy takes 3"):
        ep.observations(("a", "b", "c"), rows, with_state=False)
    # One camera, no proprio: as before (only the primary, no state).
    (one,) = list(iter_episodes(data_dir, "multicam_debug", "val", dataset_configs=cfg))
    np.testing.assert_array_equal(one.images, raw["image"])
    assert one.more_images == () and one.proprio is None
    with pytest.raises(ValueError, match="read without its proprio state"):
        one.observations(("primary",), rows, with_state=True)
