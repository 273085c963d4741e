"""Several cameras and proprio (OpenVLA-OFT inputs, OFT_REFERENCE.md §7, §9) on a real RLDS dataset
written with plain tfds at test time (tests/fixtures/multicam_rlds.py: a 32x32 primary camera, a
24x24 wrist camera, a 9-D state; 3 train + 1 val episodes).

Truth is independent of the pipeline: the arrays the builder wrote (`raw_episodes`, stored as
lossless PNG), statistics and normalization in float64 numpy (`np.quantile`, the BOUNDS_Q99
formula), the missing camera located by parsing the TFRecord file with `tf.train.Example`.
"""

import dataclasses
import json
import logging
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from vla_jax.data import normalization, pipeline, transforms
from vla_jax.data.oxe import get_dataset_config
from vla_jax.data.oxe.configs import DatasetConfig

# Imported as a top-level module: tfds resolves a builder's files from its module path, and for a
# module nested in packages that needs the `importlib_resources` backport (not installed).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures"))
import multicam_rlds as fx  # noqa: E402

PROPRIO_INDICES = [0, 1, 2, 3, 4, 5, -2, -1]  # LIBERO-style state[:6] + state[-2:] of the 9-D state
SIZE = 16


@pytest.fixture(scope="module")
def multicam(tmp_path_factory):
    """(data_dir, dataset-config JSON path): both fixture datasets built and registered by file."""
    root = tmp_path_factory.mktemp("multicam")
    data_dir = str(root / "data")
    fx.build(data_dir)
    entry = {"image_keys": ["image", "wrist_image"], "proprio_key": "state", "proprio_indices": PROPRIO_INDICES,
             "gripper": "absolute"}
    cfg_path = root / "cameras.json"
    cfg_path.write_text(json.dumps({"datasets": [{"name": "multicam_debug", **entry},
                                                 {"name": "multicam_missing_wrist", **entry}]}))
    return data_dir, str(cfg_path)


def data_cfg(multicam, **kw):
    data_dir, cfg_path = multicam
    base = dict(data_dir=data_dir, mixture="multicam_debug", dataset_configs=cfg_path, split="train", batch_size=3,
                resize_size=SIZE, shuffle_buffer=1, seed=0, max_seq_len=96, repeat=False, cameras=2,
                use_proprio=True, stats_cache_dir=os.path.join(data_dir, "stats_cache"))
    base.update(kw)
    return pipeline.DataConfig(**base)


def one_pass(cfg, tokenizer_path):
    it = pipeline.make_train_iterator(cfg, str(tokenizer_path), 0, 1)
    return list(it), it


def reference_stats():
    """float64 statistics over every split (the pipeline's statistics use split 'all')."""
    eps = fx.raw_episodes("train") + fx.raw_episodes("val")
    state = np.concatenate([e["state"] for e in eps]).astype(np.float64)[:, PROPRIO_INDICES]
    action = np.concatenate([e["action"] for e in eps]).astype(np.float64)
    return state, action


