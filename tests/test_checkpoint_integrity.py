"""Checkpoint integrity: a checkpoint whose files changed after the save (one flipped byte, a
truncated or deleted array file, a truncated data.json or _METADATA) or whose state is not finite is
never resumed from nor called good; the resume falls back to the newest checkpoint that verifies and
says which one it skipped and why; keep-N never deletes the last verified checkpoint.

The truth is the state each step saved (kept here in numpy); the corruptions are done on disk
after the Checkpointer is closed, as a disk error or a careless user would."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax import checkpoints as ckpt_lib
from vla_jax.checkpoint_integrity import CHECKSUM_FILE, CheckpointError

ASSETS = {"config": {"k": 1}, "dataset_statistics": {"d": {"action": {"q99": [1.0]}}}, "tokenizer": {"kind": "test"}}
N = 4096  # random float32: incompressible, so a flipped byte lands in the stored values


def lineage(k):
    """The state after k steps of a clean run (w_k = w_0 + k; w_0 random multiples of 2^-10, so the
    sums are exact in float32)."""
    w0 = (np.random.default_rng(0).integers(-2**20, 2**20, N) / 1024).astype(np.float32)
    return {"step": np.int32(k), "params": {"w": w0 + np.float32(k)}}


def abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), lineage(0))


def save_steps(directory, steps, keep=3, state_of=lineage):
    ckpt = ckpt_lib.Checkpointer(str(directory), max_to_keep=keep)
    for k in steps:
        data = ckpt_lib.encode_data_states([np.frombuffer(f"pos{k}".encode(), np.uint8)])
        ckpt.save(k, jax.tree.map(jnp.asarray, state_of(k)), data, ASSETS, {"model": "test"}, force=True)
    ckpt.close()


def largest_file(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def resume(directory):
    """What train.py does on restart: the latest step, its compatibility check and its restore."""
    ckpt = ckpt_lib.Checkpointer(str(directory), max_to_keep=3)
    step = ckpt.latest_step()
    state, data = ckpt.restore(step, abstract())
    return ckpt, step, jax.tree.map(np.asarray, state), data


def skipped_messages(caplog):
    return [r.getMessage() for r in caplog.records if "skipp" in r.getMessage()]


def test_one_flipped_byte_is_not_resumed_silently(tmp_path, caplog):
    save_steps(tmp_path, [1, 2, 3])
    bad = largest_file(tmp_path / "3" / "state")
    flip_byte(bad)
    with caplog.at_level(logging.WARNING):
        ckpt, step, state, data = resume(tmp_path)
    ckpt.close()
    # Whatever was resumed must be exactly what that step saved (today: step 3 with a changed value).
    np.testing.assert_array_equal(state["params"]["w"], lineage(step)["params"]["w"])
    assert step == 2 and data["states"] == ckpt_lib.encode_data_states([np.frombuffer(b"pos2", np.uint8)])["states"]
    rel = os.path.relpath(bad, tmp_path / "3")
    msgs = skipped_messages(caplog)
    assert any("checkpoint 3" in m and rel in m and "corrupt" in m for m in msgs), msgs
    assert (tmp_path / "3.corrupt").is_dir() and not (tmp_path / "3").exists()  # kept aside, not deleted


@pytest.mark.parametrize("damage,what", [
    ("truncate_array", "truncated"), ("delete_array", "missing"),
    ("truncate_data_json", "truncated"), ("truncate_metadata", "truncated"),
])
def test_damaged_files_name_the_checkpoint_and_file_then_fall_back(tmp_path, caplog, damage, what):
    save_steps(tmp_path, [1, 2])
    step_dir = tmp_path / "2"
    target = {"truncate_array": lambda: largest_file(step_dir / "state" / "ocdbt.process_0" / "d"),
              "delete_array": lambda: largest_file(step_dir / "state" / "ocdbt.process_0" / "d"),
              "truncate_data_json": lambda: str(step_dir / "data" / "data.json"),
              "truncate_metadata": lambda: str(step_dir / "state" / "_METADATA")}[damage]()
    if damage == "delete_array":
        os.remove(target)
    else:
        truncate(target)
    with caplog.at_level(logging.WARNING):
        ckpt, step, state, _ = resume(tmp_path)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(state["params"]["w"], lineage(1)["params"]["w"])
    rel = os.path.relpath(target, step_dir)
    msgs = skipped_messages(caplog)
    assert len(msgs) == 1 and "checkpoint 2" in msgs[0] and rel in msgs[0] and what in msgs[0], msgs
    assert "\n" not in msgs[0]


def test_keep_n_after_a_corrupt_checkpoint_never_loses_the_last_good_one(tmp_path):
    save_steps(tmp_path, [1, 2, 3], keep=2)  # keeps 2 and 3
    flip_byte(largest_file(tmp_path / "3" / "state"))
    ckpt, step, state, _ = resume(tmp_path)
    ckpt.close()
    # Continue the run from what was resumed, two more saves with keep-2 (today: from the corrupt 3,
    # so 4 and 5 continue the corruption and the clean step 2 is deleted).
    save_steps(tmp_path, [step + 1, step + 2], keep=2,
               state_of=lambda k: {"step": np.int32(k), "params": {"w": state["params"]["w"] + np.float32(k - step)}})
    reader = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=2)
    remaining = reader.all_steps()
    assert remaining, "no checkpoint left"
    for k in remaining:
        got = jax.tree.map(np.asarray, reader.restore(k, abstract())[0])
        np.testing.assert_array_equal(got["params"]["w"], lineage(k)["params"]["w"], err_msg=f"step {k}")
    reader.close()


def test_a_non_finite_state_is_not_the_latest_good_checkpoint(tmp_path, caplog):
    def state_of(k):
        s = lineage(k)
        if k == 2:
            s["params"]["w"][7] = np.nan
        return s

    save_steps(tmp_path, [1, 2], state_of=state_of)
    with caplog.at_level(logging.WARNING):
        ckpt = ckpt_lib.Checkpointer(str(tmp_path))
        assert ckpt.latest_step() == 1
    ckpt.close()
    assert any("checkpoint 2" in m and "NaN" in m for m in skipped_messages(caplog))


def test_keep_n_counts_only_verified_checkpoints(tmp_path):
    save_steps(tmp_path, [1])
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), max_to_keep=1)
    ckpt.save(2, jax.tree.map(jnp.asarray, lineage(2)), ckpt_lib.encode_data_states([np.zeros(1, np.uint8)]),
              ASSETS, {"model": "test"}, force=True)
    # Step 2 is still being written or not yet checksummed: step 1 stays until 2 has verified.
    assert (tmp_path / "1").is_dir()
    ckpt.close()
    assert ckpt_lib.Checkpointer(str(tmp_path)).all_steps() == [2]
    assert (tmp_path / "2" / CHECKSUM_FILE).is_file()


def test_no_verifiable_checkpoint_is_an_error_naming_each(tmp_path):
    save_steps(tmp_path, [1, 2])
    for k in (1, 2):
        truncate(str(tmp_path / str(k) / "meta" / "meta.json"))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        ckpt.latest_step()
    msg = str(e.value)
    assert "checkpoint 2" in msg and "checkpoint 1" in msg and "meta/meta.json" in msg and "truncated" in msg


def test_loading_params_of_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    save_steps(tmp_path, [1])
    bad = largest_file(tmp_path / "1" / "state" / "ocdbt.process_0" / "d")
    truncate(bad)
    abstract_params = abstract()["params"]
    with pytest.raises(CheckpointError) as e:
        ckpt_lib.load_params(str(tmp_path), abstract_params)
    assert str(tmp_path / "1") in str(e.value) and os.path.relpath(bad, tmp_path / "1") in str(e.value)
    truncate(str(tmp_path / "1" / "config" / "config.json"))
    with pytest.raises(CheckpointError, match="config/config.json"):
        ckpt_lib.load_assets(str(tmp_path))


def test_a_clean_checkpoint_carries_checksums_of_every_file(tmp_path):
    save_steps(tmp_path, [1])
    record = json.loads((tmp_path / "1" / CHECKSUM_FILE).read_text())
    files = {os.path.relpath(os.path.join(r, f), tmp_path / "1").replace(os.sep, "/")
             for r, _, fs in os.walk(tmp_path / "1") for f in fs} - {CHECKSUM_FILE}
    assert set(record["files"]) == files and record["finite"] is True
    import hashlib
    for rel, entry in record["files"].items():
        blob = (tmp_path / "1" / rel).read_bytes()
        assert entry == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
