"""OpenVLA-OFT model pieces without the full towers: config options and their errors, the MLPResNet
head against torch (layer order, parameter counts at 7B), RMSNorm of zero rows, the losses against
torch, input checks, LoRA and sharding names for the head."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests.oft_torch_reference import TorchMLPResNet, head_params
from vla_jax import sharding
from vla_jax.models import lora
from vla_jax.models.action_head import L1ActionHead
from vla_jax.models.config import config_from_dict, get_preset, with_dtypes
from vla_jax.models.llama import RMSNorm
from vla_jax.models.openvla import OpenVLA
from vla_jax.models.parallel import check_parallel_inputs
from vla_jax.models.parallel_decode import build_inputs, make_parallel_decoder
from vla_jax.training import oft_losses

BASE = with_dtypes(get_preset("tiny"), "float32")
OFT = dataclasses.replace(BASE, parallel_decoding=True, chunk_size=2, action_head="l1")


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("changes, message", [
    (dict(chunk_size=0), r"chunk_size must be an integer >= 1 .* got 0"),
    (dict(chunk_size=2.5, parallel_decoding=True), r"chunk_size must be an integer >= 1 .* got 2.5"),
    (dict(action_head="diffusion", parallel_decoding=True), r"action_head='diffusion'; expected one of \('tokens', 'l1'\)"),
    (dict(chunk_size=8), r"chunk_size=8 needs parallel_decoding=True"),
    (dict(action_head="l1"), r"action_head='l1' needs parallel_decoding=True"),
    (dict(parallel_decoding="yes"), r"parallel_decoding must be True or False, got 'yes'"),
    (dict(action_dim=0), r"action_dim must be an integer >= 1, got 0"),
])
def test_bad_oft_options_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **changes)


def test_oft_options_survive_the_checkpoint_meta_round_trip():
    stored = json.loads(json.dumps(dataclasses.asdict(OFT)))
    assert (stored["parallel_decoding"], stored["chunk_size"], stored["action_head"]) == (True, 2, "l1")
    assert config_from_dict(stored) == OFT
    # A checkpoint written before these fields existed loads as the autoregressive model.
    old = {k: v for k, v in dataclasses.asdict(BASE).items() if k not in ("parallel_decoding", "chunk_size", "action_head")}
    cfg = config_from_dict(old)
    assert (cfg.parallel_decoding, cfg.chunk_size, cfg.action_head) == (False, 1, "tokens") and cfg == BASE
    assert OFT.num_action_slots == 14 and BASE.num_action_slots == 7


# ---------------------------------------------------------------------------------------------
# The L1 head


def test_l1_head_matches_torch_mlp_resnet():
    k, d, h = 3, 7, 32
    ref = TorchMLPResNet(2, d * h, h, d).randomize(seed=0)
    x = np.random.default_rng(0).normal(size=(2, k * d, h)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x).reshape(2, k, d * h)).numpy()
    got = np.asarray(L1ActionHead(action_dim=d, width=h).apply({"params": head_params(ref)}, x))
    assert got.shape == (2, k, d)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("action_dim, reference_millions", [(7, 151.12), (14, 268.64)])
def test_l1_head_parameter_count_at_7b(action_dim, reference_millions):
    """OFT_REFERENCE.md §6: 151.12M (LIBERO, D=7) and 268.64M (ALOHA, D=14) at width 4096; the torch
    module built on the meta device (no memory) gives the exact count."""
    with torch.device("meta"):
        torch_count = sum(p.numel() for p in TorchMLPResNet(2, action_dim * 4096, 4096, action_dim).parameters())
    shapes = jax.eval_shape(lambda: L1ActionHead(action_dim=action_dim, width=4096).init(
        jax.random.PRNGKey(0), jnp.zeros((1, action_dim * 8, 4096))))
    count = lora.count_params(shapes["params"])
    assert count == torch_count
    assert round(count / 1e6, 2) == reference_millions


def test_l1_head_params_exist_only_for_the_l1_head():
    img = np.zeros((1, 224, 224, 3), np.uint8)
    ids = np.array([[1, 5, 29871]], np.int32)
    for cfg, present in ((OFT, True), (dataclasses.replace(OFT, action_head="tokens"), False), (BASE, False)):
        shapes = jax.eval_shape(lambda: OpenVLA(cfg).init(jax.random.PRNGKey(0), img, ids))["params"]
        assert ("action_head" in shapes) == present
        if present:
            head = nn.meta.unbox(shapes["action_head"])
            assert head["fc1"]["kernel"].shape == (OFT.action_dim * OFT.llama.hidden_size, OFT.llama.hidden_size)
            assert head["fc2"]["kernel"].shape == (OFT.llama.hidden_size, OFT.action_dim)


def test_head_axis_names_resolve_to_the_mesh():
    shapes = jax.eval_shape(lambda: L1ActionHead(action_dim=7, width=64).init(jax.random.PRNGKey(0), jnp.zeros((1, 14, 64))))
    boxed = jax.tree.leaves(shapes["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    known = {name for name, _ in sharding.LOGICAL_RULES}
    assert len(boxed) == 16 and all(isinstance(x, nn.LogicallyPartitioned) and set(x.names) <= known for x in boxed)
    specs = nn.get_partition_spec(shapes["params"])
    mesh_specs = nn.logical_to_mesh(specs, sharding.LOGICAL_RULES)
    assert mesh_specs["fc1"]["kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert mesh_specs["mlp_resnet_blocks_0"]["fc"]["kernel"] == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert mesh_specs["fc2"]["kernel"] == jax.sharding.PartitionSpec("fsdp", None)
    assert mesh_specs["layer_norm1"]["scale"] == jax.sharding.PartitionSpec("fsdp")


def test_lora_leaves_the_head_out_and_trains_it_in_full():
    """Upstream's head sits beside the PEFT model: no adapters on it, every head parameter trainable."""
    img = np.zeros((1, 224, 224, 3), np.uint8)
    ids = np.array([[1, 5, 29871]], np.int32)
    params = jax.eval_shape(lambda: OpenVLA(OFT).init(jax.random.PRNGKey(0), img, ids))["params"]
    tgts = lora.targets(params, lora.LoraConfig())
    assert tgts and not any(t.path[0] == "action_head" for t in tgts)
    mask = lora.trainable_mask({"action_head": params["action_head"], "llm": {"norm": params["llm"]["norm"]}})
    assert all(jax.tree.leaves(mask["action_head"])) and not any(jax.tree.leaves(mask["llm"]))


