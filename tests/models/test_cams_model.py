"""Cameras and proprio on the model side: config fields (checks, checkpoint round trip), the proprio
projector's parameter names, shapes and logical axes, LoRA leaving it fully trained, one camera
unchanged, and the input errors."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from vla_jax import sharding as shd
from vla_jax.models import lora
from vla_jax.models.config import config_from_dict, get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA

_tiny = with_dtypes(get_preset("tiny"), "float32")
BASE = dataclasses.replace(_tiny, dino=dataclasses.replace(_tiny.dino, image_size=56),
                           siglip=dataclasses.replace(_tiny.siglip, image_size=56))  # 16 patches per camera
CAMS = dataclasses.replace(BASE, num_images=2, proprio_dim=3)
S, H = BASE.image_size, BASE.llama.hidden_size
IDS = np.array([[1, 512, 29901, 1724, 3158, 29871]], np.int32)


def _images(n, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, S, S, 3) if n is None else (batch, n, S, S, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def cams_params():
    return jax.jit(OpenVLA(CAMS).init)(jax.random.PRNGKey(0), _images(2), IDS)["params"]  # jit: one compile


def test_config_fields_and_inserted_positions():
    assert (BASE.num_images, BASE.proprio_dim, BASE.film) == (1, None, False)
    assert BASE.num_inserted_tokens == BASE.num_patches == 16
    assert CAMS.num_inserted_tokens == 2 * 16 + 1
    assert dataclasses.replace(BASE, proprio_dim=0).proprio_dim is None  # 0 and None: no proprio token
    seven_b = get_preset("openvla-7b")
    assert dataclasses.replace(seven_b, num_images=2, proprio_dim=8).num_inserted_tokens == 513  # LIBERO OFT


@pytest.mark.parametrize("changes, message", [
    (dict(num_images=0), r"num_images must be an integer >= 1 .* got 0"),
    (dict(num_images=True), r"num_images must be an integer >= 1 .* got True"),
    (dict(proprio_dim=-1), r"proprio_dim must be None, 0 .* got -1"),
    (dict(proprio_dim=2.0), r"proprio_dim must be None, 0 .* got 2.0"),
    (dict(film=True), r"film=True .* needs parallel_decoding=True"),  # FiLM is OFT+ (single-pass decoding)
    (dict(film=1), r"film must be True or False, got 1"),
])
def test_bad_input_options_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **changes)


def test_input_options_survive_the_checkpoint_meta_round_trip():
    stored = json.loads(json.dumps(dataclasses.asdict(CAMS)))
    assert (stored["num_images"], stored["proprio_dim"], stored["film"]) == (2, 3, False)
    assert config_from_dict(stored) == CAMS
    old = json.loads(json.dumps(dataclasses.asdict(BASE)))
    for k in ("num_images", "proprio_dim", "film"):
        del old[k]  # a config recorded before these fields existed
    assert config_from_dict(old) == BASE


def test_proprio_projector_params_names_shapes_and_axes(cams_params):
    flat = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(nn.meta.unbox(cams_params)).items()
            if k[0] == "proprio_projector"}
    assert flat == {"proprio_projector/fc1/kernel": (3, H), "proprio_projector/fc1/bias": (H,),
                    "proprio_projector/fc2/kernel": (H, H), "proprio_projector/fc2/bias": (H,)}
    names = nn.get_partition_spec(cams_params)["proprio_projector"]
    assert tuple(names["fc1"]["kernel"]) == ("proprio_in", "proprio_hidden")
    assert tuple(names["fc2"]["kernel"]) == ("proprio_embed", "proprio_hidden")
    rules = dict(shd.LOGICAL_RULES)
    assert all(n in rules for n in ("proprio_in", "proprio_embed", "proprio_hidden"))
    # No proprio_dim: no projector; the one-camera tree is OpenVLA's.
    plain = jax.eval_shape(OpenVLA(BASE).init, jax.random.PRNGKey(0), _images(None), IDS)["params"]
    assert set(plain) == {"dino", "siglip", "projector", "llm"}


def test_lora_leaves_the_proprio_projector_fully_trained(cams_params):
    params = nn.meta.unbox(cams_params)
    paths = [t.path for t in lora.targets(params, lora.LoraConfig(rank=2))]
    assert paths and not any(p[0] == "proprio_projector" for p in paths)
    combined = lora.add_lora(params, jax.random.PRNGKey(1), lora.LoraConfig(rank=2))
    mask = lora.trainable_mask(combined)
    assert all(jax.tree.leaves(mask["proprio_projector"]))
    assert not any(jax.tree.leaves(mask["llm"]))  # base weights stay frozen under LoRA


def test_one_camera_in_either_layout_is_the_same_program():
    """N = 1: [B, 1, S, S, 3] gives exactly the logits of OpenVLA's [B, S, S, 3]."""
    model = OpenVLA(BASE)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), _images(None), IDS)["params"]
    four = _images(None, batch=2, seed=3)
    ids = np.repeat(IDS, 2, 0)
    a = np.asarray(model.apply({"params": params}, four, ids))
    b = np.asarray(model.apply({"params": params}, four[:, None], ids))
    np.testing.assert_array_equal(a, b)


