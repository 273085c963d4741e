"""HF OpenVLA export -> import round trips: bit-identical for fp32, equal to the bf16 cast for bf16,
through the orbax checkpoint (training's own loader reads it), on a sharded mesh, and with LoRA."""

import dataclasses
import json
import os

import jax
import ml_dtypes
import numpy as np
import flax.linen as nn
import jax.numpy as jnp
import pytest
from flax import traverse_util

from tests.torch_reference import TorchOpenVLA
from vla_jax import checkpoints as ckpt_lib
from vla_jax import hf
from vla_jax import sharding as shd
from vla_jax.hf import __main__ as cli
from vla_jax.hf import checkpoint_io, importer
from vla_jax.hf import safetensors_io as sio
from vla_jax.hf import keys_openvla
from vla_jax.models import lora
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.spec import ActionCodec, BatchSpec

CFG = with_dtypes(get_preset("tiny"), "float32")
STATS = {"bridge_orig": {"action": {"mean": [0.1] * 7, "std": [1.0] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
                                    "q01": [-0.5] * 7, "q99": [0.5] * 7, "mask": [True] * 6 + [False]},
                         "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
                         "num_transitions": 10, "num_trajectories": 1}}


@pytest.fixture(scope="module")
def params():
    ref = TorchOpenVLA(CFG).randomize(seed=3)
    return keys_openvla.hf_to_params(ref.hf_state_dict(), CFG)


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def _assert_bits_equal(got, want):
    g, w = _flat(got), _flat(want)
    assert set(g) == set(w)
    for k in w:
        assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape, k
        assert g[k].tobytes() == w[k].tobytes(), "/".join(k)


def test_fp32_round_trip_is_bit_identical(params, tmp_path, llama_tokenizer_path):
    out = tmp_path / "hf"
    files = hf.export_params(params, CFG, str(out), dtype="float32", norm_stats=STATS,
                             tokenizer=str(llama_tokenizer_path), max_shard_size="1MB")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and sio.INDEX_FILE in files  # several shards + the index
    index = json.loads((out / sio.INDEX_FILE).read_text())
    assert set(index["weight_map"]) == {r.key for r in keys_openvla.openvla_rules(CFG)}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in sio.index_tensors(str(out)).values())
    cfg, got, stats, tok = hf.load_hf_dir(str(out))
    assert cfg == with_dtypes(CFG, "bfloat16", "float32")  # compute dtype defaults to bf16
    assert stats == STATS and tok == str(out / "tokenizer.model")
    _assert_bits_equal(got, params)


def test_bf16_export_equals_the_bf16_cast(params, tmp_path):
    out = tmp_path / "hf"
    hf.export_params(params, CFG, str(out), dtype="bfloat16", max_shard_size="2MB")
    cfg, got, _, _ = hf.load_hf_dir(str(out))  # param dtype follows the stored one
    assert cfg.param_dtype == "bfloat16"
    _assert_bits_equal(got, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params))
    _, got32, _, _ = hf.load_hf_dir(str(out), param_dtype="float32")
    _assert_bits_equal(got32, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                                           params))


