"""Each augmentation op of data/transforms.py against an independent float64 reference, op by op and
composed in OpenVLA's order, with the per-op seeds of the recipe (OPENVLA_REFERENCE.md §5).

The reference does its own image arithmetic: numpy for the crop (bilinear crop_and_resize sampling),
brightness (x + delta) and contrast ((x - mean) * f + mean, mean per channel over the image), and the
standard library's `colorsys` HSV for saturation (s * f, clipped to 1) and hue (h + delta, wrapped).
Only the random draws come from TensorFlow's stateless generator, seeded as the recipe documents:
the frame seed split 5 ways (op i of AUGMENT_ORDER takes part i, whether or not the others run), each
op drawing its parameter uniformly from its range; the crop splits its part 4 ways (area, ratio,
top, left). Each op is followed by a clip to [0, 1]; the result is converted to uint8 by
floor(255.5 x) (convert_image_dtype with saturation).
"""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from tests.data.test_data_transforms import bilinear_crop_resize
from vla_jax.data import transforms

ORDER = ("random_resized_crop", "random_brightness", "random_contrast", "random_saturation", "random_hue")
CROP_SIDE = np.sqrt(0.9)  # scale (0.9, 0.9), ratio (1, 1): a square crop of 0.9 of the area


def _uniform(seed, lo, hi) -> float:
    return float(tf.random.stateless_uniform([], seed, lo, hi).numpy())


def draws(seed):
    """The recipe's random parameters for one frame seed int [2]."""
    parts = tf.random.experimental.stateless_split(tf.cast(tf.constant(seed), tf.int64), num=5)
    crop = tf.random.experimental.stateless_split(parts[0], num=4)
    return {
        "random_resized_crop": (_uniform(crop[2], 0.0, 1.0) * (1 - CROP_SIDE), _uniform(crop[3], 0.0, 1.0) * (1 - CROP_SIDE)),
        "random_brightness": _uniform(parts[1], -0.2, 0.2),
        "random_contrast": _uniform(parts[2], 0.8, 1.2),
        "random_saturation": _uniform(parts[3], 0.8, 1.2),
        "random_hue": _uniform(parts[4], -0.05, 0.05),
    }


def _hsv_map(x, fn):
    flat = x.reshape(-1, 3)
    out = np.array([colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*px))) for px in flat])
    return out.reshape(x.shape)


def apply_op(op, x, p):
    """One op on a float64 image [H, W, 3] in [0, 1], then the clip."""
    if op == "random_resized_crop":
        top, left = p
        y = bilinear_crop_resize(x, (top, left, top + CROP_SIDE, left + CROP_SIDE), x.shape[0], x.shape[1])
    elif op == "random_brightness":
        y = x + p
    elif op == "random_contrast":
        mean = x.mean(axis=(0, 1), keepdims=True)
        y = (x - mean) * p + mean
    elif op == "random_saturation":
        y = _hsv_map(x, lambda h, s, v: (h, min(s * p, 1.0), v))
    elif op == "random_hue":
        y = _hsv_map(x, lambda h, s, v: ((h + p) % 1.0, s, v))
    else:
        raise AssertionError(op)
    return np.clip(y, 0.0, 1.0)


def reference(image_u8, seed, ops=ORDER, order=ORDER):
    """The recipe in float64: `ops` applied in `order`, each with its recipe draw."""
    p = draws(seed)
    x = image_u8.astype(np.float64) / 255.0
    for op in order:
        if op in ops:
            x = apply_op(op, x, p[op])
    return np.floor(x * 255.5).astype(np.uint8)


def _close(a, b, max_diff=1, max_frac=0.02):
    """uint8 images equal up to float32-vs-float64 rounding: no pixel more than 1 level apart, few apart."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return d.max() <= max_diff and (d > 0).mean() <= max_frac


@pytest.fixture(scope="module")
def image():
    """A colourful 32x32 image: hue sweeping across, saturation and value varying, plus noise, so
    every op changes many pixels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    hsv = np.stack([xx, 0.3 + 0.6 * yy, 0.35 + 0.5 * (1 - yy * xx)], -1)
    rgb = np.array([colorsys.hsv_to_rgb(*px) for px in hsv.reshape(-1, 3)]).reshape(32, 32, 3)
    return np.clip(rgb * 255 + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)


SEEDS = [(1, 2), (7, 0), (123, 456)]


@pytest.mark.parametrize("op", ORDER)
def test_each_op_alone_matches_the_reference(image, op):
    """Op by op, with the seed the op has in the full recipe (part i of the 5-way split)."""
    for seed in SEEDS:
        got = transforms.augment_image(image, tf.constant(seed), {op: transforms.OPENVLA_AUGMENT[op]}).numpy()
        want = reference(image, seed, ops=(op,))
        assert _close(got, want), (op, seed, np.abs(got.astype(int) - want).max())
        # The op does something at this seed (so the comparison means something).
        assert np.abs(want.astype(int) - image).max() >= 3, (op, seed)


def test_the_recipe_matches_the_reference_and_each_op_is_needed(image):
    """All five ops in OpenVLA's order. For each seed the reference without any one op, or with two
    non-commuting ops swapped, is far from the output: skipping or reordering an op fails this test."""
    for seed in SEEDS:
        got = transforms.augment_image(image, tf.constant(seed)).numpy()
        assert _close(got, reference(image, seed)), (seed, np.abs(got.astype(int) - reference(image, seed)).max())
        for skipped in ORDER:
            partial = reference(image, seed, ops=tuple(o for o in ORDER if o != skipped))
            assert not _close(got, partial, max_diff=2, max_frac=0.2), f"seed {seed}: skipping {skipped} undetectable"
        # Pairs that do not commute (crop, brightness and contrast commute with each other up to the
        # clips; saturation and hue commute exactly; brightness and hue commute up to the clips).
        for a, b in (("random_contrast", "random_saturation"), ("random_brightness", "random_saturation"),
                     ("random_contrast", "random_hue")):
            swapped = tuple(b if o == a else a if o == b else o for o in ORDER)
            assert not _close(got, reference(image, seed, order=swapped), max_diff=1, max_frac=0.05), \
                f"seed {seed}: order {swapped} undetectable"


def test_ops_subset_keeps_each_ops_recipe_seed(image):
    """image_aug_ops: a subset runs each of its ops with the seed that op has in the full recipe."""
    for ops in (("random_contrast", "random_hue"), ("random_resized_crop", "random_saturation")):
        seed = (5, 9)
        got = transforms.augment_image(image, tf.constant(seed), {op: transforms.OPENVLA_AUGMENT[op] for op in ops}).numpy()
        assert _close(got, reference(image, seed, ops=ops)), ops


def test_pipeline_frame_uses_its_frame_seed(image):
    """decode_resize_augment (what the pipeline maps over frames) = the recipe with the frame's seed:
    stateless fold-in of the stream position (int64) into (base seed, process index)."""
    png = tf.io.encode_png(image)
    for base, proc, idx in ((0, 0, 3), (42, 1, 17)):
        out = transforms.decode_resize_augment({"image": png}, 32, True, base, proc, tf.constant(idx))["image"].numpy()
        seed = tf.random.experimental.stateless_fold_in(tf.constant([base, proc], tf.int64),
                                                            tf.constant(idx, tf.int64)).numpy()
        resized = np.asarray(transforms.resize_image(image, 32))
        assert _close(out, reference(resized, seed)), (base, proc, idx)
