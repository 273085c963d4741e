"""Image ops of the pipeline against numpy re-implementations of their definitions: Lanczos-3
antialiased resize, TF's crop_and_resize bilinear sampling (the test-time center crop), and the
augmentation's parameters, order and independent random draws (OPENVLA_REFERENCE.md §5)."""

import numpy as np
import pytest
import tensorflow as tf

from vla_jax.data import transforms


def lanczos3_matrix(n_in, n_out):
    """Separable Lanczos-3 weights [n_out, n_in]: pixel centres at i + 0.5, kernel stretched by
    1/scale when downsampling (antialiasing), rows normalized to 1."""
    scale = n_out / n_in
    stretch = max(1.0, 1.0 / scale)
    x = ((np.arange(n_in)[None] + 0.5) - (np.arange(n_out)[:, None] + 0.5) / scale) / stretch
    w = np.where(np.abs(x) < 3, np.sinc(x) * np.sinc(x / 3), 0.0)
    return w / w.sum(1, keepdims=True)


def lanczos3_resize(img, size):
    wh, ww = lanczos3_matrix(img.shape[0], size), lanczos3_matrix(img.shape[1], size)
    out = np.einsum("ij,jkc->ikc", wh, img.astype(np.float64))
    out = np.einsum("ij,kjc->kic", ww, out)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def bilinear_crop_resize(img, box, out_h, out_w):
    """tf.image.crop_and_resize sampling: box (y1, x1, y2, x2) relative; corners map to corners."""
    h, w = img.shape[:2]
    y1, x1, y2, x2 = box
    ys = y1 * (h - 1) + np.arange(out_h) * (y2 - y1) * (h - 1) / (out_h - 1)
    xs = x1 * (w - 1) + np.arange(out_w) * (x2 - x1) * (w - 1) / (out_w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1i, x1i = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = img[y0][:, x0] * (1 - fx) + img[y0][:, x1i] * fx
    bot = img[y1i][:, x0] * (1 - fx) + img[y1i][:, x1i] * fx
    return top * (1 - fy) + bot * fy


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    # Smooth content plus noise: exercises both the kernel shape and the rounding.
    yy, xx = np.mgrid[0:64, 0:48]
    base = np.stack([yy * 3, xx * 4, (yy + xx) * 2], -1).astype(np.float64)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [224, 32, 20])
def test_resize_is_antialiased_lanczos3(image, size):
    got = np.asarray(transforms.resize_image(image, size))
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(np.int16) - lanczos3_resize(image, size))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # rounding ties only
    batched = np.asarray(transforms.resize_image(np.stack([image, image[::-1]]), size))
    np.testing.assert_array_equal(batched[0], got)


def test_center_crop_matches_bilinear_reference(image):
    got = np.asarray(transforms.center_crop(image))
    side = np.sqrt(0.9)
    off = (1 - side) / 2
    ref = bilinear_crop_resize(image.astype(np.float64) / 255.0, (off, off, off + side, off + side), 64, 48)
    ref = np.floor(np.clip(ref, 0, 1) * 255.5)  # convert_image_dtype(float -> uint8, saturate)
    assert got.shape == image.shape and got.dtype == np.uint8
    assert np.abs(got.astype(np.int16) - ref).max() <= 1
    np.testing.assert_array_equal(np.asarray(transforms.center_crop(image[None]))[0], got)


def test_augment_parameters_and_order_are_openvla():
    assert transforms.AUGMENT_ORDER == ("random_resized_crop", "random_brightness", "random_contrast",
                                        "random_saturation", "random_hue")
    assert transforms.OPENVLA_AUGMENT == {
        "random_resized_crop": {"scale": (0.9, 0.9), "ratio": (1.0, 1.0)},
        "random_brightness": (0.2,), "random_contrast": (0.8, 1.2),
        "random_saturation": (0.8, 1.2), "random_hue": (0.05,)}


def test_random_crop_draws_offsets_independently():
    """On a coordinate image, the output's corner pixels reveal the crop box. The crop side is
    sqrt(0.9); the vertical and horizontal offsets are uncorrelated (dlimp's single draw makes
    them equal)."""
    n = 64
    ramp = np.arange(n, dtype=np.float32) / (n - 1)
    coord = tf.constant(np.stack([np.repeat(ramp[:, None], n, 1), np.repeat(ramp[None], n, 0),
                                  np.zeros((n, n), np.float32)], -1))
    tops, lefts = [], []
    for s in range(300):
        out = transforms.random_resized_crop(coord, tf.constant([s, 7], tf.int64)).numpy()
        tops.append(out[0, 0, 0])
        lefts.append(out[0, 0, 1])
        np.testing.assert_allclose(out[-1, -1, :2] - out[0, 0, :2], np.sqrt(0.9), atol=1e-5)
    tops, lefts = np.array(tops), np.array(lefts)
    limit = 1 - np.sqrt(0.9)
    assert tops.min() >= 0 and tops.max() <= limit + 1e-6 and lefts.max() <= limit + 1e-6
    assert tops.max() - tops.min() > 0.8 * limit and lefts.max() - lefts.min() > 0.8 * limit
    assert abs(np.corrcoef(tops, lefts)[0, 1]) < 0.25  # 4 sigma for 300 independent draws


