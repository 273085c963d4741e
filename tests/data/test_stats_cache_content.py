"""The dataset-statistics cache is keyed on content: the same files with changed bytes (same sizes,
even with the old modification times put back) are not served the old statistics, and a cache hit
is said in the log. Truth: the real Bridge debug episodes and numpy over their actions."""

import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from vla_jax.data import normalization, pipeline, rlds

TRAIN = "bridge_dataset-train.tfrecord-00000-of-00001"


def copy_data(bridge_data_dir, root):
    """The builder folder without any statistics cache a debug run left beside the fixture data."""
    dst = root / "bridge_dataset" / "1.0.0"
    shutil.copytree(bridge_data_dir / "bridge_dataset" / "1.0.0", dst,
                    ignore=shutil.ignore_patterns("dataset_statistics_*"))
    return dst


def inject_nan(path, episodes):
    """Rewrites the TFRecord file with one state value of each of `episodes` set to NaN (so its
    relabeled actions hold NaN): valid records, same size, same modification time."""
    st = os.stat(path)
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    with tf.io.TFRecordWriter(str(path)) as w:
        for i, rec in enumerate(records):
            if i in episodes:
                ex = tf.train.Example.FromString(rec)
                # bridge's actions are relabeled from state deltas: a NaN state in mid-episode
                state = ex.features.feature["steps/observation/state"].float_list.value
                state[len(state) // 2] = float("nan")
                rec = ex.SerializeToString()
            w.write(rec)
    assert os.path.getsize(path) == st.st_size, "the rewrite must keep the file size"
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def stats(root, cache):
    cfg = pipeline.DataConfig(data_dir=str(root), mixture="bridge_dataset", stats_cache_dir=str(cache))
    return pipeline.dataset_statistics(cfg)["bridge_dataset"]


def test_changed_bytes_of_the_same_size_recompute_the_statistics(bridge_data_dir, tmp_path):
    data = copy_data(bridge_data_dir, tmp_path / "data")
    clean = stats(tmp_path / "data", tmp_path / "cache")
    inject_nan(data / TRAIN, episodes={0, 5})
    dirty = stats(tmp_path / "data", tmp_path / "cache")
    # Two trajectories now hold a NaN and are left out (counted by the pipeline's warning).
    assert dirty["num_trajectories"] == clean["num_trajectories"] - 2
    assert dirty["num_transitions"] < clean["num_transitions"]
    # The recomputed statistics are those of the remaining episodes (numpy over their actions).
    ds = pipeline.standardized_trajectories(pipeline.DataConfig(data_dir=str(tmp_path / "data"),
                                                                mixture="bridge_dataset"), split="all")
    acts = [t["action"] for t in ds.as_numpy_iterator() if np.isfinite(t["action"]).all()]
    a = np.concatenate(acts).astype(np.float32)
    np.testing.assert_allclose(dirty["action"]["q01"], np.quantile(a, 0.01, axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dirty["action"]["mean"], a.mean(0), rtol=1e-5, atol=1e-7)
    assert dirty["num_transitions"] == a.shape[0]


def test_a_cache_hit_is_said_in_the_log(bridge_data_dir, tmp_path, caplog):
    copy_data(bridge_data_dir, tmp_path / "data")
    clean = stats(tmp_path / "data", tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="vla_jax.data.normalization"):
        again = stats(tmp_path / "data", tmp_path / "cache")
    assert again == clean
    hits = [r.getMessage() for r in caplog.records if "from the cache" in r.getMessage()]
    # A warning, so train.py's default log level shows it; it names the cache file.
    assert len(hits) == 1 and "dataset_statistics_" in hits[0], [r.getMessage() for r in caplog.records]
    assert [r.levelno for r in caplog.records if "from the cache" in r.getMessage()] == [logging.WARNING]


def test_key_follows_content_mtime_and_sampled_blocks_of_large_files(tmp_path, monkeypatch):
    small = tmp_path / "small.bin"
    small.write_bytes(os.urandom(4096))
    st = os.stat(small)
    fp = normalization.file_fingerprint(str(small))
    with open(small, "r+b") as f:  # one byte, same size, old mtime back: a small file is hashed whole
        f.seek(1234)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert normalization.file_fingerprint(str(small)) != fp

    monkeypatch.setattr(normalization, "FULL_HASH_BYTES", 1 << 16)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(1 << 20))
    st = os.stat(big)
    fp = normalization.file_fingerprint(str(big))
    assert normalization.file_fingerprint(str(big)) == fp  # deterministic
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten later: mtime differs
    assert normalization.file_fingerprint(str(big)) != fp
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert normalization.file_fingerprint(str(big)) == fp
    with open(big, "r+b") as f:  # the last byte lies in the last sampled block
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    os.utime(big, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert normalization.file_fingerprint(str(big)) != fp


def test_the_path_is_still_not_part_of_the_key(bridge_data_dir, tmp_path):
    """A copy that keeps the modification times (cp -p, rsync -t) shares the cache entry."""
    from vla_jax.data.oxe import get_dataset_config
    from vla_jax.data.oxe import get_standardize

    cfg = get_dataset_config("bridge_dataset")
    fn = get_standardize(cfg.standardize)
    copy_data(bridge_data_dir, tmp_path / "copy")  # copytree keeps the modification times
    a = normalization.statistics_key(rlds.open_builder(str(bridge_data_dir), "bridge_dataset"), fn, cfg)
    b = normalization.statistics_key(rlds.open_builder(str(tmp_path / "copy"), "bridge_dataset"), fn, cfg)
    assert a == b