def test_cameras_fold_into_the_batch_in_order(cams_params):
    """The inserted embeddings of [img0, img1] are img0's patches, then img1's, then the proprio token,
    each equal to encoding that image alone."""
    model = OpenVLA(CAMS)
    images = _images(2, batch=2, seed=4)
    proprio = np.random.default_rng(5).uniform(-1, 1, (2, 3)).astype(np.float32)
    got = np.asarray(model.apply({"params": cams_params}, images, proprio, method=OpenVLA.inserted_embeddings))
    assert got.shape == (2, 33, H)
    for cam in range(2):
        alone = np.asarray(model.apply({"params": cams_params}, images[:, cam], method=OpenVLA.encode_image))
        np.testing.assert_allclose(got[:, cam * 16:(cam + 1) * 16], alone, rtol=0, atol=1e-6)
    token = np.asarray(model.apply({"params": cams_params}, jnp.asarray(proprio),
                                   method=lambda m, p: m.proprio_projector(p)))
    np.testing.assert_allclose(got[:, 32], token, rtol=0, atol=1e-6)


@pytest.mark.parametrize("images, proprio, message", [
    (_images(None), np.zeros((1, 3), np.float32), r"shape \(1, 56, 56, 3\), one camera, but this model takes num_images=2"),
    (_images(3), np.zeros((1, 3), np.float32), r"has 3 cameras .* num_images=2: expected \[batch, num_images=2, 56, 56, 3\]"),
    (_images(2), None, r"proprio_dim=3: pass proprio=float32 \[batch=1, 3\]"),
    (_images(2), np.zeros((1, 4), np.float32), r"proprio must be \[batch=1, proprio_dim=3\], got shape \(1, 4\)"),
    (_images(2), np.zeros((1, 3), np.int32), r"proprio must be a float array"),
    (_images(2), np.full((1, 3), np.nan, np.float32), r"proprio holds non-finite values"),
])
def test_bad_camera_and_proprio_inputs_are_rejected(cams_params, images, proprio, message):
    with pytest.raises(ValueError, match=message):
        OpenVLA(CAMS).apply({"params": cams_params}, images, IDS, proprio=proprio)


def test_proprio_given_to_a_model_without_it_is_rejected():
    model = OpenVLA(BASE)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), _images(None), IDS)["params"]
    with pytest.raises(ValueError, match=r"proprio given \(shape \(1, 3\)\) but this model has no proprio input"):
        model.apply({"params": params}, _images(None), IDS, proprio=np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match=r"has 2 cameras .* num_images=1"):
        model.apply({"params": params}, _images(2), IDS)
