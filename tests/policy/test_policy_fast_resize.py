"""Policy.preprocess skips TensorFlow for images already at the model's size (vla_jax/policy/predict.py); this
checks against TF itself that the skipped lanczos3 resize is the identity there, bit for bit."""

import numpy as np
import pytest

from vla_jax.data import transforms


@pytest.mark.parametrize("size", [16, 112, 224])
def test_lanczos3_resize_at_the_same_size_is_the_identity(size):
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    images[0, : size // 2] = 255  # hard edges and saturated values, where ringing would show
    images[0, size // 2:] = 0
    out = np.asarray(transforms.resize_image(images, size))
    np.testing.assert_array_equal(out, images)
