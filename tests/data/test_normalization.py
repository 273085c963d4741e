"""BOUNDS_Q99 normalization, its inverse (vla_jax.spec.ActionCodec.unnormalize, the one un-normalizer),
the statistics fields, and the statistics cache (location, reuse, key). Formulas from
OPENVLA_REFERENCE.md §4, written out in numpy here."""

import json
import os
import pathlib
import shutil

import numpy as np

from vla_jax.data import normalization, pipeline, rlds
from vla_jax.data.oxe import get_standardize
from vla_jax.spec import ActionCodec

ENTRY = {"action": {
    "q01": [-0.5, -1.0, 0.0, 2.0, 0.0, -3.0, 0.0],
    "q99": [0.5, 3.0, 1.0, 2.0, 0.0, 3.0, 1.0],
    "min": [-0.7, -2.0, -0.1, 2.0, 0.0, -4.0, 0.0],
    "max": [0.8, 4.0, 1.2, 2.0, 0.0, 4.0, 1.0],
    "mask": [True, True, True, True, False, True, False],
}}


def reference_normalize(x):
    a = ENTRY["action"]
    q01, q99, mn, mx = (np.array(a[k], np.float64) for k in ("q01", "q99", "min", "max"))
    mask = np.array(a["mask"])
    y = np.where(mask, np.clip(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), x)
    return np.where(mn == mx, 0.0, y)  # min == max: zero, masked or not


def test_normalize_matches_reference_and_min_equal_max_rule():
    rng = np.random.default_rng(0)
    x = rng.uniform(-5, 5, (1000, 7)).astype(np.float32)
    x[:, 6] = rng.integers(0, 2, 1000)
    got = normalization.normalize_actions(x, ENTRY)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_normalize(x.astype(np.float64)), rtol=0, atol=2e-6)
    assert (got[:, 3] == 0).all() and (got[:, 4] == 0).all()  # constant dims (one masked, one not)
    np.testing.assert_array_equal(got[:, 6], x[:, 6])  # the gripper stays raw
    got_tf = normalization.normalize_actions_tf(x, ENTRY).numpy()
    np.testing.assert_allclose(got_tf, got, rtol=0, atol=1e-6)


def test_unnormalize_is_the_inference_inverse():
    a = ENTRY["action"]
    q01, q99 = np.array(a["q01"]), np.array(a["q99"])
    mask = np.array(a["mask"])
    z = np.random.default_rng(1).uniform(-1, 1, (200, 7)).astype(np.float32)
    got = ActionCodec().unnormalize(z, ENTRY)
    assert got.dtype == np.float64  # as OpenVLA's predict_action
    z64 = z.astype(np.float64)
    np.testing.assert_allclose(got, np.where(mask, 0.5 * (z64 + 1) * (q99 - q01) + q01, z64), rtol=0, atol=1e-6)
    # Round trip for values inside [q01, q99] on normalized, non-constant dims.
    x = q01 + (q99 - q01) * np.random.default_rng(2).uniform(0, 1, (200, 7))
    back = ActionCodec().unnormalize(normalization.normalize_actions(x, ENTRY), ENTRY)
    for d in (0, 1, 2, 5):
        np.testing.assert_allclose(back[:, d], x[:, d], rtol=0, atol=1e-5)


