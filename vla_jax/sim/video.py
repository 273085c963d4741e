"""Rollout videos as animated GIFs (PIL, no video codec needed)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def write_gif(path: str, frames: Sequence[np.ndarray], fps: int = 20, min_size: int = 128) -> str:
    """frames: uint8 [H, W, 3] each (at least one); small frames are enlarged by an integer factor
    (nearest neighbour) to at least `min_size` pixels so that they can be watched. Returns `path`."""
    from PIL import Image

    if len(frames) == 0:
        raise ValueError(f"write_gif({path!r}): no frames")
    first = np.asarray(frames[0])
    if first.ndim != 3 or first.shape[-1] != 3 or first.dtype != np.uint8:
        raise ValueError(f"write_gif: frames must be uint8 [H, W, 3], got {first.dtype} {first.shape}")
    k = max(1, -(-int(min_size) // min(first.shape[:2])))
    images = [Image.fromarray(np.repeat(np.repeat(np.asarray(f), k, 0), k, 1)) for f in frames]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return path
