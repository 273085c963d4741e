"""TPU chips and slice names: the vendor's published per-chip numbers, and user names -> topologies.

Per-chip figures, as published by Google Cloud (each generation's "System architecture" page):

| chip | JAX device_kind | bf16 peak   | HBM           | HBM bandwidth | source                                 |
|------|-----------------|-------------|---------------|---------------|----------------------------------------|
| v4   | TPU v4          | 275 TFLOP/s | 32 GiB (HBM2) | 1200 GB/s     | https://cloud.google.com/tpu/docs/v4   |
| v5e  | TPU v5 lite     | 197 TFLOP/s | 16 GB (HBM2)  | 819 GB/s      | https://cloud.google.com/tpu/docs/v5e  |
| v5p  | TPU v5          | 459 TFLOP/s | 95 GB (HBM2e) | 2765 GB/s     | https://cloud.google.com/tpu/docs/v5p  |
| v6e  | TPU v6 lite     | 918 TFLOP/s | 32 GB         | 1638 GB/s     | https://cloud.google.com/tpu/docs/v6e  |

GB is read as 10^9 bytes (where the vendor means GiB this under-states the chip: the plan errs on the
safe side); v4 is published in GiB. One JAX device is one chip: v4 and v5p run their two TensorCores
as one "megacore" device.

Slice names: v5e-N / v6e-N (also v5litepod-N) count chips; v4-N / v5p-N count TensorCores, i.e. N/2
chips. The physical topology strings (e.g. "v5p-128" -> "v5p:4x4x4", 64 chips) and wrap-around links
are those Cloud TPU documents for each slice shape. A raw topology string such as "v5e:2x2" is
accepted too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Dict, List, Optional, Tuple

GB = 1e9
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip (= one JAX device). peak_flops: dense bf16 FLOP/s; hbm_bytes; hbm_bandwidth: bytes/s."""

    name: str
    device_kind: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float
    source: str
    cores_per_name_unit: int  # TensorCores counted per chip in slice names (v4-8 = 4 chips)
    dims: int                 # 2D (v5e, v6e) or 3D (v4, v5p) torus
    chip_config: str          # libtpu's chip_config_name: 'megacore' fuses a chip's two cores


CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 275e12, 32 * GIB, 1200 * GB, "https://cloud.google.com/tpu/docs/v4", 2, 3,
               "megacore"),
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 16 * GB, 819 * GB, "https://cloud.google.com/tpu/docs/v5e", 1, 2,
                "default"),
    "v5p": Chip("v5p", "TPU v5", 459e12, 95 * GB, 2765 * GB, "https://cloud.google.com/tpu/docs/v5p", 2, 3,
                "megacore"),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 32 * GB, 1638 * GB, "https://cloud.google.com/tpu/docs/v6e", 1, 2,
                "default"),
}

# Chips -> physical shape of the slice (the shapes Cloud TPU offers for each chip count).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: `name` as the user gave it, `topology` the libtpu string ("v5p:4x4x4")."""

    name: str
    chip: Chip
    shape: Tuple[int, ...]
    wrap: Tuple[bool, ...]

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def topology(self) -> str:
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def host_bounds(self) -> Tuple[int, int, int]:
        """Chips per host (what libtpu needs to lay out a slice smaller than a host)."""
        return (1, 1, 1) if self.num_chips == 1 else (2, 2, 1)


def known_names() -> List[str]:
    """Every slice name this module maps (e.g. 'v5e-16', 'v5p-128')."""
    names = []
    for chip in CHIPS.values():
        table = _SHAPES_2D if chip.dims == 2 else _SHAPES_3D
        names += [f"{chip.name}-{n * chip.cores_per_name_unit}" for n in sorted(table)]
    return names


def _wrap(chip: Chip, shape: Tuple[int, ...]) -> Tuple[bool, ...]:
    # Wrap-around (torus) links exist along a dimension of a full ring: 16 chips on v5e/v6e, and on
    # v4/v5p in slices whose every dimension is a multiple of 4 (Cloud TPU's "3D torus" slices).
    if chip.dims == 2:
        return tuple(s == 16 for s in shape) + (False,)
    full = all(s % 4 == 0 for s in shape)
    return tuple(full for _ in shape)


def parse(name: str) -> Topology:
    """'v5p-128' | 'v5e-16' | 'v5litepod-4' | 'v5e:2x2' | 'v4:2x2x1' -> Topology; ValueError listing the
    known names otherwise."""
    text = name.strip().lower()
    known = ", ".join(known_names())
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if m:
        gen, count = _ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
        chip = CHIPS.get(gen)
        table = None if chip is None else (_SHAPES_2D if chip.dims == 2 else _SHAPES_3D)
        if chip is None or count % chip.cores_per_name_unit or count // chip.cores_per_name_unit not in table:
            raise ValueError(f"unknown TPU topology {name!r}; known: {known} (or a libtpu topology string such as "
                             f"'v5e:2x2' or 'v5p:4x4x8')")
        shape = table[count // chip.cores_per_name_unit]
        return Topology(name, chip, shape, _wrap(chip, shape))
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    if m:
        gen = _ALIASES.get(m.group(1), m.group(1))
        chip = CHIPS.get(gen)
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if chip is not None and len(shape) == chip.dims and all(s > 0 for s in shape):
            return Topology(name, chip, shape, _wrap(chip, shape))
        if chip is not None:
            raise ValueError(f"TPU topology {name!r}: {chip.name} slices are {chip.dims}-D "
                             f"({'AxB' if chip.dims == 2 else 'AxBxC'}), got {m.group(2)!r}")
    raise ValueError(f"unknown TPU topology {name!r}; known: {known} (or a libtpu topology string such as "
                     f"'v5e:2x2' or 'v5p:4x4x8')")


def chip_for_device_kind(device_kind: str) -> Optional[Chip]:
    """The chip whose JAX device_kind is `device_kind` (exact match), or None (e.g. CPU)."""
    for chip in CHIPS.values():
        if chip.device_kind == device_kind:
            return chip
    return None


LIBTPU_HELP = ("compiling for a TPU topology needs the TPU compiler: install the `libtpu` package next to jax "
               "(`pip install \"libtpu==0.0.42.*\"` for jax 0.10.2, the version requirements-dev.txt pins); no TPU "
               "is needed")


def libtpu_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("libtpu") is not None
    except (ImportError, ValueError):
        return False


def devices(topology: Topology):
    """The compile-only TPU devices of `topology` (libtpu's compiler; nothing is allocated).
    RuntimeError naming the package when libtpu is not installed."""
    if not libtpu_installed():
        raise RuntimeError(LIBTPU_HELP)
    # libtpu takes a host-wide lock file when it loads (one process per TPU host); compiling needs no
    # TPU, so let several planning processes (or a test run beside a plan) load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology.topology, platform="tpu",
                                            chip_config_name=topology.chip.chip_config,
                                            chips_per_host_bounds=topology.host_bounds, num_slices=1,
                                            wrap=topology.wrap)
    except Exception as e:  # libtpu present but refused: say what we asked for
        raise RuntimeError(f"libtpu could not describe topology {topology.topology} ({topology.name}): {e}") from e
    devs = list(desc.devices)
    if len(devs) != topology.num_chips or devs[0].device_kind != topology.chip.device_kind:
        raise RuntimeError(f"libtpu described {topology.topology} as {len(devs)} x {devs[0].device_kind!r}; "
                           f"expected {topology.num_chips} x {topology.chip.device_kind!r}")
    return devs