def test_compute_statistics_fields_and_counts():
    rng = np.random.default_rng(3)
    trajs = [{"action": rng.normal(size=(int(t), 7)).astype(np.float32), "language_instruction": np.array([b"go"] * int(t))}
             for t in rng.integers(2, 9, 20)]
    good = np.concatenate([t["action"] for t in trajs]).astype(np.float64)
    bad = [{"action": np.full((3, 7), np.nan, np.float32)},
           {"action": np.array([[0, 0, 0, 0, 0, np.inf, 0]], np.float32)},
           {"action": np.zeros((0, 7), np.float32)},
           {"action": np.ones((2, 7), np.float32), "language_instruction": np.array([b"", b""])}]
    e = normalization.compute_statistics(trajs + bad, [True] * 6 + [False])
    assert e["num_trajectories"] == 21 and e["num_transitions"] == len(good) + 2
    assert e[normalization.COUNTS_KEY] == {"nonfinite": 2, "empty": 1, "unlabeled": 1}
    ref = np.concatenate([good, np.ones((2, 7))])
    for k, v in {"mean": ref.mean(0), "std": ref.std(0), "min": ref.min(0), "max": ref.max(0),
                 "q01": np.quantile(ref, 0.01, axis=0), "q99": np.quantile(ref, 0.99, axis=0)}.items():
        np.testing.assert_allclose(e["action"][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert e["proprio"] == {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")}
    assert normalization.COUNTS_KEY not in normalization.export_entry(e)


def _symlinked_builder(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A writable builder folder whose TFRecords are links to the shared (read-only) files."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".json":
            (dst / f.name).write_text(f.read_text())
        else:
            os.symlink(f, dst / f.name)
    return dst


def _read_only_copy(src: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """A copy of the builder folder `src` under `root/bridge_dataset/1.0.0` with every write bit cleared."""
    dst = root / "bridge_dataset" / "1.0.0"
    # Not the statistics cache a debug run may have left beside the fixture data: this copy starts uncached.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dataset_statistics_*"))
    for f in dst.iterdir():
        f.chmod(0o444)
    for d in (dst, dst.parent, root):
        d.chmod(0o555)
    return dst


def test_cache_goes_next_to_writable_data_or_to_cache_dir(bridge_data_dir, tmp_path, monkeypatch):
    # A read-only data folder, as a shared dataset mount is (the fixture in the checkout is writable).
    shared = _read_only_copy(bridge_data_dir / "bridge_dataset" / "1.0.0", tmp_path / "ro")
    before = sorted(os.listdir(shared))
    cache = tmp_path / "cache"
    cfg = pipeline.DataConfig(data_dir=str(tmp_path / "ro"), mixture="bridge_dataset", stats_cache_dir=str(cache))
    assert os.stat(shared).st_mode & 0o222 == 0, f"{shared} must be read-only for this check"
    stats = pipeline.dataset_statistics(cfg)  # read-only data folder: the statistics go to the cache dir
    assert sorted(os.listdir(shared)) == before
    files = list(cache.glob("dataset_statistics_*.json"))
    assert len(files) == 1
    assert normalization.export_entry(json.loads(files[0].read_text())) == stats["bridge_dataset"]

    # Reuse: a second call computes nothing.
    def boom(*a, **k):
        raise AssertionError("statistics recomputed despite the cache")

    monkeypatch.setattr(normalization, "compute_statistics", boom)
    again = pipeline.dataset_statistics(cfg)
    assert again == stats

    # A writable copy of the same data with an empty cache dir: computed again (same values) and
    # written next to the data, not to the cache dir.
    monkeypatch.undo()
    copy_root = tmp_path / "copy"
    _symlinked_builder(shared, copy_root / "bridge_dataset" / "1.0.0")
    cfg2 = pipeline.DataConfig(data_dir=str(copy_root), mixture="bridge_dataset", stats_cache_dir=str(tmp_path / "c2"))
    stats2 = pipeline.dataset_statistics(cfg2)
    assert stats2 == stats
    assert len(list((copy_root / "bridge_dataset" / "1.0.0").glob("dataset_statistics_*.json"))) == 1
    assert not (tmp_path / "c2").exists()


def test_cache_key_changes_with_data_and_transform(bridge_data_dir, tmp_path):
    from vla_jax.data.oxe import get_dataset_config

    cfg = get_dataset_config("bridge_dataset")
    fn = get_standardize(cfg.standardize)
    shared = bridge_data_dir / "bridge_dataset" / "1.0.0"
    builder = rlds.open_builder(str(bridge_data_dir), "bridge_dataset")
    key = normalization.statistics_key(builder, fn, cfg)

    copy = _symlinked_builder(shared, tmp_path / "same" / "bridge_dataset" / "1.0.0")
    same = rlds.open_builder(str(tmp_path / "same"), "bridge_dataset")
    assert normalization.statistics_key(same, fn, cfg) == key  # the path is not part of the key

    info = json.loads((copy / "dataset_info.json").read_text())
    info["splits"] = [s for s in info["splits"] if s["name"] == "train"]  # different data: one split
    changed = tmp_path / "changed" / "bridge_dataset" / "1.0.0"
    _symlinked_builder(shared, changed)
    (changed / "dataset_info.json").write_text(json.dumps(info))
    other_data = rlds.open_builder(str(tmp_path / "changed"), "bridge_dataset")
    assert normalization.statistics_key(other_data, fn, cfg) != key

    def different_transform(traj, c):  # a transform with other source code
        return fn(traj, c)

    assert normalization.statistics_key(builder, different_transform, cfg) != key
