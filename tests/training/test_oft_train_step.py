"""The OpenVLA-OFT loss inside the real train step (tiny model, both heads): the step's loss and
metrics against torch's L1Loss / cross_entropy (float64) on the model's own parallel outputs, with
targets rebuilt from the batch in numpy; 2 accumulated micro-batches give the 1-micro-batch loss,
gradients and update."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch

from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.spec import IGNORE_INDEX, ActionCodec, BatchSpec
from vla_jax.training import state as st
from vla_jax.training import step as sp
from vla_jax.training.synthetic import SyntheticBatches

B, K, L, NUM_DS = 8, 2, 40, 2


def oft_config(head):
    cfg = with_dtypes(get_preset("tiny"), "float32")
    return dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=56),
                               siglip=dataclasses.replace(cfg.siglip, image_size=56),
                               parallel_decoding=True, chunk_size=K, action_head=head)


@functools.lru_cache(maxsize=None)  # one compile per (head, accum) for the whole module
def run_step(head, accum):
    cfg = oft_config(head)
    model = OpenVLA(cfg)
    spec = BatchSpec.for_model(cfg, L, num_datasets=NUM_DS)
    example = (np.zeros((1, 56, 56, 3), np.uint8), np.ones((1, L), np.int32))
    mask = st.trainable_mask(st.abstract_params(model, example))
    opt = st.OptimConfig(learning_rate=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-4, grad_clip=0.0)
    tx, schedule = st.make_optimizer(opt, 10)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state, shardings, _ = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask)
    params = jax.device_get(state.params)
    batch = next(SyntheticBatches(B, spec, seed=5))
    host = spec.select(batch)
    spec.check(host)
    fn = sp.make_train_step(model, tx, schedule, sp.LossConfig.for_model(cfg, spec), mask, accum, mesh=mesh,
                            return_grads=True)
    step = sp.jit_train_step(fn, mesh, shardings, {k: v.shape for k, v in host.items()})
    new_state, metrics = step(state, shd.host_batch_to_global(host, mesh))
    return dict(cfg=cfg, model=model, params=params, batch=batch, metrics=jax.device_get(metrics),
                new_params=jax.device_get(new_state.params))


@pytest.fixture(scope="module", params=["l1", "tokens"])
def one_step(request):
    return run_step(request.param, 1)


def _slots(labels):
    return (labels >= 32000 - 256) & (labels < 32000)


def test_layout_carries_the_attention_mask_and_chunk():
    for head in ("l1", "tokens"):
        layout = BatchSpec.for_model(oft_config(head), L).layout()
        assert layout["attention_mask"] == ((L,), np.dtype(np.int32))
        assert ("actions" in layout) == (head == "l1")
    assert "attention_mask" not in BatchSpec.for_model(with_dtypes(get_preset("tiny"), "float32"), L).layout()


def test_loss_matches_torch_on_the_model_outputs(one_step):
    one = one_step
    cfg, model, params, batch, got = one["cfg"], one["model"], one["params"], one["batch"], one["metrics"]
    args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], _slots(batch["labels"]))
    n_dim = K * cfg.action_dim
    if cfg.action_head == "l1":
        pred = np.asarray(model.apply({"params": params}, *args, method=OpenVLA.parallel_actions), np.float64)
        assert pred.shape == (B, K, cfg.action_dim) == batch["actions"].shape
        want = torch.nn.L1Loss()(torch.from_numpy(pred), torch.from_numpy(batch["actions"].astype(np.float64)))
        np.testing.assert_allclose(got["loss"], want.item(), rtol=1e-5)
        np.testing.assert_allclose(got["l1_loss"], want.item(), rtol=1e-5)
        assert got["supervised_tokens"] == B * n_dim
        edges = np.linspace(-1, 1, 256)
        hit = np.digitize(np.clip(pred, -1, 1), edges) == np.digitize(np.clip(batch["actions"], -1, 1), edges)
        np.testing.assert_allclose(got["action_accuracy"], hit.mean(), atol=1.5 / hit.size)
        for d in range(NUM_DS):
            rows = batch["dataset_index"] == d
            np.testing.assert_allclose(got["ds_l1_loss"][d], np.abs(pred - batch["actions"])[rows].mean(), rtol=1e-5)
            assert got["ds_actions"][d] == rows.sum() * n_dim
    else:
        logits = np.asarray(model.apply({"params": params}, *args, method=OpenVLA.parallel_logits), np.float64)
        assert logits.shape[:2] == (B, n_dim + 1)
        targets = np.stack([row[row != IGNORE_INDEX] for row in batch["labels"]])  # A action ids + </s>
        assert targets.shape == (B, n_dim + 1) and (targets[:, -1] == 2).all()
        want = torch.nn.functional.cross_entropy(torch.from_numpy(logits).reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(targets.astype(np.int64)).reshape(-1))
        np.testing.assert_allclose(got["loss"], want.item(), rtol=1e-5)
        assert got["supervised_tokens"] == B * (n_dim + 1)
        pred = logits[:, :n_dim].argmax(-1)
        np.testing.assert_allclose(got["action_accuracy"], (pred == targets[:, :n_dim]).mean(), rtol=1e-6)
        codec = ActionCodec(chunk_size=K, decoding="parallel")
        l1 = np.abs(codec.decode(pred) - codec.decode(targets[:, :n_dim])).mean()
        np.testing.assert_allclose(got["l1_loss"], l1, rtol=1e-5)
    assert np.isfinite(got["grad_norm"]) and got["grad_norm"] > 0


# The tokens head's accumulation is the autoregressive cross-entropy's (test_train_step.py checks it fast);
# its OFT run costs two more compiles, so it runs with the slow tests.
@pytest.mark.parametrize("head", ["l1", pytest.param("tokens", marks=pytest.mark.slow)])
def test_two_micro_batches_equal_one(head):
    one, two = run_step(head, 1), run_step(head, 2)
    for k in ("loss", "action_accuracy", "l1_loss", "supervised_tokens", "grad_norm"):
        np.testing.assert_allclose(two["metrics"][k], one["metrics"][k], rtol=1e-5, err_msg=k)
    g1, g2 = jax.tree.leaves(one["metrics"]["grads"]), jax.tree.leaves(two["metrics"]["grads"])
    assert len(g1) == len(g2) > 20
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7)
    if one["cfg"].action_head == "l1":  # the head is in the trained tree and moved
        head_grads = jax.tree.leaves(one["metrics"]["grads"]["action_head"])
        assert head_grads and all(np.abs(g).max() > 0 for g in head_grads)
        before, after = jax.tree.leaves(one["params"]["action_head"]), jax.tree.leaves(one["new_params"]["action_head"])
        assert any(not np.allclose(a, b) for a, b in zip(before, after))
