"""Two cameras + a proprio token against the PyTorch wiring (tests/oft_torch_reference.py): OFT's
parallel pass (discrete logits and chunk tokens, the L1 head's chunk) and the autoregressive forward
(logits at every position, greedy tokens through the KV cache), all in fp32."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.oft_torch_reference import (TorchMLPResNet, TorchOFT, TorchProprioProjector, head_params, oft_rows,
                                       proprio_params)
from tests.torch_reference import TorchOpenVLA
from vla_jax.hf import keys_openvla as hf_keys
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.decode import greedy_decode, split_layers
from vla_jax.models.openvla import OpenVLA
from vla_jax.models.parallel_decode import make_parallel_decoder

# fp32 on both sides; the same fixed tolerances as tests/models/test_oft_parity.py, never loosened.
LOGITS_RTOL = 1e-5  # max |diff| <= LOGITS_RTOL * max(1, max |reference logit|)
L1_ATOL = 1e-5

K, D, N, P = 2, 7, 2, 5
A = K * D
_tiny = with_dtypes(get_preset("tiny"), "float32")
# 112 px (8 x 8 = 64 patches per camera) keeps both sides fast; the towers are the tiny preset's.
BASE = dataclasses.replace(_tiny, dino=dataclasses.replace(_tiny.dino, image_size=112),
                           siglip=dataclasses.replace(_tiny.siglip, image_size=112))
AR_CFG = dataclasses.replace(BASE, num_images=N, proprio_dim=P)
TOKENS_CFG = dataclasses.replace(AR_CFG, parallel_decoding=True, chunk_size=K, action_head="tokens")
L1_CFG = dataclasses.replace(TOKENS_CFG, action_head="l1")
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901, 29871]
SHORT = PROMPT[:9] + [29871]
EOS, PAD = BASE.eos_token_id, BASE.pad_token_id


def _inputs(seed, batch=2):
    rng = np.random.default_rng(seed)
    s = BASE.image_size
    images = rng.integers(0, 256, size=(batch, N, s, s, 3), dtype=np.uint8)
    return images, rng.uniform(-1, 1, size=(batch, P)).astype(np.float32)


def _padded_prompts(prompts):
    t = max(len(p) for p in prompts)
    return (np.array([list(p) + [PAD] * (t - len(p)) for p in prompts], np.int32),
            np.array([len(p) for p in prompts], np.int32))


def _close(got, expected):
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    assert err <= LOGITS_RTOL * scale, f"max abs diff {err} vs scale {scale}"


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    base = TorchOpenVLA(BASE).randomize(seed=1)
    head = TorchMLPResNet(2, D * BASE.llama.hidden_size, BASE.llama.hidden_size, D).randomize(seed=2)
    proj = TorchProprioProjector(P, BASE.llama.hidden_size).randomize(seed=3)
    params = dict(hf_keys.hf_to_params(base.hf_state_dict(), BASE), proprio_projector=proprio_params(proj))
    to_jax = lambda t: jax.tree.map(jnp.asarray, t)
    return TorchOFT(base, K, D, head, proj), to_jax(params), to_jax(dict(params, action_head=head_params(head)))


def test_parallel_discrete_two_cameras_and_proprio_match_reference(reference):
    """Logits at the A + 1 readouts (shifted by the 2 x 64 patches and the proprio token) within the
    fp32 tolerance, and the same argmax chunk from the jitted decoder."""
    ref, params, _ = reference
    images, proprio = _inputs(0)
    ids, mask, lengths = oft_rows([PROMPT, SHORT], A, EOS, PAD)
    slots = np.stack([(np.arange(ids.shape[1]) >= n) & (np.arange(ids.shape[1]) < n + A) for n in lengths])
    expected = ref.logits(images, ids, mask, lengths, proprio=proprio).numpy()
    model = OpenVLA(TOKENS_CFG)
    got = np.asarray(jax.jit(lambda p, *xs, pr: model.apply({"params": p}, *xs, proprio=pr,
                                                             method=OpenVLA.parallel_logits))(
        params, images, ids.astype(np.int32), mask, slots, pr=proprio))
    assert got.shape == expected.shape == (2, A + 1, BASE.llama.vocab_size)
    _close(got, expected)

    prompts, plens = _padded_prompts([PROMPT, SHORT])
    tokens = np.asarray(make_parallel_decoder(model)(params, images, prompts, plens, proprio))
    np.testing.assert_array_equal(tokens, ref.chunk_tokens(images, ids, mask, lengths, proprio=proprio))
    assert tokens.shape == (2, K, D)


def test_parallel_l1_two_cameras_and_proprio_match_reference(reference):
    ref, _, l1_params = reference
    images, proprio = _inputs(1)
    ids, mask, lengths = oft_rows([SHORT, PROMPT], A, EOS, PAD)
    expected = ref.l1_actions(images, ids, mask, lengths, proprio=proprio)
    prompts, plens = _padded_prompts([SHORT, PROMPT])
    decode = make_parallel_decoder(OpenVLA(L1_CFG))
    got = np.asarray(decode(l1_params, images, prompts, plens, proprio))
    assert got.shape == expected.shape == (2, K, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=L1_ATOL)
    assert float(np.abs(expected).max()) > 0.1  # a real signal
    # Each input matters: the other camera order, the second camera, the proprio all change the chunk.
    for changed in (images[:, ::-1], np.concatenate([images[:, :1], 255 - images[:, 1:]], 1)):
        assert float(np.abs(np.asarray(decode(l1_params, changed, prompts, plens, proprio)) - got).max()) > 1e-3
    assert float(np.abs(np.asarray(decode(l1_params, images, prompts, plens, -proprio)) - got).max()) > 1e-3


def test_autoregressive_two_cameras_and_proprio_match_reference(reference):
    """OpenVLA's causal forward with `[BOS][img0][img1][proprio][text]`: logits at every position,
    and the greedy tokens of the KV-cache decoder (prefill offset by the inserted positions)."""
    ref, params, _ = reference
    images, proprio = _inputs(2)
    ids = np.array([PROMPT, PROMPT[:1] + [3158] * (len(PROMPT) - 1)], np.int32)
    model = OpenVLA(AR_CFG)
    got = np.asarray(jax.jit(lambda p, x, i, pr: model.apply({"params": p}, x, i, proprio=pr))(
        params, images, ids, proprio))
    expected = ref.causal_logits(images, ids, proprio).numpy()
    assert got.shape == expected.shape == (2, len(PROMPT) + AR_CFG.num_inserted_tokens, BASE.llama.vocab_size)
    assert AR_CFG.num_inserted_tokens == N * 64 + 1
    _close(got, expected)

    prompts, plens = _padded_prompts([PROMPT, SHORT])
    decode = jax.jit(functools.partial(greedy_decode, model, num_tokens=3))
    tokens = np.asarray(decode(split_layers(params), images, prompts, plens, proprio=proprio))
    for row, prompt in enumerate([PROMPT, SHORT]):
        want = ref.causal_greedy(images[row:row + 1], np.array([prompt]), 3, proprio[row:row + 1])
        np.testing.assert_array_equal(tokens[row:row + 1], want)
