"""The RLDS pipeline on the real Bridge debug episodes (25 x 10 steps per split, 64x64 JPEG).

Truth is computed here independently: episodes are parsed straight from the TFRecord files as
tf.train.Example protos, the Bridge standardization (OPENVLA_REFERENCE.md §4) and BOUNDS_Q99 are
written in numpy, images are decoded and resized with PIL."""

import json

import numpy as np
import pytest
import tensorflow as tf

from vla_jax.data import pipeline, transforms
from vla_jax.data.oxe import DatasetConfig, register_dataset, register_mixture
from vla_jax.spec import ActionCodec
from vla_jax.tokenizer import VLATokenizer

BUILDER = "bridge_dataset"


# ------------------------------------------------------------------------------------------------
# Independent numpy reference.

def parse_split(data_dir, split):
    path = data_dir / BUILDER / "1.0.0" / f"{BUILDER}-{split}.tfrecord-00000-of-00001"
    eps = []
    for rec in tf.data.TFRecordDataset(str(path)):
        f = tf.train.Example.FromString(rec.numpy()).features.feature
        eps.append({
            "action": np.array(f["steps/action"].float_list.value, np.float32).reshape(-1, 7),
            "state": np.array(f["steps/observation/state"].float_list.value, np.float32).reshape(-1, 7),
            "instruction": list(f["steps/language_instruction"].bytes_list.value),
            "image": list(f["steps/observation/image_0"].bytes_list.value),
        })
    return eps


def binarize_np(g):
    """>0.95 -> 1, <0.05 -> 0, else the value of the next decided step (carry starts at g[-1])."""
    out, carry = np.empty_like(g), g[-1]
    for t in range(len(g) - 1, -1, -1):
        carry = 1.0 if g[t] > 0.95 else 0.0 if g[t] < 0.05 else carry
        out[t] = carry
    return out


def bridge_np(ep):
    """Drop step 0, binarize the gripper, relabel motion from state deltas (drops the last step)."""
    a, s = ep["action"][1:], ep["state"][1:]
    grip = binarize_np(a[:, 6])
    action = np.concatenate([s[1:, :6] - s[:-1, :6], grip[:-1, None]], axis=1)
    return {"action": action, "instruction": ep["instruction"][1:-1], "image": ep["image"][1:-1]}


@pytest.fixture(scope="module")
def reference(bridge_data_dir):
    std = [bridge_np(e) for split in ("train", "val") for e in parse_split(bridge_data_dir, split)]
    a = np.concatenate([e["action"] for e in std]).astype(np.float64)
    stats = {"mean": a.mean(0), "std": a.std(0), "min": a.min(0), "max": a.max(0),
             "q01": np.quantile(a, 0.01, axis=0), "q99": np.quantile(a, 0.99, axis=0)}
    mask = np.array([True] * 6 + [False])
    norm = np.where(mask, np.clip(2 * (a - stats["q01"]) / (stats["q99"] - stats["q01"] + 1e-8) - 1, -1, 1), a)
    norm = np.where(stats["min"] == stats["max"], 0.0, norm)
    frames = [(e["image"][t], e["instruction"][t]) for e in std for t in range(len(e["action"]))]
    return {"episodes": std, "stats": stats, "normalized": norm, "frames": frames}


@pytest.fixture(scope="module")
def cfg(bridge_data_dir, tmp_path_factory):
    return pipeline.DataConfig(data_dir=str(bridge_data_dir), mixture=BUILDER, batch_size=8, resize_size=32,
                               shuffle_buffer=64, seed=3, max_seq_len=48,
                               stats_cache_dir=str(tmp_path_factory.mktemp("stats")))


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_path):
    return VLATokenizer.from_file(llama_tokenizer_path, max_len=48)


def match_rows(actions, normalized, atol=1e-5):
    """Index of the reference frame each normalized action row comes from (asserts a match)."""
    d = np.abs(actions[:, None, :].astype(np.float64) - normalized[None]).max(-1)
    idx = d.argmin(1)
    assert (d[np.arange(len(idx)), idx] <= atol).all(), d.min(1)
    return idx


# ------------------------------------------------------------------------------------------------

def test_bridge_standardization_matches_numpy(cfg, reference):
    got = list(pipeline.standardized_trajectories(cfg, split="all").as_numpy_iterator())
    assert len(got) == 50
    by_images = {tuple(e["image"]): e for e in reference["episodes"]}
    for traj in got:
        ref = by_images[tuple(traj["image"])]  # the same steps, selected by their JPEG bytes
        assert traj["action"].shape == (8, 7) and traj["action"].dtype == np.float32
        np.testing.assert_allclose(traj["action"], ref["action"], rtol=0, atol=1e-7)
        assert set(np.unique(traj["action"][:, 6])) <= {0.0, 1.0}
        assert list(traj["language_instruction"]) == ref["instruction"]
        assert (traj["dataset_index"] == 0).all()


def test_statistics_match_numpy(cfg, reference):
    stats = pipeline.dataset_statistics(cfg)
    assert list(stats) == [BUILDER]
    e = stats[BUILDER]
    assert set(e) == {"action", "proprio", "num_transitions", "num_trajectories"}
    assert set(e["action"]) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert e["num_transitions"] == 400 and e["num_trajectories"] == 50
    assert e["action"]["mask"] == [True] * 6 + [False]
    assert all(v == [0.0] * 7 for v in e["proprio"].values()) and len(e["proprio"]) == 6
    for k, ref in reference["stats"].items():
        np.testing.assert_allclose(e["action"][k], ref, rtol=1e-5, atol=1e-8, err_msg=k)


def test_batches_shapes_labels_and_content_at_224(cfg, reference, tokenizer):
    import dataclasses

    cfg224 = dataclasses.replace(cfg, resize_size=224, batch_size=4)
    it = pipeline.make_train_iterator(cfg224, tokenizer, 0, 1)
    at = ActionCodec()
    for _ in range(3):
        b = next(it)
        assert set(b) == {"pixel_values", "input_ids", "attention_mask", "labels", "actions", "dataset_index"}
        assert b["pixel_values"].shape == (4, 224, 224, 3) and b["pixel_values"].dtype == np.uint8
        for k in ("input_ids", "attention_mask", "labels"):
            assert b[k].shape == (4, 48) and b[k].dtype == np.int32
        assert b["actions"].shape == (4, 7) and b["actions"].dtype == np.float32
        assert b["dataset_index"].shape == (4,) and b["dataset_index"].dtype == np.int32
        assert (b["dataset_index"] == 0).all()
        idx = match_rows(b["actions"], reference["normalized"])
        for r in range(4):
            n = int(b["attention_mask"][r].sum())
            assert b["attention_mask"][r].tolist() == [1] * n + [0] * (48 - n)
            sup = np.flatnonzero(b["labels"][r] != -100)
            assert sup.tolist() == list(range(n - 8, n))  # the 7 action ids and EOS, nothing else
            assert b["labels"][r, n - 8:n].tolist() == at.encode(b["actions"][r]).tolist() + [2]
            assert b["input_ids"][r, n - 9] == 29871 and (b["input_ids"][r, n:] == 32000).all()
            image_bytes, instr = reference["frames"][idx[r]]
            want = tokenizer.inference_ids(instr.decode())
            assert b["input_ids"][r, : n - 8].tolist() == want
            # The image is the frame the action belongs to, decoded and resized 64 -> 224 by the
            # exported resize (itself checked against a numpy Lanczos-3 in test_data_transforms.py).
            ref_img = transforms.resize_image(tf.io.decode_jpeg(image_bytes, channels=3), 224).numpy()
            np.testing.assert_array_equal(b["pixel_values"][r], ref_img)


def test_same_seed_same_batches_and_other_seed_differs(cfg, tokenizer):
    import dataclasses

    a = pipeline.make_train_iterator(cfg, tokenizer, 0, 1)
    b = pipeline.make_train_iterator(cfg, tokenizer, 0, 1)
    c = pipeline.make_train_iterator(dataclasses.replace(cfg, seed=4), tokenizer, 0, 1)
    xa, xb, xc = ([next(i) for _ in range(3)] for i in (a, b, c))
    for u, v in zip(xa, xb):
        for k in u:
            np.testing.assert_array_equal(u[k], v[k], err_msg=k)
    assert not all(np.array_equal(u["actions"], w["actions"]) for u, w in zip(xa, xc))


