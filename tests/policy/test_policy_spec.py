"""Policy reads the contract from the checkpoint (vla_jax.spec.BatchSpec, the `batch_spec` asset): the test-time
crop, image size and action codec follow the asset, not the run config; checkpoints without it get the spec
derived as before; a codec the policy cannot run is refused before any weight is read. `Policy.predict` with
per-row statistics keys and gripper conventions against OpenVLA's formulas written out in the test helpers."""

import copy

import numpy as np
import pytest

from tests.policy.test_policy_helpers import (IMAGE_SIZE, cached_policy, model_config, openvla_unnormalize, random_images,
                                      random_params, stats_entry, write_checkpoint)

INSTRUCTIONS = ["put carrot on plate", "open the drawer", "stack the cups"]


@pytest.fixture(scope="module")
def cfg_params():
    cfg = model_config()
    return cfg, random_params(cfg)


def _write(tmp_path, name, cfg_params, tok, **kw):
    cfg, params = cfg_params
    return write_checkpoint(str(tmp_path / name), cfg, params, {"bridge_dataset": stats_entry(0.01)}, str(tok), **kw)


def _spec(cfg, **kw):
    from vla_jax.spec import BatchSpec

    return BatchSpec.for_model(cfg, text_len=40, **kw)


def test_batch_spec_asset_decides_the_test_time_crop(llama_tokenizer_path, cfg_params, tmp_path):
    """Each checkpoint's run config implies the opposite crop of its batch_spec: the batch_spec wins."""
    from vla_jax.data.transforms import center_crop, resize_image
    from vla_jax.policy import Policy

    cfg = cfg_params[0]
    crop = _write(tmp_path, "crop", cfg_params, llama_tokenizer_path, image_aug=False,
                  batch_spec=_spec(cfg, test_center_crop=True))
    no_crop = _write(tmp_path, "no_crop", cfg_params, llama_tokenizer_path, image_aug=True,
                     image_aug_ops=["random_resized_crop"], batch_spec=_spec(cfg, test_center_crop=False))
    cropped, plain = Policy.load(crop, compilation_cache=False), Policy.load(no_crop, compilation_cache=False)
    assert cropped.center_crop is True and cropped.spec.test_center_crop is True
    assert plain.center_crop is False and plain.spec.test_center_crop is False
    assert Policy.load(crop, center_crop=False, compilation_cache=False).center_crop is False  # explicit wins
    img = random_images(1, seed=5, size=80)[0]
    resized = resize_image(img, IMAGE_SIZE)
    np.testing.assert_array_equal(cropped.preprocess([img])[0], np.asarray(center_crop(resized)))
    np.testing.assert_array_equal(plain.preprocess([img])[0], np.asarray(resized))


def test_checkpoint_without_the_asset_gets_the_derived_spec(llama_tokenizer_path):
    """An older checkpoint (no batch_spec asset): the debug geometry at 56 px, OpenVLA's codec, tokenizer length 40."""
    from vla_jax.spec import ActionCodec

    policy = cached_policy(str(llama_tokenizer_path))
    assert (policy.spec.image_size, policy.spec.text_len, policy.spec.cameras) == (56, 40, ("primary",))
    assert policy.codec == ActionCodec(action_dim=7, n_bins=256, base_vocab_size=32000, chunk_size=1,
                                       decoding="autoregressive", head="tokens")
    assert policy.spec.test_center_crop is False and policy.spec.proprio_dim is None


def test_derived_spec_crops_only_after_the_random_crop(llama_tokenizer_path):
    """The one fallback: run config with the random resized crop -> crop; colour ops, no run config (HF) -> none."""
    from vla_jax.policy.loading import derive_batch_spec
    from vla_jax.tokenizer import VLATokenizer

    cfg, tok = model_config(), VLATokenizer.from_file(str(llama_tokenizer_path))
    stats = {"a": stats_entry(0.01), "b": stats_entry(0.02)}
    for run_config, want in ((None, False), ({"data": {"image_aug": True}}, True),
                             ({"data": {"image_aug": True, "image_aug_ops": ["random_hue"]}}, False),
                             ({"data": {"image_aug": False, "image_aug_ops": ["random_resized_crop"]}}, False)):
        spec = derive_batch_spec(cfg, tok, stats, run_config)
        assert spec.test_center_crop is want, run_config
        assert (spec.num_datasets, spec.text_len, spec.image_size) == (2, 64, 56)


