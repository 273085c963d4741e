"""Counting the scalars of a parameter tree: read by training (parameter summaries), LoRA (adapter
size) and the HF importer (`describe`); here, below all three, so that none imports another for it."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax


def count_params(tree: Any) -> int:
    """Number of scalars in a tree (boxed or not, arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))
