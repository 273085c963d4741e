"""Device mesh, the one logical-axis rules table, and host-local -> global arrays.

Every parameter carries logical axis names (see vla_jax/models); `LOGICAL_RULES` maps them to
mesh axes. Changing the parallelism layout means editing this table (or passing another one
from the config), never the layers.
"""

from __future__ import annotations

import contextlib
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
    # OpenVLA-OFT's L1 action head (vla_jax.models.action_head): like the Llama MLP, the input side
    # of each matrix over fsdp and the head width over tensor.
    ("action_in", "fsdp"),
    ("action_embed", "fsdp"),
    ("action_hidden", "tensor"),
    ("action_out", None),
    # OpenVLA-OFT's proprio projector (vla_jax.models.proprio): the few state inputs replicated, the
    # LLM width like the action head's (input side over fsdp, output side over tensor).
    ("proprio_in", None),
    ("proprio_embed", "fsdp"),
    ("proprio_hidden", "tensor"),
    # OpenVLA-OFT+'s FiLM linears (vla_jax.models.film): the LLM width (input side) over fsdp, the tower
    # width (output side) over tensor, as the proprio projector's.
    ("film_in", "fsdp"),
    ("film_out", "tensor"),
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


def batch_sharding(mesh: Mesh, ndim: int, stacked: bool = False) -> NamedSharding:
    """Leading (batch) axis over the data-parallel axes, the rest replicated. stacked: the arrays
    carry a leading axis of consecutive steps' batches [n, B, ...]; axis 1 is the batch axis."""
    lead = (None,) if stacked else ()
    return NamedSharding(mesh, PartitionSpec(*lead, BATCH_AXES, *([None] * (ndim - 1 - len(lead)))))


def host_batch_to_global(batch: dict, mesh: Mesh, stacked: bool = False) -> dict:
    """Each process's share of the global batch (numpy) -> global jax.Arrays sharded over the batch
    axes (axis 1 when `stacked`, see `batch_sharding`)."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v), stacked), np.asarray(v))
            for k, v in batch.items()}


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules=LOGICAL_RULES, enabled: bool = True):
    """Makes `mesh` the current mesh and `rules` the logical-axis rules (what Flax's
    `nn.with_logical_constraint` needs to constrain activations). enabled=False: no-op."""
    if not enabled:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


class MeshBound:
    """A jitted function whose calls (and `.lower`) run inside `mesh_rules(mesh, rules)`.

    constrain_activations=False leaves the mesh unset while tracing: the activation constraints in
    the model become no-ops and XLA propagates shardings from the jit arguments alone.
    """

    def __init__(self, jitted, mesh: Mesh, rules=LOGICAL_RULES, constrain_activations: bool = True):
        self.jitted, self.mesh, self.rules = jitted, mesh, rules
        self.constrain_activations = constrain_activations

    def __call__(self, *args):
        with mesh_rules(self.mesh, self.rules, self.constrain_activations):
            return self.jitted(*args)

    def lower(self, *args):
        with mesh_rules(self.mesh, self.rules, self.constrain_activations):
            return self.jitted.lower(*args)


def process_batch_rows(mesh: Mesh, global_batch: int) -> Tuple[int, int]:
    """Rows [start, stop) of a global batch (sharded over the batch axes) that this process's devices
    hold, i.e. what it passes to `host_batch_to_global`. Raises if they are not one contiguous range."""
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((global_batch,))
    rows = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    covered = sum(b - a for a, b in rows)
    if covered != stop - start:
        raise ValueError(f"process {jax.process_index()} holds non-contiguous batch rows {rows}; "
                         f"order the mesh devices by process")
    return start, stop


def allgather_host_arrays(local: np.ndarray) -> list:
    """Every process's 1-D uint8 array (lengths may differ) -> the list of all of them, on every process."""
    local = np.asarray(local, np.uint8).ravel()
    if jax.process_count() == 1:
        return [local]
    from jax.experimental import multihost_utils

    sizes = np.asarray(multihost_utils.process_allgather(np.int32(local.size))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:local.size] = local
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [rows[i, :int(n)] for i, n in enumerate(sizes)]
