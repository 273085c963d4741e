"""A step whose loss is finite but whose update exploded (or left non-finite parameters) is neither
saved nor called good: the loop looks at the update and the parameters, not only at the loss
computed before the update. First with a stand-in step (control flow), then with the real train
step of the tiny model at lr=1e9 (the failure of issue 18: |param| = 1.45e9 saved as good)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.training.test_train_loop import Messages
from vla_jax import checkpoints as ckpt_lib
from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.spec import BatchSpec
from vla_jax.training import loop
from vla_jax.training import state as st
from vla_jax.training import step as sp
from vla_jax.training.synthetic import SyntheticBatches

ASSETS = {"config": {"k": 1}, "dataset_statistics": {"d": {}}, "tokenizer": {"kind": "test"}}


def run_loop(tmp_path, state, train_step, num_steps, batches):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=None)
    writer = Messages(tmp_path)

    def save(step, state, data_state):
        ckpt.save(step, state, ckpt_lib.encode_data_states([data_state]), ASSETS, {"model": "test"}, force=True)

    def record(step, metrics, seconds):
        return {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}

    state, status = loop.train_loop(state, train_step, batches, start=0, num_steps=num_steps, save_every=1,
                                    log_every=1, to_global=lambda b: b, record=record, save=save, writer=writer,
                                    preempted=lambda: False, latest_saved=ckpt.latest_step)
    ckpt.close()
    writer.close()
    return status, ckpt, writer.lines


def fake_step(explode_at, how):
    """w grows by 1 per step; at `explode_at` the update is 1e9 (finite loss) or leaves a NaN/inf."""
    def step(state, batch):
        k = int(state["step"]) + 1
        update = jnp.ones_like(state["w"])
        if k == explode_at:
            update = update * (1e9 if how == "huge" else float(how))
        w = state["w"] + update
        metrics = {"loss": 1.0 / k, "grad_norm": 1.0, "param_norm": float(jnp.linalg.norm(state["w"])),
                   "update_norm": float(jnp.linalg.norm(update)),
                   "params_finite": float(bool(jnp.all(jnp.isfinite(w))))}
        return {"step": state["step"] + 1, "w": w}, metrics
    return step


@pytest.mark.parametrize("how", ["huge", "inf"])
def test_an_exploded_update_with_a_finite_loss_is_not_saved(tmp_path, how):
    state = {"step": jnp.zeros((), jnp.int32), "w": jnp.full((4,), 3.0, jnp.float32)}
    data = SyntheticBatches(2, BatchSpec(image_size=14, text_len=16))
    status, ckpt, lines = run_loop(tmp_path, state, fake_step(3, how), 5, data)
    assert status == loop.NONFINITE
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [1, 2]
    assert any(m.startswith("step 3:") and "update" in m and "latest good checkpoint is step 2" in m
               for m in lines), lines


@pytest.mark.slow  # compiles the real step (~35 s alone); the loop's stop rule is checked fast above with a fake step
def test_the_real_step_reports_its_update_and_the_loop_stops_an_explosion(tmp_path):
    """Tiny model, AdamW at lr=1e9: the first update moves every parameter by ~1e9 while the loss that
    step reports (computed before the update) is finite."""
    cfg = with_dtypes(get_preset("tiny"), "float32")
    L = 24
    model = OpenVLA(cfg)
    example = (np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8), np.ones((1, L), np.int32))
    mask = st.trainable_mask(st.abstract_params(model, example))
    opt = st.OptimConfig(learning_rate=1e9, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
    tx, schedule = st.make_optimizer(opt, 10)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state, _, _ = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask)
    before = jax.tree.map(np.asarray, jax.device_get(state.params))
    spec = BatchSpec.for_model(cfg, L)
    step_fn = jax.jit(sp.make_train_step(model, tx, schedule, sp.LossConfig.for_model(cfg, spec), mask))
    batches = SyntheticBatches(2, spec, seed=1)
    keys = spec.keys

    calls = []

    def train_step(state, batch):
        new, metrics = step_fn(state, {k: batch[k] for k in keys})
        calls.append((jax.tree.map(np.asarray, jax.device_get(new.params)), jax.device_get(metrics)))
        return new, metrics

    status, ckpt, lines = run_loop(tmp_path, state, train_step, 3, batches)
    after, metrics = calls[0]
    # The step's own report of its update, against numpy float64 on the parameters it returned.
    diff = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
            for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    np.testing.assert_allclose(float(metrics["update_norm"]), np.sqrt(sum(np.sum(d * d) for d in diff)), rtol=1e-4)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["update_norm"]) > 1e9
    # Nothing saved, the run stopped at step 1 naming the update.
    assert status == loop.NONFINITE and ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")).all_steps() == []
    assert any(m.startswith("step 1:") and "update" in m for m in lines), lines
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == []
