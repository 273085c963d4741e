"""Bad input never passes silently: missing folders and unknown names are explained, NaN/inf and
unlabeled trajectories are dropped with counted warnings, a corrupt TFRecord is named.
Faulty datasets are made in tmp_path from the real Bridge records, edited as tf.train.Example."""

import pathlib
import shutil

import numpy as np
import pytest
import tensorflow as tf

from vla_jax.data import inspect, pipeline
from vla_jax.data.oxe import DatasetConfig, register_dataset
from vla_jax.tokenizer import VLATokenizer

BUILDER = "bridge_dataset"


def make_builder(bridge_data_dir: pathlib.Path, root: pathlib.Path, edit=None) -> pathlib.Path:
    """Copies the Bridge builder to root/bridge_dataset/1.0.0, passing every episode of every
    split through `edit(split, index, example)` (in place)."""
    src = bridge_data_dir / BUILDER / "1.0.0"
    dst = root / BUILDER / "1.0.0"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".json":
            shutil.copy(f, dst / f.name)
            continue
        split = f.name.split("-")[1].split(".")[0]
        with tf.io.TFRecordWriter(str(dst / f.name)) as w:
            for i, rec in enumerate(tf.data.TFRecordDataset(str(f))):
                ex = tf.train.Example.FromString(rec.numpy())
                if edit is not None:
                    edit(split, i, ex)
                w.write(ex.SerializeToString())
    return root


@pytest.fixture(scope="module")
def tokenizer(llama_tokenizer_path):
    return VLATokenizer.from_file(llama_tokenizer_path, max_len=48)


def small_cfg(data_dir, tmp_path, **kw):
    return pipeline.DataConfig(data_dir=str(data_dir), mixture=kw.pop("mixture", BUILDER), batch_size=16,
                               resize_size=8, shuffle_buffer=32, max_seq_len=48,
                               stats_cache_dir=str(tmp_path / "stats"), **kw)


def test_missing_data_dir_names_the_path_and_what_is_there(tmp_path, tokenizer):
    missing = tmp_path / "nope" / "data"
    (tmp_path / "something_else").mkdir()
    with pytest.raises(ValueError) as e:
        pipeline.make_train_iterator(small_cfg(missing, tmp_path), tokenizer, 0, 1)
    msg = str(e.value)
    assert str(missing) in msg and str(tmp_path) in msg and "something_else" in msg

    (tmp_path / "empty_data" / "other_dataset").mkdir(parents=True)
    with pytest.raises(ValueError) as e:
        pipeline.make_train_iterator(small_cfg(tmp_path / "empty_data", tmp_path), tokenizer, 0, 1)
    msg = str(e.value)
    assert str(tmp_path / "empty_data" / BUILDER) in msg and "other_dataset" in msg


def test_unknown_dataset_lists_registered_ones_and_how_to_register(bridge_data_dir, tmp_path, tokenizer):
    with pytest.raises(ValueError) as e:
        pipeline.make_train_iterator(small_cfg(bridge_data_dir, tmp_path, mixture="no_such_dataset"), tokenizer, 0, 1)
    msg = str(e.value)
    assert "no_such_dataset" in msg and "bridge_orig" in msg and "register" in msg


def test_missing_image_key_is_named(bridge_data_dir, tmp_path, tokenizer):
    register_dataset(DatasetConfig(name="bridge_wrong_camera_for_test", builder_name=BUILDER, image_key="image_9",
                                   standardize="bridge_orig"), overwrite=True)
    with pytest.raises(ValueError) as e:
        pipeline.make_train_iterator(small_cfg(bridge_data_dir, tmp_path, mixture="bridge_wrong_camera_for_test"),
                                     tokenizer, 0, 1)
    assert "image_9" in str(e.value) and "image_0" in str(e.value)


def test_nonfinite_and_unlabeled_trajectories_are_dropped_and_counted(bridge_data_dir, tmp_path, tokenizer):
    def edit(split, i, ex):
        f = ex.features.feature
        if split == "train" and i in (0, 1, 2):  # NaN/inf in the state -> NaN/inf relabeled actions
            state = list(f["steps/observation/state"].float_list.value)
            state[5 * 7 + 1] = float("nan") if i < 2 else float("inf")
            del f["steps/observation/state"].float_list.value[:]
            f["steps/observation/state"].float_list.value.extend(state)
        if split == "train" and i in (3, 4):  # no instruction at any step
            n = len(f["steps/language_instruction"].bytes_list.value)
            del f["steps/language_instruction"].bytes_list.value[:]
            f["steps/language_instruction"].bytes_list.value.extend([b""] * n)

    data = make_builder(bridge_data_dir, tmp_path / "data", edit)
    with pytest.warns(pipeline.DataWarning) as rec:
        it = pipeline.make_train_iterator(small_cfg(data, tmp_path), tokenizer, 0, 1)
    messages = " | ".join(str(w.message) for w in rec)
    assert "3 trajectories" in messages and "NaN/inf" in messages
    assert "2 trajectories" in messages and "no language instruction" in messages
    e = it.dataset_statistics[BUILDER]
    assert e["num_trajectories"] == 47 and e["num_transitions"] == 47 * 8  # unlabeled still count (OpenVLA)
    assert all(np.isfinite(v).all() for v in e["action"].values() if not isinstance(v[0], bool))
    # The validator reports the same problems.
    with pytest.warns(pipeline.DataWarning):
        report = inspect.inspect_dataset(str(data), BUILDER, str(tmp_path / "inspect"), split="train",
                                         stats_cache_dir=str(tmp_path / "stats"))
    found = " | ".join(report["warnings"])
    assert "3 episodes have NaN/inf" in found and "2 episodes have no instruction" in found
    assert report["episodes"] == 25 and report["frames"] == 200
    empty_prompt = tokenizer.inference_ids("")[:-1]  # "...take to ?\nOut:"
    for _ in range(20):  # 320 frames: several passes over the 20 good training episodes
        b = next(it)
        assert np.isfinite(b["actions"]).all()
        for row in b["input_ids"]:
            assert row[: len(empty_prompt)].tolist() != empty_prompt


def test_corrupt_tfrecord_is_named(bridge_data_dir, tmp_path, tokenizer):
    data = make_builder(bridge_data_dir, tmp_path / "data")
    bad = data / BUILDER / "1.0.0" / f"{BUILDER}-val.tfrecord-00000-of-00001"
    raw = bytearray(bad.read_bytes())
    for k in range(len(raw) // 2, len(raw) // 2 + 64):  # flip bytes in the middle of a record
        raw[k] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as e:
        pipeline.make_train_iterator(small_cfg(data, tmp_path), tokenizer, 0, 1)
    assert str(bad) in str(e.value) and "corrupt" in str(e.value)
