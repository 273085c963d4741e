"""Action chunks (OpenVLA-OFT, OFT_REFERENCE.md §5) on the real Bridge debug episodes.

Truth is computed here independently of the pipeline: episodes are parsed straight from the
TFRecords, standardized and BOUNDS_Q99-normalized in float64 numpy (the reference of
test_data_pipeline.py), and frame t's chunk is that episode's normalized actions[t : t + K].
Token ids come from SentencePiece directly and the action ids from OpenVLA's formula
`32000 - searchsorted(linspace(-1, 1, 256), a, side="right")`.
"""

import dataclasses
import json
import logging

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from tests.data import test_data_bad_input as bad_input
from tests.data import test_data_pipeline as ref
from vla_jax.data import normalization, pipeline, transforms
from vla_jax.tokenizer import VLATokenizer

BUILDER = "bridge_dataset"
RAW_STEPS = 10  # every fixture episode: 10 raw steps -> 8 after the Bridge standardization


def reference(data_dir, split):
    """(episodes of `split` with float64-normalized actions [T, 7], statistics over all splits)."""
    std = {s: [ref.bridge_np(e) for e in ref.parse_split(data_dir, s)] for s in ("train", "val")}
    a = np.concatenate([e["action"] for s in std.values() for e in s]).astype(np.float64)
    q01, q99 = np.quantile(a, 0.01, axis=0), np.quantile(a, 0.99, axis=0)
    mask = np.array([True] * 6 + [False])
    for e in std[split]:
        x = e["action"].astype(np.float64)
        e["normalized"] = np.where(mask, np.clip(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), x)
    return std[split]


def action_ids_np(a):
    """OpenVLA's action tokenizer, written out: clip to [-1, 1], 32000 - digitize over 256 edges."""
    a = np.clip(np.asarray(a, np.float64), -1, 1)
    return 32000 - np.searchsorted(np.linspace(-1, 1, 256), a, side="right")


def prompt_ids_np(sp, instruction):
    return [1] + sp.encode(f"In: What action should the robot take to {instruction.lower()}?\nOut:") + [29871]


def chunk_cfg(data_dir, tmp_path, k, **kw):
    base = dict(data_dir=str(data_dir), mixture=BUILDER, split="train", batch_size=4, resize_size=16,
                shuffle_buffer=1, seed=0, max_seq_len=96, stats_cache_dir=str(tmp_path / "stats"),
                repeat=False, action_chunk=k)
    base.update(kw)
    return pipeline.DataConfig(**base)


def one_pass(cfg, tokenizer_path):
    it = pipeline.make_train_iterator(cfg, tokenizer_path, 0, 1)
    return list(it)


def check_chunks(batches, episodes, k, sp, max_len=96):
    """Every frame's chunk is actions[t:t+k] of one reference episode, paired with that episode's
    frame-t image and instruction; each (episode, t <= T-k) appears exactly once. Returns the
    number of frames seen per episode."""
    seen = {}
    for b in batches:
        n_rows = b["actions"].shape[0]
        assert b["actions"].shape == (n_rows, k, 7) and b["actions"].dtype == np.float32
        assert set(b) == {"pixel_values", "input_ids", "attention_mask", "labels", "actions", "dataset_index"}
        for r in range(n_rows):
            chunk = b["actions"][r].astype(np.float64)
            hits = [(i, t) for i, e in enumerate(episodes) for t in range(len(e["normalized"]) - k + 1)
                    if np.abs(e["normalized"][t:t + k] - chunk).max() <= 1e-5]
            assert len(hits) == 1, (r, hits)
            i, t = hits[0]
            assert (i, t) not in seen, f"episode {i} frame {t} twice in one pass"
            seen[(i, t)] = True
            e = episodes[i]
            # The observation is frame t's (its JPEG decoded and resized by the exported resize).
            want_img = transforms.resize_image(tf.io.decode_jpeg(e["image"][t], channels=3), 16).numpy()
            np.testing.assert_array_equal(b["pixel_values"][r], want_img)
            # Tokens: [BOS] prompt 29871 a_0 .. a_{7k-1} </s>, chunk flattened timestep-major.
            ids = prompt_ids_np(sp, e["instruction"][t].decode()) + action_ids_np(chunk).reshape(-1).tolist() + [2]
            n = len(ids)
            assert b["input_ids"][r, :n].tolist() == ids and (b["input_ids"][r, n:] == 32000).all()
            assert b["attention_mask"][r].tolist() == [1] * n + [0] * (max_len - n)
            assert np.flatnonzero(b["labels"][r] != -100).tolist() == list(range(n - 7 * k - 1, n))
            assert b["labels"][r, n - 7 * k - 1:n].tolist() == ids[n - 7 * k - 1:]
            assert b["dataset_index"][r] == 0
    per_episode = [sum(1 for (i, _) in seen if i == j) for j in range(len(episodes))]
    return per_episode


