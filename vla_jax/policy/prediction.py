"""`Prediction`: what `Policy.predict` returns (tokens, normalized and raw actions per row), and the
per-row argument helper of `Policy.predict`."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prediction:
    """What `Policy.predict` returns for B rows (n: the largest action dim among the rows' statistics,
    the number of tokens decoded; d_i: row i's own, n for every row with one dataset).

    tokens      int32 [B, n]     greedy token ids
    normalized  float64 [B, n]   their bin centres in [-1, 1] (the gripper in OpenVLA's convention)
    rows        B float64 [d_i]  raw actions: the first d_i values un-normalized with row i's
                                 statistics, the gripper in the convention asked for that row
    unnorm_keys B dataset keys   the statistics each row was un-normalized with

    Parallel-decoding (OpenVLA-OFT) checkpoints predict a chunk of K actions per row, so every array
    gains a K axis: tokens int32 [B, K, D] (head 'tokens'; None for head 'l1', which has no tokens),
    normalized float64 [B, K, D] (bin centres, or the L1 head's output), rows B float64 [K, D],
    `actions` [B, K, D]. A parallel model with K = 1 returns chunks of one action ([B, 1, D]): the
    shape follows the decoding, not K, so callers of chunked models need no special case.
    """

    tokens: Optional[np.ndarray]
    normalized: np.ndarray
    rows: Tuple[np.ndarray, ...]
    unnorm_keys: Tuple[str, ...]

    @property
    def actions(self) -> np.ndarray:
        """float64 [B, D] ([B, K, D] for parallel-decoding models): the rows stacked; ValueError when the rows' datasets have different action dims."""
        dims = sorted({r.shape[-1] for r in self.rows})
        if len(dims) > 1:
            raise ValueError(f"the rows have action dims {dims} (keys {sorted(set(self.unnorm_keys))}); read "
                             f"Prediction.rows instead of .actions")
        return np.stack(self.rows)


def _per_row(value, b: int, name: str) -> List[Any]:
    """One value for every row, or a sequence of b values -> list of b values."""
    if value is None or isinstance(value, str):
        return [value] * b
    values = list(value)
    if len(values) != b:
        raise ValueError(f"{b} images but {len(values)} values of {name}")
    return values
