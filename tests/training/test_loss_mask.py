"""The train step's loss, metrics and gradients on batches whose rows carry fewer than K = 8
supervised labels, or none (both allowed by BatchSpec.check), against a float64 numpy re-computation of
HF's shifted causal-LM loss over the full fused sequence (mean over every supervised token of the
global batch), with gradient accumulation putting the padded rows in their own micro-batches.

Every synthetic batch elsewhere has exactly 8 labels per row, where a loss that ignores the `valid`
mask gives the same value; here it does not.
"""

import dataclasses

import jax
import numpy as np
import pytest

from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.spec import IGNORE_INDEX, ActionCodec, BatchSpec
from vla_jax.training import state as st
from vla_jax.training import step as sp

B, L, SIZE = 6, 20, 28
EOS = 2
# Supervised labels per row (micro-batch m of 2 = rows m, m + 2, m + 4): row 0 full (7 actions + EOS),
# row 2 two actions + EOS, row 5 one action; rows 1, 3, 4 fully padded (micro-batch 1 has one label).
N_LABELS = (8, 0, 3, 0, 0, 1)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 31700, (B, L)).astype(np.int32)
    ids[:, 0] = 1  # BOS
    labels = np.full((B, L), IGNORE_INDEX, np.int32)
    for r, n in enumerate(N_LABELS):
        if n:
            start = int(rng.integers(2, L - n))
            tokens = rng.integers(31744, 32000, n).astype(np.int32)
            if n > 1:
                tokens[-1] = EOS
            ids[r, start:start + n] = tokens
            labels[r, start:start + n] = tokens
    pixels = rng.integers(0, 256, (B, SIZE, SIZE, 3)).astype(np.uint8)
    return {"pixel_values": pixels, "input_ids": ids, "labels": labels,
            "dataset_index": np.array([0, 1, 1, 0, 1, 0], np.int32)}


@pytest.fixture(scope="module")
def setup():
    cfg = with_dtypes(get_preset("tiny"), "float32")
    cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=SIZE),
                              siglip=dataclasses.replace(cfg.siglip, image_size=SIZE))
    model = OpenVLA(cfg)
    example = (np.zeros((1, SIZE, SIZE, 3), np.uint8), np.ones((1, L), np.int32))
    mask = st.trainable_mask(st.abstract_params(model, example))
    tx, schedule = st.make_optimizer(st.OptimConfig(learning_rate=1e-3, weight_decay=0.0, b1=0.9, b2=0.999,
                                                    eps=1e-8, grad_clip=0.0), 10)
    mesh1 = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state, _, _ = st.create_train_state(model, tx, mesh1, shd.LOGICAL_RULES, 0, example, mask)
    state = jax.device_get(state)
    loss_cfg = sp.LossConfig.for_model(cfg, BatchSpec.for_model(cfg, L, num_datasets=2))
    step = jax.jit(sp.make_train_step(model, tx, schedule, loss_cfg, mask, grad_accum_steps=2, return_grads=True))
    return dict(cfg=cfg, model=model, mask=mask, state=state, step=step, loss_cfg=loss_cfg)


def _reference(setup, batch, params=None):
    """float64 numpy: full-sequence logits (the model without logit positions), HF's shift, the CE
    over supervised tokens, OpenVLA's action-token metrics (EOS excluded)."""
    model, P = setup["model"], setup["cfg"].num_patches
    params = setup["state"].params if params is None else params
    if "forward" not in setup:
        setup["forward"] = jax.jit(lambda p, x, i: model.apply({"params": p}, x, i))
    logits = np.asarray(setup["forward"](params, batch["pixel_values"], batch["input_ids"]), np.float64)
    fused = np.concatenate([batch["labels"][:, :1], np.full((B, P), IGNORE_INDEX), batch["labels"][:, 1:]], axis=1)
    shift_logits, shift_labels = logits[:, :-1], fused[:, 1:]
    sup = shift_labels != IGNORE_INDEX
    z = shift_logits - shift_logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, np.where(sup, shift_labels, 0)[..., None], -1)[..., 0]
    act = shift_labels > 31743
    pred = shift_logits.argmax(-1)
    tok = ActionCodec()
    l1 = np.abs(tok.decode(pred) - tok.decode(np.where(act, shift_labels, 31872)))
    return dict(loss=ce[sup].mean(), tokens=sup.sum(), accuracy=(pred == shift_labels)[act].mean(),
                l1=l1[act].mean(), actions=act.sum(), rows_tokens=sup.sum(1))


def test_rows_with_fewer_or_no_labels_match_the_reference(setup):
    batch = make_batch()
    setup["loss_cfg"].spec.check(batch)  # the batch is one the pipeline may hand over
    ref = _reference(setup, batch)
    np.testing.assert_array_equal(ref["rows_tokens"], N_LABELS)
    _, m = jax.device_get(setup["step"](setup["state"], batch))
    assert m["supervised_tokens"] == ref["tokens"] == sum(N_LABELS)
    np.testing.assert_allclose(m["loss"], ref["loss"], rtol=2e-5)
    np.testing.assert_allclose(m["action_accuracy"], ref["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(m["l1_loss"], ref["l1"], rtol=1e-5)
    assert m["ds_actions"].sum() == ref["actions"] == 7 + 2 + 1
    # Per dataset: rows 0 and 5 are dataset 0 (7 + 1 actions), row 2 dataset 1 (2 actions).
    np.testing.assert_array_equal(m["ds_actions"], [8, 2])
    # The gradient: its norm is the reference loss's derivative along it (central difference of
    # the float64 reference, step 1e-2 along the unit direction; both sides run the fp32 model).
    params = setup["state"].params
    grads = st.merge(setup["mask"], m["grads"], jax.tree.map(np.zeros_like, st.select(params, setup["mask"], False)))
    norm = float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in jax.tree.leaves(grads))))
    h = 1e-2
    shifted = lambda sign: jax.tree.map(lambda p, g: (p + sign * h * g / norm).astype(np.float32), params, grads)
    slope = (_reference(setup, batch, shifted(1))["loss"] - _reference(setup, batch, shifted(-1))["loss"]) / (2 * h)
    assert norm > 0.1
    np.testing.assert_allclose(slope, norm, rtol=1e-2)


def test_a_batch_with_no_labels_has_zero_loss_and_gradient(setup):
    batch = make_batch(seed=1)
    batch["labels"][:] = IGNORE_INDEX
    _, m = jax.device_get(setup["step"](setup["state"], batch))
    assert m["supervised_tokens"] == 0 and m["loss"] == 0.0 and m["ds_actions"].sum() == 0
    assert all(not np.any(g) for g in jax.tree.leaves(m["grads"]))
