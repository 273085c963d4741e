"""The composed OpenVLA model against the PyTorch reference wiring, plus image dependence,
bad-input errors and greedy decoding with the KV cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.torch_reference import TorchOpenVLA
from vla_jax.hf import keys_openvla
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.decode import greedy_decode, split_layers, stack_layers
from vla_jax.models.execution import ExecutionConfig
from vla_jax.models.openvla import OpenVLA

# fp32 on both sides; differences come only from summation order. Fixed, never loosened.
LOGITS_RTOL = 1e-5  # max |diff| <= LOGITS_RTOL * max(1, max |reference logit|)

CFG = with_dtypes(get_preset("tiny"), "float32")
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901, 29871]


def _images(seed, batch=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, CFG.image_size, CFG.image_size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = TorchOpenVLA(CFG).randomize(seed=1)
    params = jax.tree.map(jnp.asarray, keys_openvla.hf_to_params(ref.hf_state_dict(), CFG))
    return ref, params


def _decoder(**kw):
    """The jitted greedy decoder Policy runs: fn(split params, images, ids, lengths) -> tokens."""
    return jax.jit(functools.partial(greedy_decode, OpenVLA(CFG), **kw))


def _with_query_block(block):
    """CFG with the training forward's causal attention blocked over `block` query rows ('auto': the
    default, 64 rows on CPU; 0: one block). The fused sequence has 276 tokens, so blocks are in play."""
    if block == "auto":
        return CFG
    return dataclasses.replace(CFG, execution=ExecutionConfig(attention_query_block=block))


@pytest.mark.parametrize("block", ["auto", 0, 50])
def test_logits_match_reference_at_every_position(reference, block):
    ref, params = reference
    images = _images(0)
    ids = np.array([PROMPT, PROMPT[:1] + [3158] * (len(PROMPT) - 1)], np.int32)
    with torch.no_grad():
        expected = ref(images, torch.from_numpy(ids).long()).numpy()
    got = np.asarray(OpenVLA(_with_query_block(block)).apply({"params": params}, images, ids))
    assert got.shape == expected.shape == (2, len(PROMPT) + CFG.num_patches, CFG.llama.vocab_size)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    assert err <= LOGITS_RTOL * scale, f"max abs diff {err} vs logit scale {scale}"


def test_logits_only_at_requested_positions(reference):
    _, params = reference
    images, ids = _images(1), np.array([PROMPT, PROMPT], np.int32)
    model = OpenVLA(CFG)
    full = np.asarray(model.apply({"params": params}, images, ids))
    pos = np.array([[3, 270, 275], [0, 1, 275]], np.int32)
    some = np.asarray(model.apply({"params": params}, images, ids, pos))
    # Same numbers up to matmul blocking (the lm_head runs on 3 rows instead of 276).
    np.testing.assert_allclose(some, np.take_along_axis(full, pos[..., None], axis=1), rtol=0, atol=1e-5)


def test_greedy_tokens_match_reference(reference):
    ref, params = reference
    images = _images(2)
    ids = np.array([PROMPT, PROMPT], np.int32)
    expected = ref.greedy(images, torch.from_numpy(ids).long(), 7)
    decoder = _decoder(num_tokens=7)
    got = np.asarray(decoder(split_layers(params), images, ids, np.full((2,), len(PROMPT), np.int32)))
    np.testing.assert_array_equal(got, expected)


def test_batched_decode_with_different_prompt_lengths(reference):
    """Right-padded rows of different lengths decode exactly as each row alone (no leak through pads)."""
    params = split_layers(reference[1])
    images = _images(3)
    short = PROMPT[:12] + [29871]
    decoder = _decoder(num_tokens=7)
    padded = np.array([PROMPT, short + [CFG.pad_token_id] * (len(PROMPT) - len(short))], np.int32)
    batched = np.asarray(decoder(params, images, padded, np.array([len(PROMPT), len(short)], np.int32)))
    alone0 = np.asarray(decoder(params, images[:1], np.array([PROMPT], np.int32), np.array([len(PROMPT)], np.int32)))
    alone1 = np.asarray(decoder(params, images[1:], np.array([short], np.int32), np.array([len(short)], np.int32)))
    np.testing.assert_array_equal(batched, np.concatenate([alone0, alone1]))


def test_restricting_argmax_to_action_tokens(reference):
    _, params = reference
    lo, hi = CFG.base_vocab_size - CFG.n_action_bins, CFG.base_vocab_size - 1
    decoder = _decoder(num_tokens=7, allowed_range=(lo, hi))
    tokens = np.asarray(decoder(split_layers(params), _images(4), np.array([PROMPT] * 2, np.int32), np.full((2,), len(PROMPT), np.int32)))
    assert tokens.min() >= lo and tokens.max() <= hi


def test_split_layout_round_trip(reference):
    """split_layers gives layer i its slice [i] of every stacked tensor; stack_layers restores the
    stacked tree exactly; consume=True frees the stacked arrays and keeps the split ones."""
    params = reference[1]
    split = split_layers(params)
    stacked = params["llm"]["layers"]
    assert len(split["layers"]) == CFG.llama.num_layers and "layers" not in split["shared"]["llm"]
    for i, layer in enumerate(split["layers"]):
        jax.tree.map(lambda s, x: np.testing.assert_array_equal(np.asarray(s), np.asarray(x)[i]), layer, stacked)
    back = stack_layers(split)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, params)

    own = jax.tree.map(jnp.array, params)  # a copy nobody else holds
    own_split = split_layers(own, consume=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(own["llm"]["layers"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 stack_layers(own_split), params)


def test_decoding_names_the_layout_it_needs(reference):
    decoder = _decoder(num_tokens=7)
    with pytest.raises(ValueError, match=r"split_layers\(params\).*got \['dino', 'llm', 'projector', 'siglip'\]"):
        decoder(reference[1], _images(4), np.array([PROMPT], np.int32), np.array([len(PROMPT)], np.int32))
    with pytest.raises(ValueError, match=r"stacked 'llm/layers' subtree, got \['dino', 'projector'\]"):
        split_layers({"dino": {}, "projector": {}})


def test_output_depends_on_the_image(reference):
    """Guards against a silent vision bypass: black, white and noise images give different logits.
    (The module's shared random weights and one jitted forward: an eager init + apply took ~24 s.)"""
    model = OpenVLA(CFG)
    ids = np.array([PROMPT], np.int32)
    s = CFG.image_size
    params = reference[1]
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, ids))
    images = {"black": np.zeros((1, s, s, 3), np.uint8), "white": np.full((1, s, s, 3), 255, np.uint8),
              "noise": _images(5, batch=1)}
    last = {k: np.asarray(forward(params, v))[0, -1] for k, v in images.items()}
    for a, b in [("black", "white"), ("black", "noise"), ("white", "noise")]:
        diff = float(np.abs(last[a] - last[b]).max())
        assert diff > 1e-3, f"{a} and {b} images give the same logits (max diff {diff})"


