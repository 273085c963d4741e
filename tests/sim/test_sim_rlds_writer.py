"""The generic RLDS writer: exact round trip through TFDS's own reader, and bad input."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vla_jax.sim.rlds_writer import RLDSWriter, image_feature, make_episode, rlds_features


def _features():
    return rlds_features({"wrist": image_feature((8, 12), "png"),
                          "joints": tfds.features.Tensor(shape=(2,), dtype=np.float32)},
                         action_dim=7, episode_metadata={"episode_id": tfds.features.Scalar(dtype=np.int32)})


def _episode(rng, t, i, instruction="stack the cups", terminal=True):
    obs = {"wrist": rng.integers(0, 256, (t, 8, 12, 3), dtype=np.uint8),
           "joints": rng.normal(size=(t, 2)).astype(np.float32)}
    return make_episode(obs, rng.normal(size=(t, 7)), instruction, terminal=terminal,
                        metadata={"episode_id": i})


def test_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    written = {"train": [_episode(rng, 3 + i, i) for i in range(5)],
               "val": [_episode(rng, 4, 9, "open the box", terminal=False)]}
    folder = tmp_path / "user_robot" / "0.1.0"
    with RLDSWriter(str(folder), _features(), episodes_per_shard=2, description="test") as w:
        for split, eps in written.items():
            for ep in eps:
                w.add(split, ep)
    files = sorted(os.listdir(folder))
    assert [f for f in files if "train" in f] == [f"user_robot-train.tfrecord-0000{k}-of-00003" for k in range(3)]
    builder = tfds.builder_from_directory(str(folder))
    assert builder.info.name == "user_robot" and str(builder.info.version) == "0.1.0"
    assert builder.info.splits["train"].shard_lengths == [2, 2, 1]
    for split, eps in written.items():
        got = list(builder.as_dataset(split=split, shuffle_files=False))
        assert len(got) == len(eps)
        for want, ep in zip(eps, got):
            steps = list(tfds.as_numpy(ep["steps"]))
            assert int(ep["episode_metadata"]["episode_id"]) == want["episode_metadata"]["episode_id"]
            ws = want["steps"]
            assert len(steps) == len(ws["action"])
            for k, s in enumerate(steps):
                np.testing.assert_array_equal(s["observation"]["wrist"], ws["observation"]["wrist"][k])  # PNG: lossless
                np.testing.assert_array_equal(s["observation"]["joints"], ws["observation"]["joints"][k])
                np.testing.assert_array_equal(s["action"], ws["action"][k])
                assert s["language_instruction"].decode() == ws["language_instruction"][k]
                assert (s["is_first"], s["is_last"], s["is_terminal"]) == (k == 0, k == len(steps) - 1,
                                                                           bool(ws["is_terminal"][k]))
            assert steps[-1]["reward"] == (1.0 if split == "train" else 0.0)


def test_bad_input(tmp_path):
    feats = _features()
    rng = np.random.default_rng(1)
    with pytest.raises(ValueError, match="version like 1.0.0"):
        RLDSWriter(str(tmp_path / "robot" / "latest"), feats)
    with pytest.raises(ValueError, match="lower-case"):
        RLDSWriter(str(tmp_path / "MyRobot" / "1.0.0"), feats)
    with pytest.raises(ValueError, match="'steps' Dataset"):
        RLDSWriter(str(tmp_path / "robot" / "1.0.0"), tfds.features.FeaturesDict({"x": tfds.features.Text()}))
    with pytest.raises(ValueError, match=r"observation\['joints'\] has 2 steps but action has 3"):
        make_episode({"joints": np.zeros((2, 2))}, np.zeros((3, 7)), "x")
    w = RLDSWriter(str(tmp_path / "robot" / "1.0.0"), feats)
    bad = _episode(rng, 3, 0)
    bad["steps"]["observation"]["wrist"] = np.zeros((3, 9, 9, 3), np.uint8)
    with pytest.raises(ValueError, match="split 'train' does not match the features"):
        w.add("train", bad)
    with pytest.raises(ValueError, match="no episodes were added"):
        w.close()
    w.add("train", _episode(rng, 3, 0))
    w.close()
    with pytest.raises(ValueError, match="already exists and is not empty"):
        RLDSWriter(str(tmp_path / "robot" / "1.0.0"), feats)
