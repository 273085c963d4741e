"""Geometry presets and mesh construction."""

import dataclasses

import jax
import pytest
from jax.sharding import AxisType

from vla_jax import sharding
from vla_jax.models.config import PRESETS, get_preset


def test_eight_simulated_devices():
    assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"


def test_mesh_axes_are_auto_and_sized_from_config():
    mesh = sharding.make_mesh((2, -1, 1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape, message", [((3, -1, 1), "does not divide 8"), ((2, 2, 1), "4 devices"),
                                            ((-1, -1, 1), "at most one"), ((8, 1), "3 sizes")])
def test_bad_mesh_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(shape, 8)


def test_presets():
    assert {"openvla-7b", "tiny", "debug", "mid"} <= set(PRESETS)
    big = get_preset("openvla-7b")
    assert (big.vision_dim, big.num_patches, big.llama.head_dim, big.siglip.head_dim) == (2176, 256, 128, 72)
    with pytest.raises(ValueError, match="known presets"):
        get_preset("openvla-13b")
    with pytest.raises(ValueError, match="same image size"):
        dataclasses.replace(big, siglip=dataclasses.replace(big.siglip, image_size=384))
