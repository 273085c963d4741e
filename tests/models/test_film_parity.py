"""OFT+'s FiLM against the PyTorch wiring (tests/oft_torch_reference.py `TorchFiLM`, written from
OFT_REFERENCE.md §8 on timm blocks): the L1 chunk and the discrete chunk tokens with one and with two
cameras, fp32 on both sides; a wrongly wired reference (gamma without the 1 +, FiLM after the MLP)
disagrees with us by far more than the tolerance; the language vector's positions; the gradient
of the FiLM linears (the last block's is zero)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.oft_torch_reference import (TorchFiLM, TorchMLPResNet, TorchOFT, film_params, head_params, oft_rows)
from tests.torch_reference import TorchOpenVLA
from vla_jax.hf import keys_openvla as hf_keys
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.models.parallel_decode import make_parallel_decoder

# The same fixed tolerances as tests/models/test_oft_parity.py and test_cams_parity.py, never loosened.
L1_ATOL = 1e-5
K, D = 2, 7
A = K * D
_tiny = with_dtypes(get_preset("tiny"), "float32")
# 112 px (64 patches per camera) keeps both sides fast; the towers are the tiny preset's (3 blocks).
BASE = dataclasses.replace(_tiny, dino=dataclasses.replace(_tiny.dino, image_size=112),
                           siglip=dataclasses.replace(_tiny.siglip, image_size=112))
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901, 29871]
SHORT = PROMPT[:9] + [29871]
OTHER = PROMPT[:3] + [1207, 278, 13762] + PROMPT[9:]  # another instruction, same length
EOS, PAD = BASE.eos_token_id, BASE.pad_token_id


def _cfg(head, cameras):
    return dataclasses.replace(BASE, parallel_decoding=True, chunk_size=K, action_head=head, num_images=cameras,
                               film=True)


def _images(seed, cameras, batch=2):
    rng = np.random.default_rng(seed)
    s = BASE.image_size
    shape = (batch, s, s, 3) if cameras == 1 else (batch, cameras, s, s, 3)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _padded_prompts(prompts):
    t = max(len(p) for p in prompts)
    return (np.array([list(p) + [PAD] * (t - len(p)) for p in prompts], np.int32),
            np.array([len(p) for p in prompts], np.int32))


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    base = TorchOpenVLA(BASE).randomize(seed=1)
    head = TorchMLPResNet(2, D * BASE.llama.hidden_size, BASE.llama.hidden_size, D).randomize(seed=2)
    film = TorchFiLM(BASE).randomize(seed=3)
    params = dict(hf_keys.hf_to_params(base.hf_state_dict(), BASE), film=film_params(film))
    params = jax.tree.map(jnp.asarray, dict(params, action_head=head_params(head)))

    def torch_oft(mode="upstream"):
        wired = TorchFiLM(BASE, mode)
        wired.load_state_dict(film.state_dict())
        return TorchOFT(base, K, D, head, film=wired.eval())

    return torch_oft, params


@pytest.mark.parametrize("cameras", [1, 2])
def test_film_l1_chunk_matches_reference(reference, cameras):
    """Batch of two prompts of different lengths (right-padded rows): the L1 chunk within 1e-5; the
    mis-wired references (no 1 +, FiLM after the MLP) are far off; the instruction changes the chunk
    through FiLM alone (the same text tokens elsewhere would not reach the towers)."""
    torch_oft, params = reference
    images = _images(cameras, cameras)
    ids, mask, lengths = oft_rows([PROMPT, SHORT], A, EOS, PAD)
    expected = torch_oft().l1_actions(images, ids, mask, lengths)
    decode = make_parallel_decoder(OpenVLA(_cfg("l1", cameras)))
    prompts, plens = _padded_prompts([PROMPT, SHORT])
    got = np.asarray(decode(params, images, prompts, plens))
    assert got.shape == expected.shape == (2, K, D)
    np.testing.assert_allclose(got, expected, rtol=0, atol=L1_ATOL)
    assert float(np.abs(expected).max()) > 0.1
    for mode in ("no_one", "after_mlp"):
        wrong = torch_oft(mode).l1_actions(images, ids, mask, lengths)
        assert float(np.abs(wrong - got).max()) > 100 * L1_ATOL, mode
    # Batch-1 rows (upstream's inference: no pads in the average) give the same chunks as the batch.
    for row, prompt in enumerate([PROMPT, SHORT]):
        alone = np.asarray(decode(params, images[row:row + 1], np.array([prompt], np.int32),
                                  np.array([len(prompt)], np.int32)))
        np.testing.assert_allclose(alone[0], got[row], rtol=0, atol=L1_ATOL)


@pytest.mark.parametrize("cameras", [1, 2])
def test_film_discrete_tokens_match_reference(reference, cameras):
    torch_oft, params = reference
    images = _images(10 + cameras, cameras)
    ids, mask, lengths = oft_rows([SHORT, PROMPT], A, EOS, PAD)
    expected = torch_oft().chunk_tokens(images, ids, mask, lengths)
    prompts, plens = _padded_prompts([SHORT, PROMPT])
    tokens_params = {k: v for k, v in params.items() if k != "action_head"}
    got = np.asarray(make_parallel_decoder(OpenVLA(_cfg("tokens", cameras)))(tokens_params, images, prompts, plens))
    assert got.shape == (2, K, D)
    np.testing.assert_array_equal(got, expected)


def test_film_language_vector_positions(reference):
    """lang = mean of the raw embeddings over BOS, prompt, 29871 and </s>, never the action slots'
    ids nor pads: changing the ids in the slots or the pad id changes nothing; a different
    instruction of the same length changes the chunk (through the towers)."""
    _, params = reference
    cfg = _cfg("l1", 1)
    model = OpenVLA(cfg)
    images = _images(5, 1, batch=1)
    fwd = jax.jit(lambda p, ids, m, s: model.apply({"params": p}, images, ids, m, s, method=OpenVLA.parallel_actions))

    def run(prompt, slot_id=1, pad_id=PAD, pads=3):
        ids, mask, lengths = oft_rows([prompt], A, EOS, pad_id, placeholder=slot_id)
        ids = np.concatenate([ids, np.full((1, pads), pad_id)], 1).astype(np.int32)
        mask = np.concatenate([mask, np.zeros((1, pads), np.int64)], 1)
        slots = (np.arange(ids.shape[1]) >= lengths[0]) & (np.arange(ids.shape[1]) < lengths[0] + A)
        return np.asarray(fwd(params, ids, mask, slots[None]))

    base = run(PROMPT)
    np.testing.assert_array_equal(run(PROMPT, slot_id=31800), base)  # slots: zeroed and not averaged
    # pads (another id, more of them): neither attended nor averaged; a longer row only reorders sums
    np.testing.assert_allclose(run(PROMPT, pad_id=0, pads=5), base, rtol=0, atol=L1_ATOL)
    assert float(np.abs(run(OTHER) - base).max()) > 1e-3


def test_film_gradients_reach_every_read_block_but_not_the_last(reference):
    """d(L1 loss)/d(FiLM params): nonzero for every block that runs, exactly zero for the last block's
    (its output is never read), for both towers."""
    _, params = reference
    model = OpenVLA(_cfg("l1", 1))
    images = _images(7, 1, batch=1)
    ids, mask, lengths = oft_rows([PROMPT], A, EOS, PAD)
    slots = (np.arange(ids.shape[1]) >= lengths[0]) & (np.arange(ids.shape[1]) < lengths[0] + A)

    def loss(film):
        out = model.apply({"params": dict(params, film=film)}, images, ids.astype(np.int32), mask, slots[None],
                          method=OpenVLA.parallel_actions)
        return jnp.abs(out - 0.5).mean()

    grads = jax.grad(loss)(params["film"])
    for tower in ("dino", "siglip"):
        for name in ("scale", "shift"):
            g = np.asarray(grads[tower]["blocks"][name]["kernel"])
            assert g.shape[0] == BASE.dino.depth - 1
            assert all(float(np.abs(g[i]).max()) > 0 for i in range(g.shape[0])), (tower, name)
            last = grads[tower]["last_block"][name]
            assert float(np.abs(np.asarray(last["kernel"])).max()) == 0.0
            assert float(np.abs(np.asarray(last["bias"])).max()) == 0.0


def test_film_is_off_by_default_and_bit_identical_without_it(reference):
    """film=False (the default) creates no FiLM params, and its outputs do not depend on a stray
    params['film'] (it is never read)."""
    _, params = reference
    cfg = dataclasses.replace(_cfg("l1", 1), film=False)
    assert not dataclasses.replace(BASE).film
    model = OpenVLA(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _images(0, 1, 1), np.ones((1, 4), np.int32)))
    assert "film" not in nn.meta.unbox(shapes["params"])
    prompts, plens = _padded_prompts([PROMPT])
    decode = make_parallel_decoder(model)
    without = {k: v for k, v in params.items() if k != "film"}
    np.testing.assert_array_equal(np.asarray(decode(without, _images(3, 1, 1), prompts, plens)),
                                  np.asarray(decode(params, _images(3, 1, 1), prompts, plens)))
