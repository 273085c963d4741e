"""Sharded inference (vla_jax.policy.mesh, Policy.load(mesh=...)) on the 8 simulated CPU devices.

Truth: the single-device policy's greedy tokens (tests/policy/test_policy.py checks those against full
forwards); the mesh's own sizes for the expected shard shapes. The geometry is the debug preset
with 8 heads in every tower and the LLM, so that a tensor axis of 8 divides heads and MLP widths.
"""

import dataclasses
import functools
import tempfile

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.policy.test_policy_helpers import random_images, random_params, stats_entry, write_checkpoint
from vla_jax.policy import mesh as policy_mesh
from vla_jax import sharding as shd
from vla_jax.models import decode
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.policy import Policy

INSTRUCTIONS = ["put carrot on plate", "open the drawer", "move the red block to the left of the blue bowl",
                "stack the cups", "Wipe the table with the sponge!"]


def _config(heads: int = 8, llm_mlp: int = 256):
    cfg = with_dtypes(get_preset("debug"), "float32")
    tower = dict(image_size=56, num_heads=heads)
    return dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, **tower),
                               siglip=dataclasses.replace(cfg.siglip, **tower),
                               llama=dataclasses.replace(cfg.llama, num_heads=heads, intermediate_size=llm_mlp))


@functools.lru_cache(maxsize=None)
def _checkpoint(tokenizer_path: str) -> str:
    cfg = _config()
    return write_checkpoint(tempfile.mkdtemp(prefix="vla_sharded_ckpt_"), cfg, random_params(cfg, seed=3),
                            {"bridge_dataset": stats_entry(0.01)}, tokenizer_path)


def _load(tokenizer_path, **kw):
    return Policy.load(_checkpoint(str(tokenizer_path)), batch_buckets=(8,), compilation_cache=False, **kw)


@pytest.fixture(scope="module")
def single(llama_tokenizer_path):
    policy = _load(llama_tokenizer_path)
    return policy, policy.predict_tokens(random_images(5, seed=4), INSTRUCTIONS)


@pytest.mark.parametrize("mesh", [(1, 1, 8), (1, 2, 4), (2, 1, 4)], ids=["tensor8", "fsdp2xtensor4", "data2xtensor4"])
def test_sharded_tokens_equal_single_device(single, llama_tokenizer_path, mesh):
    ref_policy, ref_tokens = single
    assert len(np.unique(ref_tokens)) > 3, "degenerate reference tokens: the comparison would be weak"
    policy = _load(llama_tokenizer_path, mesh=mesh)
    data, fsdp, tensor = mesh
    # Parameters really are split as the training rules say (kernel [embed, heads, head_dim]).
    q = policy.decode_params["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    assert q.sharding.shard_shape(q.shape) == (128 // fsdp, 8 // tensor, 16)
    assert len(q.sharding.device_set) == 8
    gate = policy.decode_params["layers"][1]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.shard_shape(gate.shape) == (128 // fsdp, 256 // tensor)
    tokens = policy.predict_tokens(random_images(5, seed=4), INSTRUCTIONS)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert policy.describe()["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor}

    # The KV cache the prefill fills is split over heads (and over the batch axes, batch 8 divides them).
    model, p = policy.model, policy.decode_params
    m = policy.mesh
    x = np.random.default_rng(0).standard_normal((8, 12, 128)).astype(np.float32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), (8, 12))
    fill = jax.jit(lambda p, x, pos: decode._layers(model, p["layers"], x, pos, decode.init_layer_caches(model, 8, 16))[1])
    with shd.mesh_rules(m, policy_mesh.activation_rules(m, 8)):
        caches = fill(p, x, pos)
    k = caches[0]["k"]  # [B, S, KVH, hd]
    assert k.sharding.shard_shape(k.shape) == (8 // (data * fsdp), 16, 8 // tensor, 16)


def test_mesh_not_dividing_heads_or_mlp_names_the_dimension():
    mesh3 = shd.make_mesh((1, 1, 3), jax.devices()[:3])
    with pytest.raises(ValueError, match=r"'heads' dimension \(axis 1\) has size 8, which the mesh's tensor axis "
                                         r"of size 3 does not divide"):
        policy_mesh.param_shardings(_config(), mesh3)
    mesh8 = shd.make_mesh((1, 1, 8))
    with pytest.raises(ValueError, match=r"llm/layers/mlp/(gate|up|down)_proj/kernel .*'mlp' dimension \(axis \d\) has "
                                         r"size 260, which the mesh's tensor axis of size 8 does not divide"):
        policy_mesh.param_shardings(_config(llm_mlp=260), mesh8)
    with pytest.raises(ValueError, match="three sizes"):
        policy_mesh.as_mesh("1,8")


def test_load_refuses_a_bad_mesh_before_reading_weights(llama_tokenizer_path, monkeypatch):
    from vla_jax import checkpoints

    ckpt = _checkpoint(str(llama_tokenizer_path))

    def no_read(*a, **k):
        raise AssertionError("weights were read although the mesh was refused")

    monkeypatch.setattr(checkpoints, "load_params", no_read)
    with pytest.raises(ValueError, match="tensor axis of size 3 does not divide"):
        Policy.load(ckpt, mesh=shd.make_mesh((1, 1, 3), jax.devices()[:3]), compilation_cache=False)
    # Too little memory per device: refused with the compiled decoder's per-device need, still unread.
    with pytest.raises(ValueError, match=r"needs (\d+\.\d+) GB per device on mesh .* but each device has 0\.00 GB"):
        Policy.load(ckpt, mesh=(1, 1, 8), device_memory=1000, batch_buckets=(8,), compilation_cache=False)