@pytest.fixture(scope="module")
def sp(llama_tokenizer_path):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_path))


@pytest.mark.parametrize("k", [8, 3])
def test_chunks_are_the_next_k_normalized_actions_of_each_frame(bridge_data_dir, llama_tokenizer_path, sp,
                                                                tmp_path, k):
    episodes = reference(bridge_data_dir, "train")
    batches = one_pass(chunk_cfg(bridge_data_dir, tmp_path, k), llama_tokenizer_path)
    per_episode = check_chunks(batches, episodes, k, sp)
    assert per_episode == [len(e["action"]) - k + 1 for e in episodes]  # T - K + 1, no end padding
    assert sum(per_episode) == 25 * (8 - k + 1)


def truncate(lengths):
    """Edit for bad_input.make_builder: train episode i keeps its first lengths[i] raw steps."""
    def edit(split, i, ex):
        if split != "train" or i not in lengths:
            return
        f = ex.features.feature
        for key in [key for key in f if key.startswith("steps/")]:
            kind = f[key].WhichOneof("kind")
            values = list(getattr(f[key], kind).value)
            per_step = len(values) // RAW_STEPS
            del getattr(f[key], kind).value[:]
            getattr(f[key], kind).value.extend(values[: lengths[i] * per_step])
    return edit


def test_episodes_shorter_than_k_are_dropped_and_counted(bridge_data_dir, llama_tokenizer_path, sp, tmp_path):
    # Raw 6, 6 and 9 steps -> 4, 4 and 7 standardized steps: shorter than K=8 (15 frames).
    data = bad_input.make_builder(bridge_data_dir, tmp_path / "data", truncate({0: 6, 1: 6, 2: 9}))
    episodes = reference(data, "train")
    assert [len(e["action"]) for e in episodes[:4]] == [4, 4, 7, 8]
    with pytest.warns(pipeline.DataWarning) as rec:
        batches = one_pass(chunk_cfg(data, tmp_path, 8), llama_tokenizer_path)
    said = [str(w.message) for w in rec if "action_chunk" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in rec]
    assert "'bridge_dataset'" in said[0] and "3 of 50 trajectories" in said[0] and "15 frames" in said[0]
    assert "action_chunk=8" in said[0] and "dropped" in said[0]
    per_episode = check_chunks(batches, episodes, 8, sp)
    assert per_episode == [0, 0, 0] + [1] * 22

    # K=4 on the same data keeps every episode: 4-4+1, 4-4+1, 7-4+1, then 8-4+1, and says nothing.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", pipeline.DataWarning)
        batches = one_pass(chunk_cfg(data, tmp_path, 4), llama_tokenizer_path)
    assert check_chunks(batches, episodes, 4, sp) == [1, 1, 4] + [5] * 22


def test_no_episode_long_enough_is_an_error_naming_dataset_k_and_longest(bridge_data_dir, llama_tokenizer_path,
                                                                         tmp_path):
    with pytest.raises(ValueError) as e:
        pipeline.make_train_iterator(chunk_cfg(bridge_data_dir, tmp_path, 9), llama_tokenizer_path, 0, 1)
    msg = str(e.value)
    assert "'bridge_dataset'" in msg and "action_chunk=9" in msg and "longest: 8 steps" in msg


