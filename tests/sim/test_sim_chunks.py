"""Closed loop with action chunks (OpenVLA-OFT): each slot executes its chunk open-loop, then re-plans.

A scripted stand-in for the simulator workers (same broadcast protocol as `SimWorkers`) records every
action each episode receives, so the test checks exactly which chunk rows ran, in which order, and how
often the policy was asked.
"""

import numpy as np
import pytest

from vla_jax.sim.closed_loop import evaluate

K, STEPS, SIZE = 4, 10, 8


class FakeSim:
    """2 workers; every episode runs STEPS steps and fails; `executed[(task, index)]` lists its actions."""

    settings = {"image_size": SIZE}

    def __init__(self):
        self.slots, self.executed = {}, {}

    def __len__(self):
        return 2

    def broadcast(self, calls):
        out = {}
        for w, (cmd, kw) in calls.items():
            out[w] = {}
            if cmd == "reset":
                for s, task, _, index, _ in kw["assignments"]:
                    self.slots[s] = [task, index, 0]
                    self.executed[(task, index)] = []
                    out[w][s] = {"image": np.full((SIZE, SIZE, 3), s, np.uint8), "done": False, "success": False,
                                 "t": 0}
            else:
                for s, a in kw["actions"].items():
                    ep = self.slots[s]
                    ep[2] += 1
                    self.executed[(ep[0], ep[1])].append(np.asarray(a).copy())
                    out[w][s] = {"image": np.full((SIZE, SIZE, 3), s, np.uint8), "done": ep[2] >= STEPS,
                                 "success": False, "t": ep[2]}
        return out


class ChunkPolicy:
    """Returns [B, K, 7] chunks whose action (call c, row k) has x = c + k / 10 (so the test can read them)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, instructions):
        out = np.zeros((len(instructions), K, 7), np.float32)
        out[:, :, 0] = self.calls + np.arange(K)[None] / 10
        self.calls += 1
        return out


@pytest.mark.parametrize("execute, per_plan", [(None, K), (2, 2)])
def test_chunks_run_open_loop_then_replan(execute, per_plan):
    sim, policy = FakeSim(), ChunkPolicy()
    rep = evaluate(policy, ["reach", "push"], 1, sim, batch_size=2, execute=execute, say=lambda s: None)
    # both episodes start together and run in lockstep: one call per plan, ceil(STEPS / per_plan) plans
    plans = -(-STEPS // per_plan)
    assert policy.calls == rep["policy_calls"] == plans
    assert rep["env_steps"] == 2 * STEPS
    for actions in sim.executed.values():
        x = np.array([a[0] for a in actions])
        want = np.array([c + k / 10 for c in range(plans) for k in range(per_plan)][:STEPS], np.float32)
        np.testing.assert_allclose(x, want, rtol=0, atol=1e-6)  # the first `per_plan` rows, in order


def test_execute_larger_than_the_chunk_is_refused():
    with pytest.raises(ValueError, match=r"execute=5 but policy 'policy' returns chunks of 4 actions"):
        evaluate(ChunkPolicy(), ["reach"], 1, FakeSim(), batch_size=1, execute=5, say=lambda s: None)
    with pytest.raises(ValueError, match=r"execute=0"):
        evaluate(ChunkPolicy(), ["reach"], 1, FakeSim(), batch_size=1, execute=0, say=lambda s: None)


def test_per_step_policies_act_every_step():
    sim = FakeSim()
    calls = []

    def policy(images, instructions):
        calls.append(1)
        return np.zeros((len(instructions), 7), np.float32)

    rep = evaluate(policy, ["reach"], 1, sim, batch_size=1, say=lambda s: None)
    assert len(calls) == rep["policy_calls"] == STEPS
