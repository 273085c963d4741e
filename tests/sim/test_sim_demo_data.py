"""Meta-World demo episodes -> RLDS folder -> read back through the data pipeline.

Truth used: the TFDS reader (no vla_jax code), Meta-World's own success signal when the recorded
actions are replayed, and the simulated finger opening (state[3]) for the gripper convention.
"""

import json
import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vla_jax.data import oxe
from vla_jax.data.pipeline import DataConfig, make_dataset
from vla_jax.sim.demos import DemoSpec, generate
from vla_jax.sim.worker import SimWorkers

pytestmark = pytest.mark.slow  # generates and replays Meta-World demo episodes

# drawer-close: the expert closes the gripper (effort +1); drawer-open: it keeps it open (effort -1).
TASKS = ("drawer-close", "drawer-open")
SPEC = DemoSpec(tasks=TASKS, episodes_per_task=2, val_episodes_per_task=1, image_size=64, max_steps=150)
INSTR = {b"close the drawer": "drawer-close-v3", b"open the drawer": "drawer-open-v3"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sim_demo") / "data")
    summary = generate(out, SPEC, workers=2, say=lambda m: None)
    return out, summary


def _stack(steps):
    """[step dict] -> dict of arrays stacked over time (nested)."""
    first = steps[0]
    if isinstance(first, dict):
        return {k: _stack([s[k] for s in steps]) for k in first}
    return np.stack(steps)


_RAW = {}


def _raw_episodes(out, split):
    """Episodes as TFDS itself decodes them: {'steps': {...: [T, ...]}, 'episode_metadata': {...}}."""
    if (out, split) not in _RAW:
        builder = tfds.builder_from_directory(os.path.join(out, SPEC.name, SPEC.version))
        episodes = []
        for ep in builder.as_dataset(split=split):
            meta = {k: v.numpy() for k, v in ep["episode_metadata"].items()}
            episodes.append({"steps": _stack(list(tfds.as_numpy(ep["steps"]))), "episode_metadata": meta})
        _RAW[(out, split)] = (builder, episodes)
    return _RAW[(out, split)]


def test_builder_folder_and_splits(demo):
    out, summary = demo
    folder = os.path.join(out, SPEC.name, SPEC.version)
    files = sorted(os.listdir(folder))
    assert "dataset_info.json" in files and "features.json" in files
    assert any(f.startswith(f"{SPEC.name}-train.tfrecord-") for f in files)
    assert os.path.isfile(os.path.join(out, "COMPLETE"))
    builder, train = _raw_episodes(out, "train")
    _, val = _raw_episodes(out, "val")
    assert builder.info.splits["train"].num_examples == 4 and builder.info.splits["val"].num_examples == 2
    assert summary["episodes"] == {"train": 4, "val": 2}
    # Train episodes come from the training configurations (MT1 seed 0, first indices), val from the
    # held-out ones (MT1 seed 1) counted from the last index.
    assert sorted((e["episode_metadata"]["task"].decode(), int(e["episode_metadata"]["config_seed"]),
                   int(e["episode_metadata"]["config_index"])) for e in train) == \
        sorted((t + "-v3", 0, i) for t in TASKS for i in (0, 1))
    assert sorted((int(e["episode_metadata"]["config_seed"]), int(e["episode_metadata"]["config_index"]))
                  for e in val) == [(1, 49), (1, 49)]
    for ep in train + val:
        steps = ep["steps"]
        t = len(steps["action"])
        assert steps["observation"]["image"].shape == (t, 64, 64, 3) and steps["observation"]["image"].dtype == np.uint8
        assert steps["observation"]["state"].shape == (t, 39)
        assert steps["is_first"].tolist() == [True] + [False] * (t - 1)
        assert steps["is_last"].tolist() == [False] * (t - 1) + [True]
        assert steps["is_terminal"][-1] and steps["reward"][-1] == 1.0
        assert 0 < t < SPEC.max_steps
        assert np.all(steps["observation"]["image"].std(axis=(1, 2, 3)) > 10)  # a rendered scene, not blank


def test_recorded_actions_replay_to_success(demo):
    """Replaying the stored 7-D actions in a fresh simulator reproduces Meta-World's success at the
    recorded last step: actions, gripper mapping and configurations were stored faithfully."""
    out, _ = demo
    _, train = _raw_episodes(out, "train")
    with SimWorkers(1, image_size=64, max_steps=SPEC.max_steps) as sim:
        for ep in train[:2]:
            meta = ep["episode_metadata"]
            assert int(meta["config_seed"]) == 0
            sim.request(0, "reset", assignments=[(0, meta["task"].decode(), "train", int(meta["config_index"]), False)])
            actions, states = ep["steps"]["action"], ep["steps"]["observation"]["state"]
            for k, a in enumerate(actions):
                obs = sim.request(0, "step", actions={0: a}, render={0: False})[0]
                assert obs["success"] == (k == len(actions) - 1), f"success at step {k} of {len(actions)}"
                if k + 1 < len(actions):  # the stored state of the next step (float32)
                    np.testing.assert_allclose(obs["state"], states[k + 1], rtol=0, atol=1e-6)


def test_gripper_convention_matches_finger_opening(demo):
    """1 = open, 0 = closed: after gripper 0 the simulated fingers close (state[3], the finger
    opening, falls from 1); with gripper 1 they stay open."""
    out, _ = demo
    _, train = _raw_episodes(out, "train")
    for ep in train:
        task = ep["episode_metadata"]["task"].decode()
        grip = ep["steps"]["action"][:, 6]
        opening = ep["steps"]["observation"]["state"][:, 3]
        assert opening[0] > 0.95
        if task == "drawer-close-v3":
            assert np.all(grip == 0.0)
            assert opening[20:].max() < 0.5
        else:
            assert np.all(grip == 1.0)
            assert opening.min() > 0.9
        np.testing.assert_array_equal(ep["steps"]["action"][:, 3:6], 0.0)


def test_read_back_through_pipeline(demo):
    out, summary = demo
    assert "metaworld_demo" not in oxe.registered_datasets()  # no built-in entry: the user mechanism
    with open(os.path.join(out, "dataset_config.json")) as f:
        entries = json.load(f)
    assert entries[0]["standardize"] == "generic_eef_pos" and entries[0]["gripper"] == "absolute"
    cfg = DataConfig(data_dir=out, mixture=SPEC.name, dataset_configs=os.path.join(out, "dataset_config.json"),
                     split="train", batch_size=32, resize_size=32, shuffle_buffer=0, repeat=False, threads=2)
    ds, stats = make_dataset(cfg)
    frames = 0
    by_task = {}
    for b in ds.as_numpy_iterator():
        n = len(b["action"])
        frames += n
        assert b["image"].shape == (n, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["action"].shape == (n, 7) and b["action"].dtype == np.float32
        for instr, act in zip(b["language_instruction"], b["action"]):
            by_task.setdefault(INSTR[instr], []).append(act)
    assert frames == sum(v["steps"] for v in summary["splits"]["train"].values())
    assert stats[SPEC.name]["num_trajectories"] == 6  # statistics cover all splits
    # The gripper is not normalized (mask False): raw 1 = open / 0 = closed per task.
    assert np.all(np.array(by_task["drawer-close-v3"])[:, 6] == 0.0)
    assert np.all(np.array(by_task["drawer-open-v3"])[:, 6] == 1.0)
    acts = np.concatenate([np.array(v) for v in by_task.values()])
    assert np.all(np.abs(acts[:, :6]) <= 1.0) and np.all(acts[:, 3:6] == 0.0)  # zero-range dims -> 0


def test_cache_reuse_and_conflict(demo):
    out, summary = demo
    t0 = time.time()
    again = generate(out, SPEC, workers=2, say=lambda m: None)
    assert again == summary and time.time() - t0 < 2.0
    with pytest.raises(ValueError, match="other settings"):
        generate(out, DemoSpec(tasks=("reach",), episodes_per_task=1, image_size=64), say=lambda m: None)