def test_statistics_cache_without_lengths_is_recomputed_for_chunks(bridge_data_dir, llama_tokenizer_path, sp,
                                                                   tmp_path, caplog):
    data = bad_input.make_builder(bridge_data_dir, tmp_path / "data")
    for f in (data / BUILDER / "1.0.0").glob("dataset_statistics_*.json"):
        f.unlink()  # a cache file the fixture folder may hold, copied along (keyed on the old files)
    cfg = chunk_cfg(data, tmp_path, 8)
    stats = pipeline.dataset_statistics(dataclasses.replace(cfg, action_chunk=1))
    files = sorted((data / BUILDER / "1.0.0").glob("dataset_statistics_*.json"))
    assert len(files) == 1
    entry = json.loads(files[0].read_text())
    assert entry[normalization.LENGTHS_KEY] == {"8": 50}
    del entry[normalization.LENGTHS_KEY]  # what an older vla_jax wrote
    files[0].write_text(json.dumps(entry))
    with caplog.at_level(logging.WARNING, logger="vla_jax.data.normalization"):
        batches = one_pass(cfg, llama_tokenizer_path)
    assert any("computing them again" in r.getMessage() for r in caplog.records)
    assert json.loads(files[0].read_text())[normalization.LENGTHS_KEY] == {"8": 50}
    assert check_chunks(batches, reference(data, "train"), 8, sp) == [1] * 25
    assert pipeline.dataset_statistics(cfg) == stats  # the exported statistics do not change


def test_action_chunk_config_is_checked_and_defaults_to_one(bridge_data_dir):
    from configs.common import base_config

    c = base_config()
    assert c.data.action_chunk == 1
    assert pipeline.DataConfig.from_config(c.data).action_chunk == 1
    assert pipeline.DataConfig().action_chunk == 1
    for bad in (0, -8, 2.5, True, "8"):
        with pytest.raises(ValueError, match="action_chunk"):
            pipeline.DataConfig(data_dir=str(bridge_data_dir), action_chunk=bad)


# ------------------------------------------------------------------------------------------------
# encode_batch with chunks (no pipeline).

def test_encode_batch_chunk_layout(llama_tokenizer_path, sp):
    k, d = 8, 7
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1.1, 1.1, size=(2, k, d)).astype(np.float32)
    actions[0, 0, :3] = [1.0, -1.0, 0.0]
    tok = VLATokenizer.from_file(llama_tokenizer_path, max_len=100, action_chunk=k)
    instr = ["pick up the spoon", b"Put the carrot on the plate."]
    out = tok.encode_batch(instr, actions)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for v in out.values():
        assert v.shape == (2, 100) and v.dtype == np.int32
    for r, text in enumerate(["pick up the spoon", "Put the carrot on the plate."]):
        # Row-major: a_0's 7 ids, then a_1's, ... (timestep-major).
        act = [int(action_ids_np(actions[r, t, j])) for t in range(k) for j in range(d)]
        expect = prompt_ids_np(sp, text) + act + [2]
        n = len(expect)
        assert out["input_ids"][r, :n].tolist() == expect and (out["input_ids"][r, n:] == 32000).all()
        assert out["attention_mask"][r].tolist() == [1] * n + [0] * (100 - n)
        assert (out["labels"][r, : n - k * d - 1] == -100).all() and (out["labels"][r, n:] == -100).all()
        assert out["labels"][r, n - k * d - 1:n].tolist() == act + [2]
        assert out["input_ids"][r, n - k * d - 2] == 29871
    flat = tok.encode_batch(instr, actions.reshape(2, k * d))
    for key in out:
        np.testing.assert_array_equal(flat[key], out[key], err_msg=key)