@pytest.mark.parametrize("kw, match", [
    # a parallel (OFT) codec on an autoregressive model: the batch_spec and the model disagree
    (dict(decoding="parallel"), r"decoding='parallel'.*but the model config has parallel_decoding=False"),
    (dict(image_size=224), r"image_size=224, n_bins=256, base_vocab_size=32000 do not match the model config "
                           r"\(56, 256, 32000\)"),
    (dict(cameras=("primary", "wrist")), r"cameras=\['primary', 'wrist'\].*model config has num_images=1, "
                                         r"proprio_dim=None"),
    (dict(proprio_dim=4), r"proprio_dim=4, but the model config has num_images=1, proprio_dim=None"),
])
def test_a_spec_the_policy_cannot_run_is_refused(llama_tokenizer_path, cfg_params, tmp_path, monkeypatch, kw, match):
    import dataclasses

    from vla_jax import checkpoints
    from vla_jax.policy import Policy
    from vla_jax.spec import ActionCodec

    spec = _spec(cfg_params[0])
    if "decoding" in kw:
        spec = dataclasses.replace(spec, codec=ActionCodec(decoding=kw["decoding"]))
    else:
        spec = dataclasses.replace(spec, **kw)
    d = _write(tmp_path, "bad", cfg_params, llama_tokenizer_path, batch_spec=spec)
    read = []
    monkeypatch.setattr(checkpoints, "load_params", lambda *a, **k: read.append(a))
    with pytest.raises(ValueError, match=match) as e:
        Policy.load(d, compilation_cache=False)
    assert "batch_spec" in str(e.value) and read == []  # named, and refused before any weight was read


def test_predict_rows_with_their_own_statistics_and_gripper(llama_tokenizer_path):
    """Per-row unnorm keys (one with 6-D statistics) and gripper conventions in one call == OpenVLA's formulas
    applied row by row to the same tokens."""
    policy = cached_policy(str(llama_tokenizer_path))
    multi = copy.copy(policy)  # shares the compiled decoders
    six = copy.deepcopy(stats_entry(0.03))
    six["action"] = {k: v[:6] for k, v in six["action"].items()}
    multi.norm_stats = {"bridge_dataset": stats_entry(0.01), "inverted": stats_entry(0.05), "six": six}
    multi.dataset_configs = {"inverted": {"name": "inverted", "standardize": "generic_eef_pos",
                                          "gripper": "absolute_inverted"}}
    images = random_images(3, seed=11)
    keys, grippers = ["inverted", "six", "inverted"], ["dataset", "openvla", "openvla"]
    pred = multi.predict(images, INSTRUCTIONS, keys, grippers)
    tokens = policy.predict_tokens(images, INSTRUCTIONS)  # 7 tokens: the largest dim among the rows
    np.testing.assert_array_equal(pred.tokens, tokens)
    bins = np.linspace(-1.0, 1.0, 256)
    np.testing.assert_array_equal(pred.normalized, ((bins[:-1] + bins[1:]) / 2)[np.clip(31999 - tokens, 0, 254)])
    inv = openvla_unnormalize(tokens, multi.norm_stats["inverted"])
    want0 = inv[0].copy()
    want0[6] = 1.0 - want0[6]  # absolute_inverted: 1 = closed
    np.testing.assert_allclose(pred.rows[0], want0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(pred.rows[1], openvla_unnormalize(tokens[1:2, :6], six)[0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(pred.rows[2], inv[2], rtol=0, atol=1e-15)
    assert pred.unnorm_keys == tuple(keys) and pred.rows[1].shape == (6,)
    with pytest.raises(ValueError, match=r"action dims \[6, 7\].*Prediction.rows"):
        pred.actions
    with pytest.raises(ValueError, match="3 images but 2 values of unnorm_key"):
        multi.predict(images, INSTRUCTIONS, keys[:2])
    same = multi.predict(images, INSTRUCTIONS, "inverted")
    np.testing.assert_array_equal(same.actions, multi.predict_actions(images, INSTRUCTIONS, "inverted"))
    np.testing.assert_allclose(same.actions, inv, rtol=0, atol=1e-15)
