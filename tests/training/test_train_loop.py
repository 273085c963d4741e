"""The step loop's control flow with a stand-in step function (no model, no compilation): a NaN loss
stops the run with a message and leaves the last good checkpoint as the latest, preemption saves
and stops, checkpoints land on schedule with the matching data position, also with several steps
per call (steps_per_call)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax import checkpoints as ckpt_lib
from vla_jax.spec import BatchSpec
from vla_jax.training import loop
from vla_jax.training.synthetic import SyntheticBatches
from vla_jax.training.writers import MetricWriter

ASSETS = {"config": {"k": 1}, "dataset_statistics": {"d": {"action": {"q99": [1.0]}}}, "tokenizer": {"kind": "test"}}


class Messages(MetricWriter):
    def __init__(self, workdir):
        super().__init__(str(workdir), True, 10, tensorboard=False, progress=False)
        self.lines = []

    def message(self, text):
        self.lines.append(text)


def fake_step(nan_at=None, bad=float("nan")):
    def step(state, batch):
        k = int(state["step"]) + 1
        loss = bad if k == nan_at else 1.0 / k
        return {"step": state["step"] + 1, "w": state["w"] + float(np.sum(batch["input_ids"]))}, \
            {"loss": loss, "grad_norm": 1.0}
    return step


def run(tmp_path, nan_at=None, preempt_at=None, num_steps=6, save_every=2, start=0, bad=float("nan"),
        steps_per_call=1, trace=None):
    """-> (status, checkpoint steps, {saved step: data position}, messages, logged steps); `trace`
    (a dict) also receives the steps per call made ('calls') and the final state ('state')."""
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=2, async_save=True)
    data = SyntheticBatches(2, BatchSpec(image_size=14, text_len=16))
    writer = Messages(tmp_path)
    saved, calls = {}, []

    def save(step, state, data_state):
        saved[step] = json.loads(bytes(data_state).decode())["next_index"]
        ckpt.save(step, state, ckpt_lib.encode_data_states([data_state]), ASSETS, {"model": "test"}, force=True)

    steps_run = []

    def preempted():
        return preempt_at is not None and len(steps_run) >= preempt_at

    def record(step, metrics, seconds):
        steps_run.append(step)
        return {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}

    one = fake_step(nan_at, bad)

    def train_step(state, batch):
        calls.append(1)
        return one(state, batch)

    def train_steps(state, batches):  # what a scanned step returns: metrics stacked over the steps
        calls.append(len(batches))
        ms = []
        for b in batches:
            state, m = one(state, b)
            ms.append(m)
        return state, {k: np.stack([m[k] for m in ms]) for k in ms[0]}

    state = {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((3,), jnp.float32)}
    state, status = loop.train_loop(state, train_step, data, start=start, num_steps=num_steps,
                                    save_every=save_every, log_every=1, to_global=lambda b: b, record=record,
                                    save=save, writer=writer, preempted=preempted, latest_saved=ckpt.latest_step,
                                    steps_per_call=steps_per_call, train_steps=train_steps)
    ckpt.close()
    writer.close()
    logged = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    if trace is not None:
        trace.update(calls=calls, state=state)
    return status, ckpt.all_steps(), saved, writer.lines, logged


def test_completes_and_saves_on_schedule_with_the_data_position(tmp_path):
    status, steps, saved, _, logged = run(tmp_path)
    assert status == loop.DONE and logged == [1, 2, 3, 4, 5, 6]
    assert saved == {2: 2, 4: 4, 6: 6}  # after k steps the data iterator has handed out k batches
    assert steps == [4, 6]  # keep-2


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    status, steps, saved, lines, logged = run(tmp_path, nan_at=5, save_every=1)
    assert status == loop.NONFINITE
    assert logged == [1, 2, 3, 4] and max(saved) == 4 and steps == [3, 4]
    assert any("step 5: loss nan" in m and "latest good checkpoint is step 4" in m for m in lines), lines


def test_preemption_saves_the_current_step_and_stops(tmp_path):
    status, steps, saved, lines, logged = run(tmp_path, preempt_at=3, save_every=100)
    assert status == loop.PREEMPTED and steps == [3] and logged == [1, 2, 3]
    assert any("preempted: saved step 3" in m for m in lines)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_first_step_writes_nothing(tmp_path, bad):
    status, steps, _, lines, logged = run(tmp_path, nan_at=1, bad=bad)
    assert status == loop.NONFINITE and steps == [] and logged == []
    assert "latest good checkpoint is step None" in lines[-1]


def test_several_steps_per_call_keep_the_schedule_and_the_data_positions(tmp_path):
    one, three = {}, {}
    ref = run(tmp_path / "one", num_steps=8, save_every=4, trace=one)
    status, steps, saved, _, logged = run(tmp_path / "three", num_steps=8, save_every=4, steps_per_call=3,
                                          trace=three)
    # 1-3 in one call; 4 alone (the save point would fall inside a call); 5-7; 8 alone (the last step).
    assert one["calls"] == [1] * 8 and three["calls"] == [3, 1, 3, 1]
    assert (status, steps, saved, logged) == ref[:3] + (ref[4],)
    assert saved == {4: 4, 8: 8} and logged == list(range(1, 9))
    # The same batches, in the same order.
    np.testing.assert_array_equal(np.asarray(three["state"]["w"]), np.asarray(one["state"]["w"]))


def test_chunk_size_never_crosses_a_save_point_or_the_end():
    # After step s the call runs s+1..s+3 unless a save point (4, 8) falls before its last step or
    # the run (10 steps) ends inside it.
    assert [loop.chunk_size(s, 10, 4, 3) for s in range(10)] == [3, 3, 1, 1, 3, 3, 1, 1, 1, 1]
    assert [loop.chunk_size(s, 12, 6, 2) for s in range(0, 12, 2)] == [2, 2, 2, 2, 2, 2]
    assert loop.chunk_size(0, 10, 4, 1) == 1


def test_nan_inside_a_call_stops_at_that_step(tmp_path):
    status, steps, saved, lines, logged = run(tmp_path, nan_at=2, save_every=100, steps_per_call=3)
    assert status == loop.NONFINITE and logged == [1] and steps == [] and saved == {}
    assert any("step 2: loss nan" in m for m in lines), lines


def test_preemption_is_answered_after_the_current_call(tmp_path):
    status, steps, saved, lines, logged = run(tmp_path, preempt_at=2, save_every=100, steps_per_call=3)
    assert status == loop.PREEMPTED and steps == [3] and saved == {3: 3} and logged == [1, 2, 3]
    assert any("preempted: saved step 3" in m for m in lines)
