"""The train step: its loss and metrics against a numpy re-computation of HF's shifted causal-LM
loss over the full fused sequence, and the sharded step (2x4 data x fsdp mesh, 2 accumulated
micro-batches; two steps in one call) against the plain step on one device: same loss, gradients and
updated params."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.execution import ExecutionConfig
from vla_jax.models.openvla import OpenVLA
from vla_jax.spec import IGNORE_INDEX, ActionCodec, BatchSpec
from vla_jax.training import state as st
from vla_jax.training import step as sp
from vla_jax.training.synthetic import SyntheticBatches

B, L, NUM_DS = 16, 24, 2


def batch_spec(cfg):
    return BatchSpec.for_model(cfg, L, num_datasets=NUM_DS)


def tiny_config(image_size=56):
    cfg = with_dtypes(get_preset("tiny"), "float32")
    return dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=image_size),
                               siglip=dataclasses.replace(cfg.siglip, image_size=image_size))


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    model = OpenVLA(cfg)
    example = (np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8), np.ones((1, L), np.int32))
    mask = st.trainable_mask(st.abstract_params(model, example))
    # eps well above the gradients' rounding noise keeps Adam's update a smooth function of the gradient.
    opt = st.OptimConfig(learning_rate=1e-3, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-4, grad_clip=1.0)
    tx, schedule = st.make_optimizer(opt, 10)
    mesh1 = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state, _, _ = st.create_train_state(model, tx, mesh1, shd.LOGICAL_RULES, 0, example, mask)
    batch = next(SyntheticBatches(B, batch_spec(cfg), seed=3))
    s = dict(cfg=cfg, model=model, example=example, mask=mask, tx=tx, schedule=schedule, batch=batch,
             host_state=jax.tree.map(np.asarray, jax.device_get(state)))
    s["ref_state"], s["ref"], _ = _run_step(s, mesh1, 1)  # the plain step on one device
    return s


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_supervised_positions_follow_the_fused_layout():
    labels = np.full((2, 10), IGNORE_INDEX, np.int32)
    labels[0, 4:7] = [5, 6, 2]
    labels[1, 7:9] = [9, 2]
    pos, tgt, valid = jax.device_get(sp.supervised_positions(jnp.asarray(labels), num_inserted=16, k=3))
    # text token t >= 1 sits at fused index t + 16 and is predicted from fused index t + 15
    np.testing.assert_array_equal(pos[0], [4 + 15, 5 + 15, 6 + 15])
    np.testing.assert_array_equal(tgt[0], [5, 6, 2])
    np.testing.assert_array_equal(pos[1, :2], [7 + 15, 8 + 15])
    np.testing.assert_array_equal(valid, [[True, True, True], [True, True, False]])


def test_loss_and_metrics_match_full_sequence_reference(setup):
    cfg, model, batch, got = setup["cfg"], setup["model"], setup["batch"], setup["ref"]
    params = setup["host_state"].params  # the step's metrics describe the params before its update

    # Reference: logits at every fused position, HF's shift, OpenVLA's metric masks, numpy float64.
    logits = np.asarray(jax.jit(lambda p, x, i: model.apply({"params": p}, x, i))(
        params, batch["pixel_values"], batch["input_ids"]), np.float64)
    P = cfg.num_patches
    fused = np.concatenate([batch["labels"][:, :1], np.full((B, P), IGNORE_INDEX), batch["labels"][:, 1:]], axis=1)
    shift_logits, shift_labels = logits[:, :-1], fused[:, 1:]
    sup = shift_labels != IGNORE_INDEX
    logp = _log_softmax(shift_logits)
    ce = -np.take_along_axis(logp, np.where(sup, shift_labels, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got["loss"], ce[sup].mean(), rtol=2e-5)
    assert got["supervised_tokens"] == sup.sum() == 8 * B

    pred = shift_logits.argmax(-1)
    act = shift_labels > 31743  # OpenVLA's mask: action tokens only, EOS excluded
    tok = ActionCodec()
    l1 = np.abs(tok.decode(pred) - tok.decode(np.where(act, shift_labels, 31872)))
    hit = pred == shift_labels
    np.testing.assert_allclose(got["action_accuracy"], hit[act].mean(), rtol=1e-6)
    np.testing.assert_allclose(got["l1_loss"], l1[act].mean(), rtol=1e-5)
    for d in range(NUM_DS):
        rows = batch["dataset_index"] == d
        assert got["ds_actions"][d] == act[rows].sum() == 7 * rows.sum()
        np.testing.assert_allclose(got["ds_action_accuracy"][d], hit[rows][act[rows]].mean(), rtol=1e-6)
        np.testing.assert_allclose(got["ds_l1_loss"][d], l1[rows][act[rows]].mean(), rtol=1e-5)


def _run_step(setup, mesh, accum):
    s = setup
    loss_cfg = sp.LossConfig.for_model(s["cfg"], batch_spec(s["cfg"]))
    shardings, _ = st.abstract_train_state(s["model"], s["tx"], mesh, shd.LOGICAL_RULES, 0, s["example"], s["mask"])
    state = jax.device_put(s["host_state"], shardings)
    fn = sp.make_train_step(s["model"], s["tx"], s["schedule"], loss_cfg, s["mask"], accum, mesh=mesh,
                            return_grads=True)
    shapes = {k: s["batch"][k].shape for k in batch_spec(s["cfg"]).keys}
    step = sp.jit_train_step(fn, mesh, shardings, shapes)
    host = {k: s["batch"][k] for k in batch_spec(s["cfg"]).keys}
    new_state, metrics = step(state, shd.host_batch_to_global(host, mesh))
    return jax.device_get(new_state), jax.device_get(metrics), new_state


def test_sharded_accumulated_step_matches_single_device(setup):
    ref_state, ref = setup["ref_state"], setup["ref"]
    mesh = shd.make_mesh((2, 4, 1))
    new_state, got, live = _run_step(setup, mesh, 2)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)
    grads, ref_grads = jax.tree.leaves(got["grads"]), jax.tree.leaves(ref["grads"])
    assert len(grads) == len(ref_grads) > 50
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
    for p, r in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(p, r, rtol=0, atol=1e-6)
    assert int(new_state.step) == int(ref_state.step) == 1
    # The state stays FSDP-sharded: the LLM MLP kernel [layers, embed, mlp] is split over fsdp.
    kernel = live.params["llm"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4


@pytest.mark.slow  # compiles two more train steps (~40 s alone); the one-step numerics are checked fast above
def test_two_steps_in_one_call_match_two_calls(setup):
    """steps_per_call=2 (a scan over the step, batches stacked [2, B, ...]) on the 2x4 mesh against two
    separate calls of the plain step on one device, each with its own batch."""
    s = setup
    loss_cfg = sp.LossConfig.for_model(s["cfg"], batch_spec(s["cfg"]))
    batches = [{k: b[k] for k in batch_spec(s["cfg"]).keys}
               for b in (s["batch"], next(SyntheticBatches(B, batch_spec(s["cfg"]), seed=4)))]
    shapes = {k: v.shape for k, v in batches[0].items()}
    fn = sp.make_train_step(s["model"], s["tx"], s["schedule"], loss_cfg, s["mask"])

    def run(mesh, steps_per_call):
        shardings, _ = st.abstract_train_state(s["model"], s["tx"], mesh, shd.LOGICAL_RULES, 0, s["example"], s["mask"])
        state = jax.device_put(s["host_state"], shardings)
        step = sp.jit_train_step(fn, mesh, shardings, shapes, steps_per_call=steps_per_call)
        if steps_per_call == 1:
            metrics = []
            for b in batches:
                state, m = step(state, shd.host_batch_to_global(b, mesh))
                metrics.append(jax.device_get(m))
            return jax.device_get(state), {k: np.stack([m[k] for m in metrics]) for k in metrics[0]}
        stacked = shd.host_batch_to_global(sp.stack_batches(batches, batch_spec(s["cfg"]).keys), mesh, stacked=True)
        assert stacked["input_ids"].sharding.spec == jax.sharding.PartitionSpec(None, shd.BATCH_AXES, None)
        state, metrics = step(state, stacked)
        return jax.device_get(state), jax.device_get(metrics)

    ref_state, ref = run(shd.make_mesh((1, 1, 1), jax.devices()[:1]), 1)
    got_state, got = run(shd.make_mesh((2, 4, 1)), 2)
    assert got["loss"].shape == (2,) and ref["loss"][0] != ref["loss"][1]
    for k in ("loss", "grad_norm", "action_accuracy", "l1_loss", "learning_rate"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, err_msg=k)
    assert int(got_state.step) == int(ref_state.step) == 2
    for p, r in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(ref_state.params)):
        np.testing.assert_allclose(p, r, rtol=0, atol=1e-6)
    for p, r in zip(jax.tree.leaves(got_state.opt_state), jax.tree.leaves(ref_state.opt_state)):
        np.testing.assert_allclose(p, r, rtol=1e-4, atol=1e-9)


def test_frozen_parts_have_no_optimizer_state_and_do_not_move(setup):
    s = setup
    params = st.abstract_params(s["model"], s["example"])
    mask = st.trainable_mask(params, vision=False)
    mesh1 = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    shardings, abstract = st.abstract_train_state(s["model"], s["tx"], mesh1, shd.LOGICAL_RULES, 0,
                                                  s["example"], mask)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [x for x in jax.tree.leaves(abstract.opt_state, is_leaf=is_adam) if is_adam(x)]
    # Moments exist exactly for the trainable leaves.
    n_mu = sum(np.prod(x.shape) for x in jax.tree.leaves(adam.mu))
    summary = st.param_summary(params, mask)
    assert n_mu == summary["trainable"] == summary["projector"] + summary["llm"]
    loss_cfg = sp.LossConfig.for_model(s["cfg"], batch_spec(s["cfg"]))
    fn = sp.make_train_step(s["model"], s["tx"], s["schedule"], loss_cfg, mask, return_grads=True)
    out_state, metrics = jax.eval_shape(fn, abstract, {k: s["batch"][k] for k in batch_spec(s["cfg"]).keys})
    # No gradient is even computed for the towers.
    assert jax.tree.leaves(metrics["grads"]["dino"]) == jax.tree.leaves(metrics["grads"]["siglip"]) == []
    assert jax.tree.leaves(metrics["grads"]["llm"])


def test_check_batch_names_the_problem(setup):
    cfg, batch = setup["cfg"], dict(setup["batch"])
    spec = batch_spec(cfg)
    spec.check(batch)
    bad = dict(batch, pixel_values=batch["pixel_values"][:, :32])
    with pytest.raises(ValueError, match=r"pixel_values.*uint8 \[16, 56, 56, 3\]"):
        spec.check(bad)
    labels = batch["labels"].copy()
    labels[3, 1:11] = 5
    n = int((labels[3] != IGNORE_INDEX).sum())
    assert n > 8
    with pytest.raises(ValueError, match=f"row 3 has {n} supervised labels; the loss expects at most 8"):
        spec.check(dict(batch, labels=labels))
    with pytest.raises(ValueError, match=r"dataset_index.*\[0, 2\)"):
        spec.check(dict(batch, dataset_index=batch["dataset_index"] + 5))


def test_constrain_activations_comes_from_the_model_config(setup):
    """`ExecutionConfig.constrain_activations` of the model config decides whether the jitted step is
    traced under the mesh rules: with it the lowered step carries the model's activation sharding
    constraints, without it none of them; an explicit `constrain_activations=` still wins."""
    s = setup
    mesh = shd.make_mesh((2, 4, 1), jax.devices()[:8])
    spec = batch_spec(s["cfg"])
    loss_cfg = sp.LossConfig.for_model(s["cfg"], spec)
    shapes = {k: s["batch"][k].shape for k in spec.keys}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh, v.ndim))
             for k, v in s["batch"].items() if k in spec.keys}
    constraints = {}
    for flag in (True, False):
        model = OpenVLA(dataclasses.replace(s["cfg"], execution=ExecutionConfig(constrain_activations=flag)))
        shardings, abstract = st.abstract_train_state(model, s["tx"], mesh, shd.LOGICAL_RULES, 0, s["example"], s["mask"])
        fn = sp.make_train_step(model, s["tx"], s["schedule"], loss_cfg, s["mask"], 1, mesh=mesh)
        step = sp.jit_train_step(fn, mesh, shardings, shapes)
        assert step.constrain_activations is flag
        constraints[flag] = step.lower(abstract, batch).as_text().count("sharding_constraint")
        assert sp.jit_train_step(fn, mesh, shardings, shapes, constrain_activations=not flag).constrain_activations \
            is (not flag)
    assert constraints[True] > 0 and constraints[False] == 0, constraints