def test_augment_is_seeded_and_identity_params_keep_the_image(image):
    a = transforms.augment_image(image, tf.constant([1, 2])).numpy()
    b = transforms.augment_image(image, tf.constant([1, 2])).numpy()
    c = transforms.augment_image(image, tf.constant([1, 3])).numpy()
    assert a.shape == image.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    identity = {"random_resized_crop": {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}, "random_brightness": (0.0,),
                # TF rejects lower == upper; a 1e-6-wide range is the identity up to rounding.
                "random_contrast": (1.0, 1.000001), "random_saturation": (1.0, 1.000001), "random_hue": (0.0,)}
    same = transforms.augment_image(image, tf.constant([1, 2]), identity).numpy()
    assert np.abs(same.astype(np.int16) - image).max() <= 1


def test_brightness_is_one_uniform_delta_within_0_2():
    gray = np.full((8, 8, 3), 128, np.uint8)
    deltas = []
    for s in range(100):
        out = transforms.augment_image(gray, tf.constant([s, 0]), {"random_brightness": (0.2,)}).numpy()
        d = out.astype(np.int16) - 128
        assert (d == d.flat[0]).all()
        deltas.append(d.flat[0])
    assert min(deltas) >= -52 and max(deltas) <= 52 and max(deltas) - min(deltas) > 70


def test_frame_seeds_differ_by_frame_and_process():
    s = [tuple(transforms.frame_seed(0, p, i).numpy()) for p in (0, 1) for i in (0, 1)]
    assert len(set(s)) == 4
    assert tuple(transforms.frame_seed(0, 1, 1).numpy()) == s[3]


def test_crop_only_augmentation_shifts_but_keeps_colours():
    """image_aug_ops=('random_resized_crop',): a flat colour stays exactly that colour (no jitter),
    a gradient image moves (the crop), and the crop is the one the full recipe draws for that frame."""
    flat = tf.io.encode_png(np.full((64, 64, 3), (200, 40, 90), np.uint8))
    ramp = np.tile(np.arange(64, dtype=np.uint8)[None, :, None] * 4, (64, 1, 3))
    crop_only, full = ("random_resized_crop",), transforms.AUGMENT_ORDER
    for i in range(5):
        out = transforms.decode_resize_augment({"image": flat}, 64, True, 0, 0, tf.constant(i), crop_only)
        assert (out["image"].numpy() == (200, 40, 90)).all()
        changed = transforms.decode_resize_augment({"image": flat}, 64, True, 0, 0, tf.constant(i), full)
        assert (changed["image"].numpy() != (200, 40, 90)).any()
    ramp_png = tf.io.encode_png(ramp)
    out = transforms.decode_resize_augment({"image": ramp_png}, 64, True, 0, 0, tf.constant(3), crop_only)["image"]
    # Same seed for the crop as in the full recipe: op 0 of a 5-way split of the frame seed.
    seed = tf.random.experimental.stateless_split(tf.cast(transforms.frame_seed(0, 0, tf.constant(3)), tf.int64), 5)[0]
    want = transforms.random_resized_crop(tf.image.convert_image_dtype(ramp, tf.float32), seed, (0.9, 0.9), (1.0, 1.0))
    want = tf.image.convert_image_dtype(tf.clip_by_value(want, 0.0, 1.0), tf.uint8, saturate=True)
    np.testing.assert_array_equal(out.numpy(), want.numpy())
    assert not np.array_equal(out.numpy(), ramp)


def test_unknown_or_empty_augmentation_ops_are_named():
    with pytest.raises(ValueError, match=r"unknown \['blur'\].*random_resized_crop"):
        transforms.check_augment_ops(("random_resized_crop", "blur"))
    with pytest.raises(ValueError, match="empty"):
        transforms.check_augment_ops(())
    from vla_jax.data.pipeline import DataConfig

    assert DataConfig(image_aug_ops=["random_hue"]).image_aug_ops == ("random_hue",)
    with pytest.raises(ValueError, match="blur"):
        DataConfig(image_aug_ops=("blur",))
