"""Policy preprocessing == what training fed the model (real Bridge frames through the training
pipeline), and the test-time center crop follows the checkpoint's recorded augmentation setting."""

import numpy as np
import pytest

from tests.policy.test_policy_helpers import (IMAGE_SIZE, cached_policy, model_config, random_checkpoint, random_images,
                                      random_params, stats_entry, write_checkpoint)


@pytest.fixture(scope="module")
def policy(llama_tokenizer_path):
    return cached_policy(str(llama_tokenizer_path))


def test_preprocess_matches_training_pipeline_frames(policy, bridge_data_dir):
    from vla_jax.data import pipeline
    from vla_jax.data.normalization import normalize_actions
    from vla_jax.evaluation.episodes import iter_episodes

    cfg = pipeline.DataConfig(data_dir=str(bridge_data_dir), mixture="bridge_dataset", split="val", batch_size=8,
                              resize_size=IMAGE_SIZE, shuffle_buffer=0, repeat=False, image_aug=False, threads=1)
    ds, stats = pipeline.make_dataset(cfg)
    batch = next(ds.as_numpy_iterator())
    ep = next(iter_episodes(str(bridge_data_dir), "bridge_dataset", "val", max_episodes=1))
    assert len(ep) == 8 and ep.images.shape[1:] == (64, 64, 3)
    # Same frames in the same order (checked on the actions), then the images must be identical.
    np.testing.assert_allclose(batch["action"], normalize_actions(ep.actions, stats["bridge_dataset"]), atol=1e-6)
    np.testing.assert_array_equal(policy.preprocess(ep.images), batch["image"])
    np.testing.assert_array_equal(policy.preprocess(list(ep.images[:3])), batch["image"][:3])


def _numpy_center_crop(img: np.ndarray, area: float = 0.9) -> np.ndarray:
    """Bilinear crop-and-resize of the centered square of side sqrt(area), sampled at the corners'
    convention of tf.image.crop_and_resize, written out in numpy."""
    h, w, _ = img.shape
    side = np.sqrt(area)
    off = (1 - side) / 2
    x = img.astype(np.float64) / 255.0

    def coords(n):
        pos = off * (n - 1) + np.arange(n) * side * (n - 1) / (n - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n - 1), pos - lo

    y0, y1, fy = coords(h)
    x0, x1, fx = coords(w)
    top = x[y0][:, x0] * (1 - fx)[None, :, None] + x[y0][:, x1] * fx[None, :, None]
    bot = x[y1][:, x0] * (1 - fx)[None, :, None] + x[y1][:, x1] * fx[None, :, None]
    out = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
    return np.clip(out * 255.0, 0, 255)


def test_center_crop_follows_the_checkpoint(llama_tokenizer_path, policy):
    from vla_jax.data.transforms import resize_image
    from vla_jax.policy import Policy

    aug_ckpt = random_checkpoint(str(llama_tokenizer_path), image_aug=True)
    cropped = Policy.load(aug_ckpt, compilation_cache=False)
    assert cropped.center_crop and not policy.center_crop
    assert not Policy.load(aug_ckpt, center_crop=False, compilation_cache=False).center_crop
    img = random_images(1, seed=7, size=80)[0]
    resized = np.asarray(resize_image(img, IMAGE_SIZE))
    np.testing.assert_array_equal(policy.preprocess([img])[0], resized)
    got = cropped.preprocess([img])[0].astype(np.float64)
    want = _numpy_center_crop(resized)
    assert np.abs(got - want).max() <= 1.0  # uint8 rounding of the float result
    assert np.abs(got - resized).mean() > 10  # the crop really zooms in (random pixels change)


def test_center_crop_only_when_the_random_crop_was_trained(llama_tokenizer_path, tmp_path):
    """data.image_aug_ops: colour ops alone need no test-time crop; with the random crop they do."""
    from vla_jax.policy import Policy

    cfg = model_config()
    stats = {"bridge_dataset": stats_entry(0.01)}
    for ops, want in ((["random_brightness", "random_hue"], False), (["random_resized_crop"], True)):
        d = write_checkpoint(str(tmp_path / ops[0]), cfg, random_params(cfg), stats, str(llama_tokenizer_path),
                             image_aug=True, image_aug_ops=ops)
        assert Policy.load(d, compilation_cache=False).center_crop is want, ops


def test_pil_images_are_accepted(policy):
    from PIL import Image

    img = random_images(1, seed=8)[0]
    np.testing.assert_array_equal(policy.preprocess([Image.fromarray(img)]), policy.preprocess([img]))
    rgba = Image.fromarray(np.concatenate([img, np.full((64, 64, 1), 255, np.uint8)], -1), "RGBA")
    np.testing.assert_array_equal(policy.preprocess([rgba]), policy.preprocess([img]))