def test_resume_continues_with_the_next_batch(cfg, tokenizer, tmp_path):
    import dataclasses

    cfg_aug = dataclasses.replace(cfg, image_aug=True)  # augmentation must replay too
    it = pipeline.make_train_iterator(cfg_aug, tokenizer, 0, 1)
    for _ in range(5):
        next(it)
    state = it.get_state()
    it.save(str(tmp_path / "iter"))
    expected = [next(it) for _ in range(3)]
    assert it.batches_consumed == 8

    replay = pipeline.make_train_iterator(cfg_aug, tokenizer, 0, 1)
    replay.set_state(state)  # cheap: replays the encoded stream from the seed, skips 5 batches
    exact = pipeline.make_train_iterator(cfg_aug, tokenizer, 0, 1)
    exact.restore(str(tmp_path / "iter"))  # tf.data iterator checkpoint (shuffle buffer included)
    for resumed in (replay, exact):
        assert resumed.batches_consumed == 5
        for want in expected:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    tampered = json.loads(bytes(state).decode())
    tampered["fingerprint"] = "0" * 16  # what a state from another seed or process layout carries
    with pytest.raises(ValueError, match="different data config"):
        replay.set_state(np.frombuffer(json.dumps(tampered).encode(), np.uint8))


def test_mixture_samples_configured_proportions(cfg, tokenizer):
    import dataclasses

    # A second dataset name over the same builder; balanced weights x equal num_transitions.
    register_dataset(DatasetConfig(name="bridge_copy_for_test", builder_name=BUILDER, image_key="image_0",
                                   standardize="bridge_orig"), overwrite=True)
    register_mixture("test_mix_1_3", [(BUILDER, 1.0), ("bridge_copy_for_test", 3.0)])
    mcfg = dataclasses.replace(cfg, mixture="test_mix_1_3", batch_size=100, resize_size=8, shuffle_buffer=16)
    it = pipeline.make_train_iterator(mcfg, tokenizer, 0, 1)
    assert it.dataset_names == [BUILDER, "bridge_copy_for_test"]
    assert set(it.dataset_statistics) == {BUILDER, "bridge_copy_for_test"}
    idx = np.concatenate([next(it)["dataset_index"] for _ in range(20)])
    n, p = idx.size, 0.75
    frac = float((idx == 1).mean())
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / n), frac  # 4 sigma at n=2000: +-0.039


def test_processes_read_disjoint_shares_that_cover_the_split(cfg, reference):
    def keys(pi, pc):
        ds = pipeline.standardized_trajectories(cfg, split="train", process_index=pi, process_count=pc)
        return {tuple(t["image"]) for t in ds.as_numpy_iterator()}

    everything = keys(0, 1)
    shares = [keys(i, 3) for i in range(3)]
    assert len(everything) == 25
    assert sum(len(s) for s in shares) == 25 and set().union(*shares) == everything
    assert all(len(s) >= 8 for s in shares)
    with pytest.raises(ValueError, match="process_index"):
        keys(3, 3)


def test_inspect_cli_reports_counts_statistics_and_writes_a_frame_grid(cfg, tmp_path, capsys):
    from PIL import Image

    from vla_jax.data import inspect

    rc = inspect.main([f"--data_dir={cfg.data_dir}", f"--dataset={BUILDER}", f"--out={tmp_path}",
                       f"--stats_cache_dir={cfg.stats_cache_dir}", "--num_frames=6"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "episodes 50, frames 400" in out and "put carrot on plate" in out and "q99" in out
    report = json.loads((tmp_path / f"{BUILDER}_report.json").read_text())
    assert report["warnings"] == [] and report["distinct_instructions"] == 4
    grid = Image.open(tmp_path / f"{BUILDER}_frames.png")
    assert grid.size[0] == 4 * 160 and grid.size[1] >= 2 * 160
    assert inspect.main([f"--data_dir={tmp_path / 'missing'}", f"--dataset={BUILDER}", f"--out={tmp_path}"]) == 1
    assert str(tmp_path / "missing") in capsys.readouterr().err
