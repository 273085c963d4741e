"""Bad HF input gives an error naming the file or the first keys/shapes involved, and never leaves an
output folder (or a half-written temporary one) behind."""

import json
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy

from vla_jax import hf
from vla_jax.hf import __main__ as cli
from vla_jax.hf import importer
from vla_jax.hf import safetensors_io as sio
from vla_jax.models.config import get_preset, with_dtypes

CFG = with_dtypes(get_preset("tiny"), "float32")


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory, llama_tokenizer_path):
    """A valid tiny HF OpenVLA folder (random weights) with 3+ shards."""
    root = tmp_path_factory.mktemp("good")
    params = importer.abstract_params(CFG)
    rng = np.random.default_rng(0)
    import flax.linen as nn
    import jax
    values = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), nn.meta.unbox(params))
    hf.export_params(values, CFG, str(root / "hf"), dtype="bfloat16", max_shard_size="2MB",
                     tokenizer=str(llama_tokenizer_path))
    return root / "hf"


@pytest.fixture
def bad(good_dir, tmp_path):
    """A fresh copy of the good folder to break, and the output path to import into."""
    d = tmp_path / "in"
    shutil.copytree(good_dir, d)
    return d, tmp_path / "out"


def _shards(d):
    return sorted(json.loads((d / sio.INDEX_FILE).read_text())["weight_map"].items())


def _rewrite(d, fn, change, index_change=None):
    """Loads shard `fn`, applies change(dict) and writes it back; optionally edits the index."""
    tensors = safetensors.numpy.load_file(str(d / fn))
    change(tensors)
    safetensors.numpy.save_file(tensors, str(d / fn), metadata={"format": "pt"})
    if index_change:
        index = json.loads((d / sio.INDEX_FILE).read_text())
        index_change(index["weight_map"])
        (d / sio.INDEX_FILE).write_text(json.dumps(index))


def _import_fails(d, out, match):
    with pytest.raises(ValueError, match=match):
        hf.import_hf(str(d), str(out))
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(out.name + ".tmp-")]


def test_no_config_json(bad):
    d, out = bad
    (d / "config.json").unlink()
    _import_fails(d, out, rf"{d} has no config.json")


def test_cli_reports_the_error_and_exits_2(bad, capsys):
    d, out = bad
    (d / "config.json").unlink()
    assert cli.main(["import", str(d), str(out)]) == 2
    assert f"{d} has no config.json" in capsys.readouterr().err
    assert not out.exists()


def test_missing_shard_named_in_the_index(bad):
    d, out = bad
    fn = _shards(d)[-1][1]
    first_key = [k for k, f in _shards(d) if f == fn][0]
    (d / fn).unlink()
    _import_fails(d, out, rf"names shard {fn} which is missing .*e\.g\. \['{first_key}'")


def test_truncated_safetensors_file(bad):
    d, out = bad
    _, fn = _shards(d)[0]
    data = (d / fn).read_bytes()
    (d / fn).write_bytes(data[: len(data) - 1000])
    _import_fails(d, out, rf"{d / fn} is truncated")
    (d / fn).write_bytes(data[:5])
    _import_fails(d, out, rf"{d / fn} is truncated")


def test_checkpoint_of_another_model_type(bad):
    d, out = bad
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({"model_type": "llama", **cfg["text_config"]}))
    _import_fails(d, out, r"model_type is 'llama', expected 'openvla'.*import-base")


def test_missing_key(bad):
    d, out = bad
    key, fn = [(k, f) for k, f in _shards(d) if k.endswith("layers.1.mlp.up_proj.weight")][0]
    _rewrite(d, fn, lambda t: t.pop(key), lambda wm: wm.pop(key))
    _import_fails(d, out, rf"1 tensors missing, e\.g\. {key} \(expected shape \[128, 64\]\)")


def test_key_in_index_but_not_in_its_shard(bad):
    d, out = bad
    key, fn = _shards(d)[3]
    _rewrite(d, fn, lambda t: t.pop(key))
    _import_fails(d, out, rf"maps '{key}' to {fn}, but that file does not hold it")


def test_unexpected_key(bad):
    d, out = bad
    _, fn = _shards(d)[0]
    extra = "language_model.model.layers.7.mlp.up_proj.weight"
    _rewrite(d, fn, lambda t: t.update({extra: np.zeros((2, 2), np.float32)}),
             lambda wm: wm.update({extra: fn}))
    _import_fails(d, out, rf"1 unexpected tensors, e\.g\. {extra} in {fn}")


def test_shape_mismatch(bad):
    d, out = bad
    key, fn = [(k, f) for k, f in _shards(d) if k.endswith("projector.fc2.weight")][0]
    _rewrite(d, fn, lambda t: t.update({key: np.zeros((64, 79), np.float32)}))
    _import_fails(d, out, rf"{key} in {fn} has shape \[64, 79\], expected \[64, 320\]")


def test_failure_while_converting_leaves_no_output(bad, monkeypatch):
    d, out = bad
    real = sio.iter_tensors

    def dies_halfway(infos):
        for n, item in enumerate(real(infos)):
            if n == 40:
                raise ValueError("disk went away")
            yield item

    monkeypatch.setattr(sio, "iter_tensors", dies_halfway)
    _import_fails(d, out, "disk went away")


def test_existing_output_is_not_overwritten_without_the_flag(bad):
    d, out = bad
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match=rf"{out} already exists.*--overwrite"):
        hf.import_hf(str(d), str(out))
    assert (out / "keep").read_text() == "x"
    hf.import_hf(str(d), str(out), overwrite=True)
    assert not (out / "keep").exists() and (out / "checkpoints" / "0" / "state").is_dir()


def test_export_of_a_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=rf"{tmp_path} is not a vla_jax checkpoint"):
        hf.export_checkpoint(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
