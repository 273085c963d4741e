"""OFT+'s FiLM linears under LoRA and in the trainable masks: no adapters, trained in full (upstream
wraps the blocks after get_peft_model), the never-run last block's left out; sharding names mapped.
Shapes only (jax.eval_shape): nothing is compiled."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from vla_jax import sharding as shd
from vla_jax.models import lora
from vla_jax.models.config import get_preset
from vla_jax.models.openvla import OpenVLA
from vla_jax.training import state as st

CFG = dataclasses.replace(get_preset("tiny"), parallel_decoding=True, chunk_size=2, action_head="l1", film=True)


def _abstract():
    return jax.eval_shape(lambda: OpenVLA(CFG).init(jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.uint8),
                                                    np.ones((1, 4), np.int32)))["params"]


def test_film_params_are_fully_trained_beside_lora_except_the_last_block():
    boxed = _abstract()
    assert all(t.path[0] != "film" for t in lora.targets(nn.meta.unbox(boxed), lora.LoraConfig(rank=4)))
    combined = lora.add_lora(boxed, jax.random.PRNGKey(0), lora.LoraConfig(rank=4))
    for mask in (lora.trainable_mask(nn.meta.unbox(combined)),
                 st.trainable_mask(nn.meta.unbox(boxed), vision=False, projector=False, llm=False)):
        flat = traverse_util.flatten_dict(mask["film"])
        assert len(flat) == 16  # 2 towers x (blocks, last_block) x (scale, shift) x (kernel, bias)
        for path, trained in flat.items():
            assert trained == (path[1] == "blocks"), path
    assert st._model_modules(OpenVLA(CFG)) == ("action_head", "film")


def test_film_params_have_logical_names_the_rules_map():
    specs = nn.get_partition_spec(_abstract())["film"]
    kernel, last = specs["dino"]["blocks"]["scale"]["kernel"], specs["siglip"]["last_block"]["shift"]["kernel"]
    assert kernel == PartitionSpec("layers", "film_in", "film_out") and last == PartitionSpec("film_in", "film_out")
    mesh = nn.logical_to_mesh(specs, shd.LOGICAL_RULES)
    assert mesh["dino"]["blocks"]["scale"]["kernel"] == PartitionSpec(None, "fsdp", "tensor")
    assert mesh["dino"]["blocks"]["scale"]["bias"] == PartitionSpec(None, "tensor")