@pytest.mark.parametrize("shape, dtype, fill, message", [
    ((1, 112, 112, 3), np.uint8, 0, r"must be 224x224 images .* got 112x112"),
    ((1, 224, 224, 4), np.uint8, 0, r"3 \(RGB\) channels in the last axis, got 4"),
    ((1, 3, 224, 224), np.float32, 0.0, r"3 \(RGB\) channels in the last axis, got 224"),
    ((1, 224, 224, 3), np.float32, 300.0, r"must lie in \[0, 255\].*got values in \[300.0, 300.0\]"),
    ((1, 224, 224, 3), np.float32, -0.5, r"must lie in \[0, 255\].*got values in \[-0.5, -0.5\]"),
])
def test_bad_images_are_rejected(shape, dtype, fill, message):
    assert CFG.image_size == 224
    images = np.full(shape, fill, dtype)
    with pytest.raises(ValueError, match=message):
        OpenVLA(CFG).init(jax.random.PRNGKey(0), images, np.array([PROMPT], np.int32))


def test_bad_token_ids_are_rejected():
    model = OpenVLA(CFG)
    img = np.zeros((1, CFG.image_size, CFG.image_size, 3), np.uint8)
    with pytest.raises(ValueError, match=r"\[0, 32064\), got ids in \[1, 40000\]"):
        model.init(jax.random.PRNGKey(0), img, np.array([PROMPT + [40000]], np.int32))
    with pytest.raises(ValueError, match=r"got ids in \[-1, "):
        model.init(jax.random.PRNGKey(0), img, np.array([[-1] + PROMPT], np.int32))
    short = dataclasses.replace(CFG, llama=dataclasses.replace(CFG.llama, max_seq_len=CFG.num_patches + 10))
    with pytest.raises(ValueError, match=r"has 20 tokens but the configured maximum is 10"):
        OpenVLA(short).init(jax.random.PRNGKey(0), img, np.array([PROMPT], np.int32))
