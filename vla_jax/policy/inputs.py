"""The policy's image input: checked uint8 RGB frames -> the model's uint8 [B, S, S, 3], exactly as training saw them.

Resize is the training pipeline's lanczos3 antialiased squash (`vla_jax.data.transforms.resize_image`),
then, when the checkpoint's BatchSpec says `test_center_crop`, the centered 0.9-area crop
(`transforms.center_crop`), as OpenVLA's eval scripts do. TensorFlow is imported only when an image
actually needs resizing.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np


def check_image(image, index: int = 0, camera: Optional[str] = None) -> np.ndarray:
    """PIL image or uint8 [H, W, 3] array -> uint8 [H, W, 3]; ValueError naming the image (and its camera,
    when given) otherwise."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    what = f"image {index}" if camera is None else f"camera {camera!r} image {index}"
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{what}: expected an RGB image of shape [H, W, 3], got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8 (raw RGB 0..255), got {a.dtype}")
    if min(a.shape[:2]) < 1:
        raise ValueError(f"{what}: empty image of shape {a.shape}")
    return a


def tf_image_fn(size: int, crop: bool) -> Callable:
    """The training pipeline's resize (+ test-time crop) as one traced TF graph: same ops and results
    as calling them eagerly, without per-op dispatch cost on every request.
    uint8 [B, H, W, 3] -> uint8 [B, size, size, 3]."""
    import tensorflow as tf  # imported only when images are processed

    from vla_jax.data import transforms

    def fn(batch):
        out = transforms.resize_image(batch, size)
        return transforms.center_crop(out) if crop else out

    return tf.function(fn, reduce_retracing=True)


def preprocess(images: Sequence, size: int, crop: bool, image_fn: Callable[[], Callable],
               camera: Optional[str] = None) -> np.ndarray:
    """B images (list or uint8 [B, H, W, 3]) -> uint8 [B, size, size, 3]; image_fn() gives the TF function
    (built on first use), called once per distinct input image size; camera: its name, for errors."""
    imgs = [check_image(im, i, camera) for i, im in enumerate(images)]
    if not imgs:
        raise ValueError("no images given")
    out = np.empty((len(imgs), size, size, 3), np.uint8)
    by_shape: Dict[tuple, List[int]] = {}
    for i, im in enumerate(imgs):
        by_shape.setdefault(im.shape, []).append(i)
    for shape, rows in by_shape.items():  # one call per image size
        if shape[:2] == (size, size) and not crop:
            # lanczos3 at scale 1 samples its kernel at integer offsets only (1 at 0, 0 elsewhere):
            # TF returns the image unchanged, so skip the ~2 ms TF call (tests/policy/test_policy_fast_resize.py).
            out[rows] = np.stack([imgs[i] for i in rows])
        else:
            out[rows] = np.asarray(image_fn()(np.stack([imgs[i] for i in rows])))
    return out