def bounds_q99(x, q01, q99, lo, hi, mask=None):
    y = np.clip(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    if mask is not None:
        y = np.where(mask, y, x)
    return np.where(lo == hi, 0.0, y)


def expected_frames(k=1):
    """{(episode, t): truth} for every train frame that starts a chunk of k actions."""
    state, action = reference_stats()
    ps = [np.quantile(state, q, axis=0) for q in (0.01, 0.99)] + [state.min(0), state.max(0)]
    acts = [np.quantile(action, q, axis=0) for q in (0.01, 0.99)] + [action.min(0), action.max(0)]
    mask = np.array([True] * 6 + [False])
    out = {}
    for e, ep in enumerate(fx.raw_episodes("train")):
        prop = bounds_q99(ep["state"].astype(np.float64)[:, PROPRIO_INDICES], *ps)
        act = bounds_q99(ep["action"].astype(np.float64), *acts, mask=mask)
        for t in range(len(ep["action"]) - k + 1):
            out[(e, t)] = {"primary": np.asarray(transforms.resize_image(ep["image"][t], SIZE)),
                           "wrist": np.asarray(transforms.resize_image(ep["wrist_image"][t], SIZE)),
                           "proprio": prop[t], "actions": act[t:t + k]}
    return out


def match(frames, pixels):
    """The (episode, t) whose resized primary image equals `pixels` exactly (one, or fail)."""
    hits = [key for key, f in frames.items() if np.array_equal(f["primary"], pixels)]
    assert len(hits) == 1, f"primary image matches {len(hits)} raw frames"
    return hits[0]


def check_stream(batches, frames, k):
    seen = []
    for b in batches:
        assert b["pixel_values"].dtype == np.uint8 and b["pixel_values"].shape[1:] == (2, SIZE, SIZE, 3)
        assert b["proprio"].dtype == np.float32 and b["proprio"].shape[1:] == (len(PROPRIO_INDICES),)
        for r in range(len(b["pixel_values"])):
            key = match(frames, b["pixel_values"][r, 0])
            f = frames[key]
            np.testing.assert_array_equal(b["pixel_values"][r, 1], f["wrist"])  # same step, camera 2
            np.testing.assert_allclose(b["proprio"][r], f["proprio"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(b["actions"][r].reshape(k, 7), f["actions"], atol=1e-5, rtol=0)
            seen.append(key)
    assert sorted(seen) == sorted(frames)  # every frame once, none extra


def test_two_cameras_in_order_with_normalized_proprio(multicam, llama_tokenizer_path):
    batches, it = one_pass(data_cfg(multicam), llama_tokenizer_path)
    assert sorted(batches[0]) == sorted(["input_ids", "attention_mask", "labels", "pixel_values", "actions",
                                         "dataset_index", "proprio"])
    frames = expected_frames()
    assert len(frames) == sum(fx.LENGTHS["train"])
    check_stream(batches, frames, 1)
    # The two sizes were resized to one; the wrist camera (values < 100) is never the primary.
    assert all(b["pixel_values"][:, 1].max() < 110 for b in batches)
    assert any(b["pixel_values"][:, 0].max() > 200 for b in batches)


def test_action_chunks_with_two_cameras(multicam, llama_tokenizer_path):
    k = 3
    batches, _ = one_pass(data_cfg(multicam, action_chunk=k), llama_tokenizer_path)
    assert batches[0]["actions"].shape[1:] == (k, 7)
    frames = expected_frames(k)
    assert len(frames) == sum(t - k + 1 for t in fx.LENGTHS["train"])
    check_stream(batches, frames, k)


def test_proprio_statistics_entry_against_numpy(multicam, llama_tokenizer_path):
    stats = pipeline.dataset_statistics(data_cfg(multicam))["multicam_debug"]
    state, action = reference_stats()
    s32 = state.astype(np.float32)
    want = {"mean": s32.mean(0), "std": s32.std(0), "max": s32.max(0), "min": s32.min(0),
            "q01": np.quantile(state, 0.01, axis=0), "q99": np.quantile(state, 0.99, axis=0)}
    assert sorted(stats["proprio"]) == sorted(want)  # the six fields, no mask (as upstream)
    for field, value in want.items():
        np.testing.assert_allclose(stats["proprio"][field], value, rtol=1e-6, atol=1e-6, err_msg=field)
    assert stats["action"]["mask"] == [True] * 6 + [False]
    np.testing.assert_allclose(stats["action"]["q99"], np.quantile(action, 0.99, axis=0), rtol=1e-6, atol=1e-6)
    assert stats["num_transitions"] == len(state) and stats["num_trajectories"] == 4
    assert not any(k.startswith("vla_jax") for k in stats)
    # Without proprio: OpenVLA's entry, zeros of the action dim, whatever the cache holds.
    plain = pipeline.dataset_statistics(data_cfg(multicam, use_proprio=False, cameras=1))["multicam_debug"]
    assert plain["proprio"] == {f: [0.0] * 7 for f in normalization.STATS_FIELDS}


def test_proprio_normalization_training_and_inference_rules():
    state, _ = reference_stats()
    entry = {"proprio": {"q01": np.quantile(state, 0.01, 0).tolist(), "q99": np.quantile(state, 0.99, 0).tolist(),
                         "min": state.min(0).tolist(), "max": state.max(0).tolist()}}
    x = state[:5] + np.array([0, 0, 0, 0, 0, 0, 0, 9.0])  # dim 7 pushed past q99: clipped to 1
    want = bounds_q99(x, *(np.asarray(entry["proprio"][f]) for f in ("q01", "q99", "min", "max")))
    got = normalization.normalize_proprio(x, entry)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.all(got[:, 6] == 0) and np.all(got[:, 7] == 1)  # constant dim (min == max) -> 0
    # OFT's inference normalize_proprio has no min == max rule: x == q01 there gives -1.
    infer = normalization.normalize_proprio(x, entry, zero_constant_dims=False)
    np.testing.assert_array_equal(infer[:, 6], -1.0)
    np.testing.assert_array_equal(infer[:, :6], got[:, :6])
    with pytest.raises(ValueError, match="8 proprio dims but the proprio vector has 7"):
        normalization.normalize_proprio(x[:, :7], entry)


def test_cameras_get_their_own_augmentation_seed():
    raw = fx.raw_episodes("train")[0]["wrist_image"][0]
    frame = {"image": tf.constant([fx.png(raw), fx.png(raw)])}  # the same picture in both cameras
    out = transforms.decode_resize_augment(frame, SIZE, True, 5, 0, tf.constant(11, tf.int64))["image"].numpy()
    base = transforms.resize_image(raw, SIZE)
    seed = transforms.frame_seed(5, 0, tf.constant(11, tf.int64))
    params = transforms.OPENVLA_AUGMENT
    np.testing.assert_array_equal(out[0], transforms.augment_image(base, seed, params).numpy())
    np.testing.assert_array_equal(out[1], transforms.augment_image(base, seed + 1, params).numpy())
    assert not np.array_equal(out[0], out[1])
    # Camera 0 gets exactly the one-camera draw.
    single = transforms.decode_resize_augment({"image": tf.constant(fx.png(raw))}, SIZE, True, 5, 0,
                                              tf.constant(11, tf.int64))["image"].numpy()
    np.testing.assert_array_equal(single, out[0])


def test_one_camera_stream_is_the_primary_of_the_two_camera_stream(multicam, llama_tokenizer_path):
    """Same seed, augmentation on: cameras=1 gives [B, S, S, 3], frame for frame camera 0 of cameras=2,
    and no proprio key without use_proprio."""
    two, _ = one_pass(data_cfg(multicam, image_aug=True, shuffle_buffer=8), llama_tokenizer_path)
    one, _ = one_pass(data_cfg(multicam, image_aug=True, shuffle_buffer=8, cameras=1, use_proprio=False),
                      llama_tokenizer_path)
    assert "proprio" not in one[0] and one[0]["pixel_values"].shape[1:] == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(np.concatenate([b["pixel_values"] for b in one]),
                                  np.concatenate([b["pixel_values"][:, 0] for b in two]))
    np.testing.assert_array_equal(np.concatenate([b["actions"] for b in one]),
                                  np.concatenate([b["actions"] for b in two]))
    assert not np.array_equal(two[0]["pixel_values"][:, 0], two[0]["pixel_values"][:, 1])


def _empty_wrist_records(path):
    """Indices of the records of a TFRecord file whose wrist images are all empty strings."""
    out = []
    for i, record in enumerate(tf.data.TFRecordDataset(path)):
        ex = tf.train.Example.FromString(record.numpy())
        if all(len(v) == 0 for v in ex.features.feature["steps/observation/wrist_image"].bytes_list.value):
            out.append(i)
    return out


def test_camera_missing_in_an_episode_is_named(multicam, llama_tokenizer_path):
    data_dir, _ = multicam
    name = "multicam_missing_wrist-train.tfrecord-00000-of-00001"
    records = _empty_wrist_records(os.path.join(data_dir, "multicam_missing_wrist", "1.0.0", name))
    assert len(records) == 1
    cfg = data_cfg(multicam, mixture="multicam_missing_wrist", use_proprio=False)
    with pytest.raises(ValueError, match=rf"dataset 'multicam_missing_wrist': camera 'observation/wrist_image' is "
                                         rf"missing \(empty image\) in 1 episode\(s\): {name}__{records[0]} "):
        pipeline.make_train_iterator(cfg, str(llama_tokenizer_path), 0, 1)
    # Reading the primary camera only is fine.
    batches, _ = one_pass(dataclasses.replace(cfg, cameras=1), llama_tokenizer_path)
    assert sum(len(b["pixel_values"]) for b in batches) == sum(fx.LENGTHS["train"])


def test_missing_keys_and_bad_camera_settings_are_named(multicam, tmp_path, bridge_data_dir):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"name": "multicam_bad_keys", "builder_name": "multicam_debug",
                                 "image_keys": ["image", "gripper_cam"], "proprio_key": "joints"}]))
    cfg = data_cfg(multicam, mixture="multicam_bad_keys", dataset_configs=str(path))
    with pytest.raises(ValueError, match=r"dataset 'multicam_bad_keys': camera 'gripper_cam' \(image_keys\) not in "
                                         r"steps/observation .*none of its episodes.*\['image', 'state', 'wrist_image'\]"):
        pipeline.dataset_statistics(cfg)
    with pytest.raises(ValueError, match=r"dataset 'multicam_bad_keys': proprio_key 'joints' not in steps/observation"):
        pipeline.dataset_statistics(dataclasses.replace(cfg, cameras=1))
    with pytest.raises(ValueError, match=r"dataset 'multicam_debug': 3 cameras asked \(DataConfig.cameras\) but its "
                                         r"config names 2 in image_keys \['image', 'wrist_image'\]"):
        pipeline.dataset_statistics(data_cfg(multicam, cameras=3))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"datasets": [{"name": "multicam_short_state", "builder_name": "multicam_debug",
                                               "image_keys": ["image", "wrist_image"], "proprio_key": "state",
                                               "proprio_indices": [0, 1]}],
                                 "mixtures": {"multicam_mixed_state": [["multicam_debug", 1.0],
                                                                       ["multicam_short_state", 1.0]]}}))
    with pytest.raises(ValueError, match=r"mixture 'multicam_mixed_state' mixes proprio dims "
                                         r"\{'multicam_debug': 8, 'multicam_short_state': 2\}"):
        pipeline.dataset_statistics(data_cfg(multicam, mixture="multicam_mixed_state", dataset_configs=str(mixed)))
    with pytest.raises(ValueError, match="DataConfig.cameras must be an integer >= 1"):
        data_cfg(multicam, cameras=0)
    with pytest.raises(ValueError, match="use_proprio is set but its config has no proprio_key"):
        pipeline.dataset_statistics(data_cfg(multicam, mixture="bridge_dataset", data_dir=str(bridge_data_dir),
                                             cameras=1))