# ---------------------------------------------------------------------------------------------
# Zero rows, losses


def test_rmsnorm_of_a_zero_row_is_exactly_zero():
    """The action slots enter layer 0 as zero rows: RMSNorm must give exact zeros, not NaN."""
    x = jnp.zeros((1, 3, 16), jnp.float32).at[0, 1].set(1.0)
    for dtype in (jnp.float32, jnp.bfloat16):
        norm = RMSNorm(1e-6, dtype, jnp.float32)
        y = np.asarray(norm.apply(norm.init(jax.random.PRNGKey(0), x), x.astype(dtype))).astype(np.float32)
        assert np.all(y[0, [0, 2]] == 0.0) and np.all(np.isfinite(y)) and np.abs(y[0, 1]).max() > 0.5


def test_losses_match_torch():
    rng = np.random.default_rng(0)
    a = 6
    labels = np.full((2, 20), -100, np.int64)
    labels[0, 10:10 + a] = rng.integers(31744, 32000, a)
    labels[0, 10 + a] = 2
    labels[1, 4:4 + a] = rng.integers(31744, 32000, a)
    labels[1, 4 + a] = 2
    targets, valid = oft_losses.chunk_token_targets(labels, a + 1)
    np.testing.assert_array_equal(np.asarray(targets), np.stack([labels[0, 10:17], labels[1, 4:11]]))
    assert bool(np.all(np.asarray(valid)))
    logits = rng.normal(size=(2, a + 1, 32064)).astype(np.float32) * 3
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 32064),
                                             torch.from_numpy(np.array(targets)).long().reshape(-1)).item()
    np.testing.assert_allclose(float(oft_losses.discrete_ce(logits, targets, valid)), want, rtol=1e-6)
    # An invalid entry is left out of the mean, as torch's ignore_index does.
    partial = np.asarray(valid).copy()
    partial[1, 3] = False
    t = torch.from_numpy(np.where(partial, np.asarray(targets), -100)).long().reshape(-1)
    want = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, 32064), t, ignore_index=-100).item()
    np.testing.assert_allclose(float(oft_losses.discrete_ce(logits, targets, partial)), want, rtol=1e-6)

    pred = rng.normal(size=(4, 8, 7)).astype(np.float32)
    target = rng.normal(size=(4, 8, 7)).astype(np.float32)
    want = torch.nn.L1Loss()(torch.from_numpy(pred), torch.from_numpy(target)).item()
    np.testing.assert_allclose(float(oft_losses.l1_loss(pred, target)), want, rtol=1e-6)
    np.testing.assert_allclose(float(oft_losses.l1_loss(pred, target)),
                               np.abs(pred.astype(np.float64) - target).mean(), rtol=1e-6)
    with pytest.raises(ValueError, match=r"both be \[B, K, D\], got \(4, 8, 7\) and \(4, 7, 8\)"):
        oft_losses.l1_loss(pred, target.transpose(0, 2, 1))


# ---------------------------------------------------------------------------------------------
# Input checks


def _rows(lengths=(4, 3), num_slots=14):
    prompts = np.array([[1, 5, 6, 29871], [1, 7, 29871, 32000]], np.int32)
    return [np.asarray(x) for x in build_inputs(prompts, np.array(lengths, np.int32), num_slots, 2, 32000)]


def test_good_rows_pass_the_checks():
    check_parallel_inputs(OFT, *_rows())


