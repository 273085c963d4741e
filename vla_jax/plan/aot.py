"""Compiling a lowered program ahead of time, and reading a TPU compile that does not fit.

The TPU compiler assigns every buffer to HBM at compile time; when they do not fit it refuses the
program with a RESOURCE_EXHAUSTED error instead of returning it (libtpu 0.0.42.1, seen on this
machine: "Ran out of memory on HBM, the total memory required for HLO temporaries (36.00G) exceeds
available HBM (15.75G)." for a v5e chip; the figure covers arguments and outputs too), so there is
no `memory_analysis()` to read. A refusal worded otherwise is not recognised and propagates. A plan must still answer "does it fit, and by how much not":
`compile_or_oom` turns that refusal into the compiler's own figures (bytes needed, the capacity it
compiled against, the excess; its 'G' is GiB) and lets every other error through.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional, Tuple

_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_NUM = r"([0-9.]+)\s*([KMGT]?)i?B?"
_REQUIRED = re.compile(r"memory required for .*?\(" + _NUM + r"\)\s+exceeds available HBM\s+\(" + _NUM + r"\)",
                       re.IGNORECASE)


def _bytes(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit.upper()]


def parse_hbm_oom(message: str) -> Optional[Dict[str, Any]]:
    """The TPU compiler's out-of-HBM message -> {'needed_bytes', 'capacity_bytes', 'over_bytes', 'message'}
    (its units are binary: 'G' = GiB), or None when `message` is not one."""
    found = _REQUIRED.search(message)
    if found is None:
        return None
    needed, capacity = _bytes(*found.group(1, 2)), _bytes(*found.group(3, 4))
    first = next((line.strip() for line in message.splitlines() if "hbm" in line.lower()), message[:300])
    return {"needed_bytes": needed, "capacity_bytes": capacity, "over_bytes": needed - capacity, "message": first}


def compile_or_oom(lowered) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """-> (compiled, None), or (None, parse_hbm_oom(...)) when the TPU compiler refused the program for
    lack of HBM. Any other compile error propagates."""
    try:
        return lowered.compile(), None
    except Exception as e:  # XlaRuntimeError (RESOURCE_EXHAUSTED) from libtpu; other errors re-raised
        oom = parse_hbm_oom(str(e))
        if oom is None:
            raise
        return None, oom