def test_old_statistics_cache_recomputed_only_when_proprio_is_asked(multicam, tmp_path, caplog):
    kw = dict(stats_cache_dir=str(tmp_path / "cache"), data_dir=str(tmp_path / "data"))
    import shutil

    shutil.copytree(os.path.join(multicam[0], "multicam_debug"), kw["data_dir"] + "/multicam_debug")
    for f in (tmp_path / "data" / "multicam_debug" / "1.0.0").glob("dataset_statistics_*.json"):
        f.unlink()
    caplog.set_level(logging.INFO, logger="vla_jax")

    def run(**more):
        caplog.clear()
        pipeline.dataset_statistics(data_cfg(multicam, **kw, **more))
        return " ".join(r.getMessage() for r in caplog.records)

    assert "computing action statistics" in run(cameras=1, use_proprio=False)  # first run: no cache
    assert "from the cache" in run(cameras=1, use_proprio=False)
    log = run(cameras=1, use_proprio=True)  # the cache has no proprio statistics: computed again
    assert "lacks fields" in log and "computing action and proprio statistics" in log
    assert "computing" not in run(cameras=1, use_proprio=True)
    assert "computing" not in run(cameras=1, use_proprio=False)


def test_dataset_config_cameras_and_proprio_fields():
    a = DatasetConfig(name="x", image_keys=("front", "wrist"))
    assert a.image_key == "front" and a.num_cameras == 2
    assert DatasetConfig(name="x", image_key="front").image_keys == ("front",)
    with pytest.raises(ValueError, match=r"image_key 'wrist' must be the primary camera, image_keys\[0\] = 'front'"):
        DatasetConfig(name="x", image_key="wrist", image_keys=("front", "wrist"))
    with pytest.raises(ValueError, match="proprio_indices .* without a proprio_key"):
        DatasetConfig(name="x", image_key="front", proprio_indices=(0, 1))
    with pytest.raises(ValueError, match="lacks required field"):
        DatasetConfig.from_dict({"name": "x"})
    libero = get_dataset_config("libero_spatial_no_noops")
    assert libero.image_keys == ("image", "wrist_image") and libero.proprio_key == "state"
    assert libero.proprio_indices == (0, 1, 2, 3, 4, 5, -2, -1)
    # One-camera configs keep their old repr (it keys the statistics cache).
    bridge = repr(get_dataset_config("bridge_orig"))
    assert "image_keys" not in bridge and "proprio" not in bridge and bridge.endswith("frame_filter=None)")


