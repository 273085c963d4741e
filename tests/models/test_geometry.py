"""The real OpenVLA-7B geometry through `jax.eval_shape` (no memory), logical axis names on every
parameter, and how the rules table shards the 7B parameters over an 8-device FSDP mesh."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from vla_jax import sharding
from vla_jax.models.config import get_preset
from vla_jax.models.openvla import OpenVLA

CFG = get_preset("openvla-7b")


@pytest.fixture(scope="module")
def abstract_params():
    s = CFG.image_size
    model = OpenVLA(CFG)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8),
                                             np.zeros((1, 20), np.int32)))["params"]


def _unboxed(tree):
    return nn.meta.unbox(tree)


def test_parameter_count_is_exactly_openvla_7b(abstract_params):
    leaves = jax.tree.leaves(_unboxed(abstract_params))
    counts = {k: sum(math.prod(x.shape) for x in jax.tree.leaves(_unboxed(v))) for k, v in abstract_params.items()}
    # Counts from the released checkpoint's shapes (OPENVLA_REFERENCE.md §1.6, VERIFIED_FACTS.md).
    assert counts == {"dino": 303_230_976, "siglip": 427_680_704, "projector": 71_385_600, "llm": 6_738_939_904}
    assert sum(math.prod(x.shape) for x in leaves) == 7_541_237_184


def test_named_tensor_shapes(abstract_params):
    p = _unboxed(abstract_params)
    assert p["llm"]["embed_tokens"]["embedding"].shape == (32064, 4096)
    assert p["llm"]["lm_head"]["kernel"].shape == (4096, 32064)
    assert p["llm"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (32, 4096, 32, 128)
    assert p["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].shape == (32, 4096, 11008)
    assert p["projector"]["fc1"]["kernel"].shape == (2176, 8704)
    assert p["projector"]["fc3"]["kernel"].shape == (4096, 4096)
    assert p["dino"]["pos_embed"].shape == (1, 256, 1024)
    assert p["dino"]["reg_token"].shape == (1, 4, 1024)
    assert p["dino"]["patch_embed"]["kernel"].shape == (14, 14, 3, 1024)
    assert p["siglip"]["pos_embed"].shape == (1, 256, 1152)
    assert p["siglip"]["attn_pool"]["latent"].shape == (1, 1, 1152)
    assert "cls_token" not in p["siglip"]


def test_every_parameter_has_logical_axis_names(abstract_params):
    boxed = jax.tree.leaves(abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    unnamed = [x for x in boxed if not isinstance(x, nn.LogicallyPartitioned)]
    assert not unnamed, f"{len(unnamed)} parameters without logical axis names, e.g. {unnamed[:3]}"
    known = {name for name, _ in sharding.LOGICAL_RULES}
    for x in boxed:
        assert len(x.names) == len(x.value.shape)
        assert set(n for n in x.names if n is not None) <= known, x.names


def test_7b_parameters_shard_over_fsdp(abstract_params):
    """On an 8-way FSDP mesh every tensor of >= 1M elements is split; per-device bytes ~ total / 8."""
    mesh = sharding.make_mesh((1, -1, 1))
    assert mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract_params), mesh)
    shapes = _unboxed(abstract_params)
    total = per_device = 0
    for shape, shard in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)):
        n = math.prod(shape.shape)
        local = math.prod(shard.shard_shape(shape.shape))
        total, per_device = total + n, per_device + local
        if n >= 1_000_000:
            assert local * 8 == n, f"tensor {shape.shape} is not split 8 ways: {shard.spec}"
    assert per_device / total < 0.1301  # only small tensors (norms, biases) stay replicated