def test_encode_batch_chunk_shape_errors_name_the_shapes(llama_tokenizer_path):
    tok = VLATokenizer.from_file(llama_tokenizer_path, max_len=100, action_chunk=8)
    good = np.zeros((2, 8, 7), np.float32)
    for shape in [(2, 7), (2, 8, 6), (2, 7, 7), (2, 57), (3, 8, 7), (2, 8, 7, 1)]:
        with pytest.raises(ValueError) as e:
            tok.encode_batch(["a", "b"], np.zeros(shape, np.float32))
        msg = str(e.value)
        assert str(shape) in msg and "[B=2, 8, 7]" in msg and "[B=2, 56]" in msg and "action_chunk=8" in msg
    with pytest.raises(ValueError, match="max_seq_len"):
        VLATokenizer.from_file(llama_tokenizer_path, max_len=64, action_chunk=8).encode_batch(["a", "b"], good)
    # K=1 keeps OpenVLA's single-action shape only.
    one = VLATokenizer.from_file(llama_tokenizer_path, max_len=100)
    with pytest.raises(ValueError, match=r"\[B=2, 7\], got \(2, 1, 7\)"):
        one.encode_batch(["a", "b"], np.zeros((2, 1, 7), np.float32))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="action_chunk"):
            VLATokenizer.from_file(llama_tokenizer_path, action_chunk=bad)


def test_split_without_a_full_chunk_is_an_error_not_an_empty_stream(bridge_data_dir, llama_tokenizer_path,
                                                                    tmp_path):
    # Every val episode cut to 6 raw steps (4 standardized): the train split still has 8-step
    # episodes, so the up-front check (all splits) passes, but the val stream holds no chunk of 8.
    def edit(split, i, ex):
        if split == "val":
            truncate({i: 6})("train", i, ex)

    data = bad_input.make_builder(bridge_data_dir, tmp_path / "data", edit)
    with pytest.warns(pipeline.DataWarning, match="25 of 50 trajectories"):
        it = pipeline.make_train_iterator(chunk_cfg(data, tmp_path, 8, split="val", repeat=True),
                                          llama_tokenizer_path, 0, 1)
    with pytest.raises(ValueError) as e:
        next(it)
    msg = str(e.value)
    assert "'bridge_dataset'" in msg and "'val'" in msg and "action_chunk=8" in msg and "no usable frames" in msg


def test_resume_state_of_unchunked_stream_keeps_its_old_fingerprint(bridge_data_dir, llama_tokenizer_path,
                                                                    tmp_path):
    """A K=1 iterator state saved before `action_chunk` existed still resumes: its fingerprint is the
    hash of the config without that field (the pre-chunk format); K=8 gets another one."""
    import hashlib

    cfg = chunk_cfg(bridge_data_dir, tmp_path, 1, repeat=True)
    it = pipeline.make_train_iterator(cfg, llama_tokenizer_path, 0, 1)
    old = {k: v for k, v in dataclasses.asdict(cfg).items()
           if k not in ("threads", "ram_budget_gb", "stats_cache_dir", "dataset_configs", "action_chunk",
                        "cameras", "use_proprio")}  # fields added later, left out at their defaults
    old.update(process_index=0, process_count=1)
    old_fp = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    state = json.loads(bytes(it.get_state()).decode())
    assert state["fingerprint"] == old_fp
    it8 = pipeline.make_train_iterator(dataclasses.replace(cfg, action_chunk=8), llama_tokenizer_path, 0, 1)
    with pytest.raises(ValueError, match="different data config"):
        it8.set_state(it.get_state())


@pytest.mark.parametrize("t, k", [(5, 1), (5, 3), (5, 5), (4, 5), (0, 2)])
def test_chunk_actions_unit(t, k):
    """chunk_actions / has_full_chunk on a small trajectory against a numpy loop."""
    rng = np.random.default_rng(t * 10 + k)
    a = rng.normal(size=(t, 7)).astype(np.float32)
    traj = {"action": tf.constant(a), "image": tf.constant([f"img{i}".encode() for i in range(t)], tf.string),
            "language_instruction": tf.constant([b"x"] * t, tf.string), "dataset_index": tf.zeros([t], tf.int32)}
    assert bool(transforms.has_full_chunk(traj, k)) == (t >= k)
    if t < k:
        return
    out = transforms.chunk_actions(traj, k)
    want = np.stack([a[s:s + k] for s in range(t - k + 1)])  # frame s: actions s .. s+k-1
    assert out["action"].shape == (t - k + 1, k, 7)
    np.testing.assert_array_equal(out["action"].numpy(), want)
    assert out["image"].numpy().tolist() == [f"img{i}".encode() for i in range(t - k + 1)]
    assert out["language_instruction"].shape == (t - k + 1,) and out["dataset_index"].shape == (t - k + 1,)