def test_proprio_indices_pick_libero_dims():
    state = np.arange(2 * 9, dtype=np.float32).reshape(2, 9)
    cfg = DatasetConfig(name="x", image_key="image", proprio_key="state", proprio_indices=(0, 1, 2, 3, 4, 5, -2, -1))
    got = transforms.proprio_of({"observation": {"state": tf.constant(state)}}, cfg).numpy()
    np.testing.assert_array_equal(got, np.concatenate([state[:, :6], state[:, -2:]], axis=1))
    bad = dataclasses.replace(cfg, proprio_indices=(0, 9))
    with pytest.raises(ValueError, match=r"proprio_indices \[0, 9\] hold \[9\], outside the 9 dims"):
        transforms.proprio_of({"observation": {"state": tf.constant(state)}}, bad)


def test_fixture_episodes_decode_with_pil_to_the_raw_arrays(multicam):
    """The stored episodes (TFRecord parsed with tf.train.Example, PNG decoded with PIL) are the
    arrays `raw_episodes` regenerates: the truth the stream tests compare against."""
    import io

    from PIL import Image

    data_dir, _ = multicam
    path = os.path.join(data_dir, "multicam_debug", "1.0.0", "multicam_debug-train.tfrecord-00000-of-00001")
    raw = {ep["instruction"]: ep for ep in fx.raw_episodes("train")}
    seen = []
    for record in tf.data.TFRecordDataset(path):
        feat = tf.train.Example.FromString(record.numpy()).features.feature
        ep = raw[feat["steps/language_instruction"].bytes_list.value[0].decode()]
        for key in ("image", "wrist_image"):
            pics = [np.asarray(Image.open(io.BytesIO(b))) for b in feat[f"steps/observation/{key}"].bytes_list.value]
            np.testing.assert_array_equal(np.stack(pics), ep[key])
        state = np.asarray(feat["steps/observation/state"].float_list.value, np.float32).reshape(-1, fx.STATE_DIM)
        np.testing.assert_array_equal(state, ep["state"])
        seen.append(ep["instruction"])
    assert sorted(seen) == sorted(raw)