def test_sharded_placement_streams_layers_into_device_arrays(params, tmp_path, monkeypatch):
    """Every stacked leaf goes through the donated per-layer device update, onto the logical-rule shardings,
    and every tensor through the XLA conversion path (both used only for large tensors by default)."""
    monkeypatch.setattr(importer, "DEVICE_ASSEMBLY_BYTES", 0)
    monkeypatch.setattr(importer, "CONVERT_ON_DEVICE_BYTES", 0)
    hf.export_params(params, CFG, str(tmp_path / "hf"), dtype="float32")
    hf.export_params(params, CFG, str(tmp_path / "hf16"), dtype="bfloat16")
    _, got16, _, _ = hf.load_hf_dir(str(tmp_path / "hf16"))
    _assert_bits_equal(got16, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params))
    mesh = shd.make_mesh((1, 8, 1))
    _, got, _, _ = hf.load_hf_dir(str(tmp_path / "hf"), mesh=mesh)
    _assert_bits_equal(got, params)
    want = shd.logical_to_sharding(
        nn.get_partition_spec(importer.abstract_params(with_dtypes(CFG, "float32"))), mesh)
    want = traverse_util.flatten_dict(want)
    for path, arr in traverse_util.flatten_dict(got).items():
        assert arr.sharding == want[path], path
    assert tuple(got["llm"]["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")


def test_cli_import_writes_a_checkpoint_training_loads_and_export_restores_the_files(params, tmp_path,
                                                                                    llama_tokenizer_path):
    hf_dir, work, back = tmp_path / "hf", tmp_path / "work", tmp_path / "back"
    hf.export_params(params, CFG, str(hf_dir), dtype="float32", norm_stats=STATS,
                     tokenizer=str(llama_tokenizer_path), max_shard_size="1MB")
    assert cli.main(["import", str(hf_dir), str(work)]) == 0
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    # The training side's own loaders read it.
    assets = ckpt_lib.load_assets(str(work))
    assert assets["dataset_statistics"] == STATS
    assert assets["tokenizer"]["pad_id"] == 32000 and assets["tokenizer"]["vocab_size"] == 32000
    assert assets["meta"]["model"] == json.loads(json.dumps(dataclasses.asdict(
        with_dtypes(CFG, "bfloat16", "float32"))))
    assert assets["config"]["model"]["preset"] == "tiny"
    # The import's batch layout: the tiny model's image and action codec, 64 text tokens (the tokenizer
    # asset's), one dataset per statistics entry, no test-time crop (an HF folder records no augmentation).
    spec = BatchSpec.from_json(assets["batch_spec"])
    assert spec == BatchSpec(image_size=CFG.image_size, text_len=64, codec=ActionCodec(action_dim=7),
                             num_datasets=1, test_center_crop=False)
    abstract = importer.targets_for(importer.abstract_params(with_dtypes(CFG, "float32")))
    _assert_bits_equal(ckpt_lib.load_params(str(work), abstract), params)
    # Export back (streamed from orbax, tokenizer from the embedded asset): same tensors, same bytes.
    assert cli.main(["export", str(work), str(back), "--dtype=float32", "--max_shard_size=1MB"]) == 0
    a, b = sio.index_tensors(str(hf_dir)), sio.index_tensors(str(back))
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}
    ta = {i.key: x.tobytes() for i, x in sio.iter_tensors(list(a.values()))}
    tb = {i.key: x.tobytes() for i, x in sio.iter_tensors(list(b.values()))}
    assert ta == tb
    assert (back / "tokenizer.model").read_bytes() == llama_tokenizer_path.read_bytes()
    assert json.loads((back / "dataset_statistics.json").read_text()) == STATS


def test_lora_adapters_are_merged_before_export(params, tmp_path):
    # A few PEFT base names, fused ViT qkv included (all-linear would only add compile time here).
    lcfg = lora.LoraConfig(rank=4, alpha=8.0, targets=("qkv", "q_proj", "fc3"))
    # jitted: the eager versions compile every op separately (seconds). B starts at zero; shift it so
    # that the merge changes every targeted kernel.
    adapters = jax.jit(lambda p, r: jax.tree.map(lambda x: x + 0.01, nn.meta.unbox(lora.init_lora(p, lcfg, r))))(
        params, jax.random.PRNGKey(1))
    combined = dict(params, lora=adapters)
    merged = jax.jit(lambda p, a: lora.merge(p, a, lcfg))(params, adapters)
    hf.export_params(combined, CFG, str(tmp_path / "a"), dtype="float32", lora_config=lcfg)
    _, got, _, _ = hf.load_hf_dir(str(tmp_path / "a"))
    _assert_bits_equal(got, merged)
    # From a checkpoint: merged leaf by leaf during the streamed export, with the run's lora settings.
    cfg_dict = json.loads(json.dumps(dataclasses.asdict(CFG)))
    assets = {"config": {"lora": {"enabled": True, "rank": 4, "alpha": 8.0, "targets": ["qkv", "q_proj", "fc3"]}},
              "dataset_statistics": {},
              "tokenizer": {}}
    checkpoint_io.write_params_checkpoint(str(tmp_path / "work"), jax.tree.map(jnp.asarray, combined), assets,
                                          cfg_dict)
    hf.export_checkpoint(str(tmp_path / "work"), str(tmp_path / "b"), dtype="float32")
    _, got, _, _ = hf.load_hf_dir(str(tmp_path / "b"))
    _assert_bits_equal(got, merged)


