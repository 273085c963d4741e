"""Closed loop with a second camera and proprio: what a policy is given per step is exactly what the demo
data generator writes for the same simulator observations (the same keys, the same 4-D proprio), and
`SimPolicy` gives a checkpoint what its spec asks for, by its camera names.

A scripted stand-in for the simulator workers (the broadcast protocol of `SimWorkers`) returns known
observations: a 39-D Meta-World state per (slot, step) and images filled with slot-specific values.
Truth: Meta-World's observation layout written out here (hand xyz = obs[0:3], gripper opening = obs[3]).
"""

import json
import types

import numpy as np
import pytest

from vla_jax.sim.checkpoint_policy import SimPolicy, recorded_wrist_camera
from vla_jax.sim.closed_loop import evaluate

STEPS, SIZE = 5, 8


def env_state(slot: int, t: int) -> np.ndarray:
    return np.random.default_rng([slot, t]).normal(size=39)  # float64, as MetaWorldEnv returns it


def frame(value: int) -> np.ndarray:
    return np.full((SIZE, SIZE, 3), value, np.uint8)


class FakeSim:
    """2 workers, every episode STEPS steps; observations carry 'wrist_image' when wrist_camera is set."""

    def __init__(self, wrist_camera="gripperPOV"):
        self.settings = {"image_size": SIZE, **({"wrist_camera": wrist_camera} if wrist_camera else {})}
        self.t, self.seen = {}, {}

    def __len__(self):
        return 2

    def _obs(self, s):
        t = self.t[s]
        obs = {"image": frame(s), "state": env_state(s, t), "done": t >= STEPS, "success": False, "t": t}
        if "wrist_camera" in self.settings:
            obs["wrist_image"] = frame(100 + s + t)
        self.seen.setdefault(s, []).append(obs)
        return obs

    def broadcast(self, calls):
        out = {}
        for w, (cmd, kw) in calls.items():
            out[w] = {}
            if cmd == "reset":
                for s, *_ in kw["assignments"]:
                    self.t[s] = 0
                    out[w][s] = self._obs(s)
            else:
                for s in kw["actions"]:
                    self.t[s] += 1
                    out[w][s] = self._obs(s)
        return out


class Recorder:
    observation = ("image", "wrist_image", "state")

    def __init__(self):
        self.inputs = []

    def __call__(self, obs, instructions):
        self.inputs.append({k: np.array(v) for k, v in obs.items()})
        return np.zeros((len(instructions), 7), np.float32)


def test_policy_gets_wrist_image_and_proprio_like_the_demo_data():
    from vla_jax.sim.demos import DemoSpec, _to_rlds

    sim, policy = FakeSim(), Recorder()
    evaluate(policy, ["reach", "push"], 1, sim, batch_size=2, say=lambda s: None)
    assert len(policy.inputs) == STEPS
    spec = DemoSpec(tasks=("reach", "push"), wrist_camera="gripperPOV", proprio=True)
    for slot in (0, 1):
        seen = sim.seen[slot][:STEPS]  # the observations the policy acted on (the last one ends the episode)
        got_state = np.stack([c["state"][slot] for c in policy.inputs])
        want = np.stack([o["state"][:4] for o in seen]).astype(np.float32)  # hand xyz, gripper opening
        assert got_state.dtype == np.float32
        np.testing.assert_array_equal(got_state, want)
        np.testing.assert_array_equal(np.stack([c["wrist_image"][slot] for c in policy.inputs]),
                                      np.stack([o["wrist_image"] for o in seen]))
        np.testing.assert_array_equal(np.stack([c["image"][slot] for c in policy.inputs]),
                                      np.stack([o["image"] for o in seen]))
        # The data generator, given the same observations as an expert episode, writes the same values.
        ep = {"split": "train", "index": slot, "task": "reach-v3", "instruction": "reach the goal",
              "images": [o["image"] for o in seen], "wrist_images": [o["wrist_image"] for o in seen],
              "states": np.stack([o["state"] for o in seen]).astype(np.float32),
              "actions": np.zeros((STEPS, 7), np.float32)}
        steps = _to_rlds(ep, spec)["steps"]["observation"]
        np.testing.assert_array_equal(np.asarray(steps["state"]), got_state)
        np.testing.assert_array_equal(np.stack(steps["wrist_image"]), np.stack([o["wrist_image"] for o in seen]))


def test_second_camera_needs_the_workers_to_render_it():
    with pytest.raises(ValueError, match=r"takes 'wrist_image' but the simulator workers render no second camera"):
        evaluate(Recorder(), ["reach"], 1, FakeSim(wrist_camera=""), batch_size=1, say=lambda s: None)
    bad = Recorder()
    bad.observation = ("image", "depth")
    with pytest.raises(ValueError, match=r"asks for observation keys \['image', 'depth'\]"):
        evaluate(bad, ["reach"], 1, FakeSim(), batch_size=1, say=lambda s: None)


class StubPolicy:
    """What SimPolicy reads of a vla_jax Policy: cameras, spec.proprio_dim, predict(...).actions."""

    def __init__(self, cameras, proprio_dim):
        self.cameras, self.spec = cameras, types.SimpleNamespace(proprio_dim=proprio_dim)
        self.calls = []

    def predict(self, inputs, instructions, unnorm_key=None):
        self.calls.append((inputs, list(instructions), unnorm_key))
        return types.SimpleNamespace(actions=np.zeros((len(instructions), 7)))


def test_sim_policy_follows_the_checkpoint_spec(tmp_path):
    one = SimPolicy(StubPolicy(("primary",), None))
    assert one.observation == ("image",) and one.wrist_camera == ""
    two = SimPolicy(StubPolicy(("primary", "wrist"), 4), unnorm_key="metaworld_demo")
    assert two.observation == ("image", "wrist_image", "state") and two.wrist_camera == "gripperPOV"
    batch = {"image": np.zeros((2, SIZE, SIZE, 3), np.uint8), "wrist_image": np.ones((2, SIZE, SIZE, 3), np.uint8),
             "state": np.zeros((2, 4), np.float32)}
    two(batch, ["a", "b"])
    inputs, instructions, key = two.policy.calls[0]
    assert sorted(inputs) == ["primary", "state", "wrist"] and key == "metaworld_demo"
    assert inputs["wrist"] is batch["wrist_image"] and inputs["primary"] is batch["image"]
    # The checkpoint's own names win, by position (training paired image_keys with cameras in order).
    named = SimPolicy(StubPolicy(("image", "wrist_image"), None))
    assert named.observation == ("image", "wrist_image")
    assert sorted(named.inputs({"image": 0, "wrist_image": 1})) == ["image", "wrist_image"]
    with pytest.raises(ValueError, match=r"takes 3 cameras"):
        SimPolicy(StubPolicy(("primary", "left_wrist", "right_wrist"), None))
    with pytest.raises(ValueError, match=r"takes a 8-D proprio state; Meta-World's is 4-D"):
        SimPolicy(StubPolicy(("primary",), 8))
    # The wrist camera the training data was rendered with, when the checkpoint's data folder says so.
    (tmp_path / "generation.json").write_text(json.dumps({"spec": {"wrist_camera": "behindGripper"}}))
    assert recorded_wrist_camera(str(tmp_path)) == "behindGripper"
    assert SimPolicy(StubPolicy(("primary", "wrist"), None), data_dir=str(tmp_path)).wrist_camera == "behindGripper"
    assert recorded_wrist_camera(str(tmp_path / "missing")) is None and recorded_wrist_camera(None) is None
