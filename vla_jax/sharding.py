"""Device mesh, the one logical-axis rules table, and host-local -> global arrays.

Every parameter carries logical axis names (see vla_jax/models); `LOGICAL_RULES` maps them to
mesh axes. Changing the parallelism layout means editing this table (or passing another one
from the config), never the layers.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes, or None = replicated). Weights are sharded over `fsdp` on
# their model-width axis (ZeRO-3 style) and over `tensor` on heads/MLP/vocab; activations are
# sharded over the batch axes only.
LOGICAL_RULES: Tuple[Tuple[str, object], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vision_in", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)

BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
    """Replaces one -1 in `shape` (ordered as MESH_AXES) by what is left of `num_devices`."""
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape must give {len(MESH_AXES)} sizes for axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} ({math.prod(shape)} devices) != {num_devices} available devices")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axes ("data", "fsdp", "tensor").

    Built with `jax.sharding.Mesh`: in jax 0.10 `jax.make_mesh` defaults to Explicit axes, under
    which FSDP matmuls fail to shard-propagate.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, ValueError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_specs, mesh: Mesh, rules=LOGICAL_RULES):
    """A pytree of logical PartitionSpecs (from `nn.get_partition_spec`) -> NamedShardings."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), mesh_specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def host_batch_to_global(batch: dict, mesh: Mesh) -> dict:
    """Each process's share of the global batch (numpy) -> global jax.Arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
            for k, v in batch.items()}
