"""The checkpoint format's assets (vla_jax/checkpoints.py): what `build_assets` writes with every
checkpoint is read back by `load_assets` as written — the BatchSpec (with its ActionCodec) equal to
the one the run used — a checkpoint without a required asset is refused before anything is written,
and one written before `batch_spec` existed still loads (without it)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax import checkpoints as ckpt_lib
from vla_jax.spec import ActionCodec, BatchSpec

SPEC = BatchSpec(image_size=28, text_len=20, codec=ActionCodec(action_dim=5, n_bins=64, base_vocab_size=512),
                 num_datasets=3, test_center_crop=True)
STATE = {"step": np.int32(2), "params": {"w": np.arange(6, dtype=np.float32)}}


def _save(directory, assets):
    ckpt = ckpt_lib.Checkpointer(str(directory), max_to_keep=None, async_save=False)
    ckpt.save(2, {"step": jnp.asarray(STATE["step"]), "params": {"w": jnp.asarray(STATE["params"]["w"])}},
              ckpt_lib.encode_data_states([]), assets, {"model": "test"}, force=True)
    ckpt.close()


def test_every_asset_is_read_back_as_written(tmp_path):
    stats = {"d": {"action": {"q01": [-1.0] * 5, "q99": [1.0] * 5}}}
    record = {"data_dir": "somewhere", "mixture": "d"}
    assets = ckpt_lib.build_assets({"k": 1}, stats, {"kind": "test"}, SPEC, record)
    _save(tmp_path / "c", assets)
    got = ckpt_lib.load_assets(str(tmp_path / "c"))
    assert got["config"] == {"k": 1} and got["dataset_statistics"] == stats and got["tokenizer"] == {"kind": "test"}
    assert got["training_data"] == record
    assert BatchSpec.from_json(got["batch_spec"]) == SPEC
    assert os.path.isfile(tmp_path / "c" / "2" / "batch_spec" / "batch_spec.json")


def test_build_assets_takes_a_batch_spec_and_leaves_out_absent_training_data():
    assets = ckpt_lib.build_assets({}, {}, {}, SPEC)
    assert sorted(assets) == ["batch_spec", "config", "dataset_statistics", "tokenizer"]
    with pytest.raises(ValueError, match="'batch_spec' must be a vla_jax.spec.BatchSpec, got dict"):
        ckpt_lib.build_assets({}, {}, {}, SPEC.to_json())


def test_a_missing_required_asset_is_named_and_nothing_is_written(tmp_path):
    assets = ckpt_lib.build_assets({}, {}, {}, SPEC)
    del assets["tokenizer"]
    with pytest.raises(ValueError, match=r"checkpoint assets \['tokenizer'\] are missing"):
        _save(tmp_path / "c", assets)
    assert not os.path.exists(tmp_path / "c" / "2")


def test_a_checkpoint_from_before_batch_spec_loads_without_it(tmp_path):
    _save(tmp_path / "c", {"config": {}, "dataset_statistics": {}, "tokenizer": {}})
    got = ckpt_lib.load_assets(str(tmp_path / "c"))
    assert "batch_spec" not in got and got["config"] == {}