def test_reader_and_writer_agree_with_the_safetensors_library(tmp_path):
    """Tensors read one per `safe_open` equal those of one `safe_open` held for the whole file (bf16 as
    ml_dtypes.bfloat16), in the file's data order; the library reads what the sharded writer writes,
    and the shards get a plain file's permissions (the library alone creates them 0600)."""
    import safetensors.numpy
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(ml_dtypes.bfloat16), "b": rng.standard_normal(7).astype(np.float16),
               "c": rng.standard_normal((2, 1, 4)).astype(np.float32)}
    safetensors.numpy.save_file(tensors, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    infos, _ = sio.read_header(str(tmp_path / "lib.safetensors"))
    with safe_open(str(tmp_path / "lib.safetensors"), framework="numpy") as f:
        for info, arr in sio.iter_tensors(list(infos.values())):
            ref = f.get_tensor(info.key)
            assert arr.dtype == ref.dtype and arr.shape == ref.shape and arr.tobytes() == ref.tobytes()
    assert infos["a"].dtype == "BF16" and np.dtype(ml_dtypes.bfloat16) == sio.DTYPES["BF16"]
    entries = [sio.Entry(k, v.shape, v.dtype) for k, v in tensors.items()]
    w = sio.ShardedWriter(str(tmp_path), entries, max_shard_size=60)
    for k, v in tensors.items():
        w.write(k, v)
    names = w.close()
    assert names == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", sio.INDEX_FILE]
    back = {}
    for n in names[:2]:
        back.update(safetensors.numpy.load_file(str(tmp_path / n)))
    assert {k: v.tobytes() for k, v in back.items()} == {k: v.tobytes() for k, v in tensors.items()}
    mask = os.umask(0o022)
    os.umask(mask)
    assert [oct(os.stat(tmp_path / n).st_mode & 0o777) for n in names] == [oct(0o666 & ~mask)] * 3


def test_training_init_from_an_hf_folder(params, tmp_path):
    """`load_hf_params` fills a run's abstract params (shardings and fp32 master dtype from the run)."""
    hf.export_params(params, CFG, str(tmp_path / "hf"), dtype="bfloat16")
    assert hf.is_hf_dir(str(tmp_path / "hf")) and not hf.is_hf_dir(str(tmp_path))
    mesh = shd.make_mesh((1, 8, 1))
    abstract = importer.targets_for(importer.abstract_params(with_dtypes(CFG, "bfloat16", "float32")), mesh)
    got = hf.load_hf_params(str(tmp_path / "hf"), abstract, expect_config=with_dtypes(CFG, "bfloat16"))
    _assert_bits_equal(got, jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                                         params))
    assert got["llm"]["embed_tokens"]["embedding"].sharding == abstract["llm"]["embed_tokens"]["embedding"].sharding
    other = dataclasses.replace(CFG, llama=dataclasses.replace(CFG.llama, rms_norm_eps=1e-5))
    with pytest.raises(ValueError, match=r"differs from this run's model in llama\.rms_norm_eps \(1e-06 there, "
                                         r"1e-05 here\)"):
        hf.load_hf_params(str(tmp_path / "hf"), abstract, expect_config=other)