@pytest.mark.parametrize("mutate, message", [
    (lambda ids, attn, act: (ids, attn, act[:, :-1]), r"action_mask must have the shape of input_ids \(2, 19\), got \(2, 18\)"),
    (lambda ids, attn, act: (ids, attn, _set(act, 0, 4, False)),
     r"row 0 has 13 action slots; this model predicts chunk_size 2 x action_dim 7 = 14"),
    (lambda ids, attn, act: (ids, attn, _set(_set(act, 0, 10, False), 0, 18, True)), r"row 0: the action slots must be contiguous"),
    (lambda ids, attn, act: (_set(ids, 1, 17, 5), attn, act), r"row 1: the action slots must be followed by </s> \(id 2\).* got 5 at position 17"),
    (lambda ids, attn, act: (ids, _set(attn, 0, 2, 0), act), r"attention_mask row 0 is not right-padded"),
])
def test_bad_rows_are_rejected(mutate, message):
    with pytest.raises(ValueError, match=message):
        check_parallel_inputs(OFT, *mutate(*_rows()))


def _set(x, i, j, v):
    x = np.array(x)
    x[i, j] = v
    return x


def test_wrong_model_kind_and_bad_lengths_are_rejected():
    img = np.zeros((2, 224, 224, 3), np.uint8)
    ids, attn, act = _rows()
    with pytest.raises(ValueError, match=r"OpenVLA.__call__ is the causal, autoregressive forward.*parallel_decoding=True"):
        OpenVLA(OFT).apply({"params": {}}, img, ids)
    with pytest.raises(ValueError, match=r"parallel_actions needs parallel_decoding=True and action_head='l1'.*action_head='tokens'"):
        OpenVLA(dataclasses.replace(OFT, action_head="tokens")).apply({"params": {}}, img, ids, attn, act,
                                                                      method=OpenVLA.parallel_actions)
    with pytest.raises(ValueError, match=r"parallel_logits needs parallel_decoding=True.*parallel_decoding=False"):
        OpenVLA(BASE).apply({"params": {}}, img, ids, attn, act, method=OpenVLA.parallel_logits)
    prompts = np.array([[1, 5, 6, 29871], [1, 7, 29871, 32000]], np.int32)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 4\] .* got \[4, 5\]"):
        make_parallel_decoder(OpenVLA(OFT))({}, img, prompts, np.array([4, 5], np.int32))
    with pytest.raises(ValueError, match=r"parallel_decode needs a model with parallel_decoding=True"):
        make_parallel_decoder(OpenVLA(BASE))({}, img, prompts, np.array([4, 3], np.int32))


# ---------------------------------------------------------------------------------------------
# Work done by one parallel pass


def test_parallel_pass_runs_the_last_llama_layer_at_the_readout_rows_only():
    """Only the A readout states leave the pass, so the last Llama layer computes queries, attention
    output and MLP at those rows only (keys/values at every token), as the autoregressive prefill does
    at its one row. Truth: XLA's own FLOP count of the lowered (unrolled, uncompiled) pass equals the
    matmul count of `vla_jax.training.metrics` (checked against XLA in test_train_configs) for every
    row minus the (S - A) rows the last layer skips, plus the L1 head; XLA also counts norms, softmax
    and the like (under 3% in test_train_configs)."""
    from vla_jax.training import metrics as mlib

    k, prompt_len = 8, 20
    cfg = with_dtypes(get_preset("mid"), "float32")
    cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, depth=2), siglip=dataclasses.replace(cfg.siglip, depth=2),
                              llama=dataclasses.replace(cfg.llama, num_layers=2), parallel_decoding=True, chunk_size=k,
                              action_head="l1", execution=dataclasses.replace(cfg.execution, unroll_layers=True))
    model = OpenVLA(cfg)
    px = np.zeros((1, 224, 224, 3), np.uint8)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), px, np.ones((1, 4), np.int32)))["params"]
    prompts = np.ones((1, prompt_len), np.int32)
    fn = lambda p, x, ids, n: model.apply({"params": p}, x, *build_inputs(ids, n, cfg.num_action_slots, 2, 32000),
                                          method=OpenVLA.parallel_actions)
    xla = jax.jit(fn).lower(params, px, prompts, np.array([prompt_len], np.int32)).cost_analysis()["flops"]

    lc, a, d = cfg.llama, cfg.num_action_slots, cfg.llama.hidden_size
    text = prompt_len + a + 1
    s = text + cfg.num_patches
    every_row = sum(mlib.forward_flops(cfg, text, 0).values())
    per_row_last_layer = (2.0 * 2 * d * lc.num_heads * lc.head_dim + 2.0 * 2 * s * lc.num_heads * lc.head_dim
                          + 2.0 * 3 * d * lc.intermediate_size)  # q and o, scores and values, MLP
    head = 2.0 * k * (cfg.action_dim * d * d + 2 * d * d + d * cfg.action_dim)
    expected = every_row - (s - a) * per_row_last_layer + head
    assert 1.0 <= xla / expected < 1.03, (xla, expected, every_row + head)
    assert xla < 0.8 * (every_row + head)  # every row through the last layer would cost a third more here
