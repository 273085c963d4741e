"""OpenVLA-OFT parallel decoding against the PyTorch wiring (tests/oft_torch_reference.py): discrete
logits and chunk tokens, the L1 head's chunk, bidirectional attention, padding, zeroed slots."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.oft_torch_reference import TorchMLPResNet, TorchOFT, head_params, oft_rows
from tests.torch_reference import TorchOpenVLA
from vla_jax.hf import keys_openvla as hf_keys
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.models.parallel import action_mask_from_labels
from vla_jax.models.parallel_decode import build_inputs, make_parallel_decoder

# fp32 on both sides; the same fixed tolerance as tests/models/test_openvla_model.py, never loosened.
LOGITS_RTOL = 1e-5  # max |diff| <= LOGITS_RTOL * max(1, max |reference logit|)
L1_ATOL = 1e-5  # the L1 head's normalized actions

K, D = 3, 7
A = K * D
BASE = with_dtypes(get_preset("tiny"), "float32")
TOKENS_CFG = dataclasses.replace(BASE, parallel_decoding=True, chunk_size=K, action_head="tokens")
L1_CFG = dataclasses.replace(TOKENS_CFG, action_head="l1")
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901, 29871]
SHORT = PROMPT[:12] + [29871]
EOS, PAD = BASE.eos_token_id, BASE.pad_token_id


def _images(seed, batch=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, BASE.image_size, BASE.image_size, 3), dtype=np.uint8)


def _padded_prompts(prompts):
    t = max(len(p) for p in prompts)
    return (np.array([list(p) + [PAD] * (t - len(p)) for p in prompts], np.int32),
            np.array([len(p) for p in prompts], np.int32))


def _slots(ids, lengths):
    return np.stack([(np.arange(ids.shape[1]) >= n) & (np.arange(ids.shape[1]) < n + A) for n in lengths])


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    base = TorchOpenVLA(TOKENS_CFG).randomize(seed=1)
    head = TorchMLPResNet(2, D * BASE.llama.hidden_size, BASE.llama.hidden_size, D)
    head.randomize(seed=2)
    params = hf_keys.hf_to_params(base.hf_state_dict(), BASE)
    l1_params = dict(params, action_head=head_params(head))
    to_jax = lambda t: jax.tree.map(jnp.asarray, t)
    return TorchOFT(base, K, D, head), to_jax(params), to_jax(l1_params)


@pytest.fixture(scope="module")
def logits_fn():
    model = OpenVLA(TOKENS_CFG)
    return jax.jit(lambda p, *xs: model.apply({"params": p}, *xs, method=OpenVLA.parallel_logits))


@pytest.fixture(scope="module")
def hidden_fn():
    model = OpenVLA(TOKENS_CFG)
    return jax.jit(lambda p, *xs: model.apply({"params": p}, *xs, method=OpenVLA.parallel_hidden))


def test_discrete_logits_and_chunk_tokens_match_reference(reference, logits_fn):
    """Two rows with different prompt lengths: logits at every action slot (and the </s> predictor)
    within the fp32 tolerance, and the same argmax chunk from the jitted decoder."""
    ref, params, _ = reference
    images = _images(0)
    ids, mask, lengths = oft_rows([PROMPT, SHORT], A, EOS, PAD)
    expected = ref.logits(images, ids, mask, lengths).numpy()
    got = np.asarray(logits_fn(params, images, ids.astype(np.int32), mask, _slots(ids, lengths)))
    assert got.shape == expected.shape == (2, A + 1, BASE.llama.vocab_size)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    assert err <= LOGITS_RTOL * scale, f"max abs diff {err} vs logit scale {scale}"

    prompts, plens = _padded_prompts([PROMPT, SHORT])
    tokens = np.asarray(make_parallel_decoder(OpenVLA(TOKENS_CFG))(params, images, prompts, plens))
    np.testing.assert_array_equal(tokens, ref.chunk_tokens(images, ids, mask, lengths))
    assert tokens.shape == (2, K, D)


def test_l1_chunk_matches_reference(reference):
    ref, _, l1_params = reference
    images = _images(1)
    ids, mask, lengths = oft_rows([SHORT, PROMPT], A, EOS, PAD)
    expected = ref.l1_actions(images, ids, mask, lengths)
    prompts, plens = _padded_prompts([SHORT, PROMPT])
    got = np.asarray(make_parallel_decoder(OpenVLA(L1_CFG))(l1_params, images, prompts, plens))
    assert got.shape == expected.shape == (2, K, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=L1_ATOL)
    assert float(np.abs(expected).max()) > 0.1  # a real signal, not a degenerate all-zero head


def test_attention_is_bidirectional(reference, hidden_fn):
    """The reference's causal variant disagrees with ours, and changing the LAST token (</s>) changes
    the state read at the FIRST readout (the SPACE token before every slot): causal attention could not."""
    ref, params, _ = reference
    images = _images(2, batch=1)
    ids, mask, lengths = oft_rows([PROMPT], A, EOS, PAD)
    slots = _slots(ids, lengths)
    ours = np.asarray(hidden_fn(params, images, ids.astype(np.int32), mask, slots))
    bidir = ref.readout(ref.last_hidden(images, ids, mask, lengths), lengths).numpy()
    causal = ref.readout(ref.last_hidden(images, ids, mask, lengths, causal=True), lengths).numpy()
    tol = LOGITS_RTOL * max(1.0, float(np.abs(bidir).max()))
    np.testing.assert_allclose(ours, bidir, rtol=0, atol=tol)
    assert float(np.abs(ours - causal).max()) > 1e-2
    # The scanned layer stack (accelerators' default; CPU runs it unrolled) takes the same mask.
    scanned = OpenVLA(dataclasses.replace(TOKENS_CFG, execution=dataclasses.replace(TOKENS_CFG.execution, unroll_layers=False)))
    got = jax.jit(lambda p, *xs: scanned.apply({"params": p}, *xs, method=OpenVLA.parallel_hidden))(
        params, images, ids.astype(np.int32), mask, slots)
    np.testing.assert_allclose(np.asarray(got), bidir, rtol=0, atol=tol)

    other_end = ids.copy()
    other_end[0, -1] = 3158  # any other token in place of </s>
    changed = np.asarray(hidden_fn(params, images, other_end.astype(np.int32), mask, slots))
    assert float(np.abs(changed[0, 0] - ours[0, 0]).max()) > 1e-3


def test_slot_ids_do_not_matter(reference, hidden_fn):
    """The slot embeddings are zeroed: ground-truth action ids (training) and placeholders (inference)
    give the same states, bit for bit."""
    _, params, _ = reference
    images = _images(3, batch=1)
    ids, mask, lengths = oft_rows([PROMPT], A, EOS, PAD)
    slots = _slots(ids, lengths)
    actions = ids.copy()
    actions[slots] = np.random.default_rng(0).integers(31744, 32000, A)
    a = np.asarray(hidden_fn(params, images, ids.astype(np.int32), mask, slots))
    b = np.asarray(hidden_fn(params, images, actions.astype(np.int32), mask, slots))
    np.testing.assert_array_equal(a, b)


def test_padding_beyond_the_length_changes_nothing(reference):
    """A row's chunk is the same alone, batched with a longer row, and with extra pad columns of any id."""
    _, params, _ = reference
    model = OpenVLA(TOKENS_CFG)
    fn = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs, method=OpenVLA.parallel_logits))
    images = _images(4)
    ids, mask, lengths = oft_rows([SHORT], A, EOS, PAD)
    alone = np.asarray(fn(params, images[:1], ids.astype(np.int32), mask, _slots(ids, lengths)))
    for fill in (PAD, 0, 31999):
        wide = np.concatenate([ids, np.full((1, 9), fill)], 1)
        wide_mask = np.concatenate([mask, np.zeros((1, 9), np.int64)], 1)
        got = np.asarray(fn(params, images[:1], wide.astype(np.int32), wide_mask, _slots(wide, lengths)))
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-5 * max(1.0, float(np.abs(alone).max())))
    ids2, mask2, lengths2 = oft_rows([SHORT, PROMPT], A, EOS, PAD)
    batched = np.asarray(fn(params, images, ids2.astype(np.int32), mask2, _slots(ids2, lengths2)))
    np.testing.assert_allclose(batched[:1], alone, rtol=0, atol=1e-5 * max(1.0, float(np.abs(alone).max())))


def test_build_inputs_matches_the_reference_rows():
    prompts, plens = _padded_prompts([PROMPT, SHORT])
    ids, attn, slots = (np.asarray(x) for x in build_inputs(prompts, plens, A, EOS, PAD))
    want_ids, want_mask, lengths = oft_rows([PROMPT, SHORT], A, EOS, PAD)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(attn, want_mask)
    np.testing.assert_array_equal(slots, _slots(want_ids, lengths))


def test_action_mask_from_labels():
    labels = np.full((1, 10), -100)
    labels[0, 4:7] = [31744, 31999, 31800]
    labels[0, 7] = EOS
    labels[0, 2] = 31743  # the last non-action id
    np.testing.assert_array_equal(np.asarray(action_mask_from_labels(labels)),
                                  (np.arange(10)[None] >= 4) & (np.arange(10)[None] < 7))
