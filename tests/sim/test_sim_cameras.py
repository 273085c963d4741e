"""Meta-World with a second camera and proprio: rendering, the state layout, and the 2-camera demo dataset.

Truth used: MuJoCo's own body positions (hand, fingers) read in a fresh process, plain TFDS reading
the written folder (no vla_jax code), and the default spec's fingerprint as the unmodified code
computed it (27a2027d8d870598: `DemoSpec().fingerprint()` before the options existed).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vla_jax.sim.demos import DemoSpec, dataset_config, generate
from vla_jax.sim.observation import policy_observation, proprio_from_obs
from vla_jax.sim.worker import SimWorkers

slow = pytest.mark.slow  # Meta-World rendering and expert episodes in worker processes

SIZE = 64
WRIST = "gripperPOV"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_spec_unchanged():
    assert DemoSpec().fingerprint() == "27a2027d8d870598"
    assert DemoSpec(wrist_camera=WRIST).fingerprint() != DemoSpec().fingerprint()
    assert DemoSpec(proprio=True).fingerprint() != DemoSpec().fingerprint()
    assert dataset_config(DemoSpec()) == {"name": "metaworld_demo", "image_key": "image",
                                          "standardize": "generic_eef_pos", "version": "1.0.0",
                                          "action_encoding": "EEF_POS", "gripper": "absolute"}
    with pytest.raises(ValueError, match="wrist_camera must differ"):
        DemoSpec(wrist_camera="corner")


@slow
def test_second_camera_renders_another_view():
    with SimWorkers(1, image_size=SIZE, max_steps=50, wrist_camera=WRIST) as sim:
        obs = sim.request(0, "reset", assignments=[(0, "push", "heldout", 0, True)])[0]
        for _ in range(5):
            action = sim.request(0, "expert_actions", slots=[0])[0]
            obs = sim.request(0, "step", actions={0: action}, render={0: True})[0]
    for key in ("image", "wrist_image"):
        assert obs[key].shape == (SIZE, SIZE, 3) and obs[key].dtype == np.uint8, key
        assert obs[key].std() > 5, f"{key} is blank"
    diff = np.abs(obs["image"].astype(np.int16) - obs["wrist_image"].astype(np.int16)).mean()
    assert diff > 20, f"the second camera shows the same picture as the primary (mean |diff| {diff:.1f})"
    pol = policy_observation(obs, wrist=True, proprio=True)
    assert set(pol) == {"image", "wrist_image", "state"}
    np.testing.assert_array_equal(pol["state"], obs["state"][:4].astype(np.float32))
    # The one-camera default has no wrist image and asking for it is a clear error.
    with SimWorkers(1, image_size=SIZE, max_steps=50) as sim:
        obs1 = sim.request(0, "reset", assignments=[(0, "push", "heldout", 0, True)])[0]
    assert "wrist_image" not in obs1
    with pytest.raises(ValueError, match="wrist_image"):
        policy_observation(obs1, wrist=True, proprio=False)


_STATE_PROBE = r"""
import json, os
os.environ.setdefault("MUJOCO_GL", "egl")
import numpy as np
from vla_jax.sim.metaworld_env import MetaWorldEnv
from vla_jax.sim.observation import proprio_from_obs
rows = []
for task in ("drawer-close", "push"):
    env = MetaWorldEnv(task, render=False, max_steps=60)
    obs = env.reset("heldout", 3, render=False)
    while not obs["done"]:
        data = env.unwrapped.data
        fingers = np.linalg.norm(data.body("rightclaw").xpos - data.body("leftclaw").xpos)
        rows.append({"hand": data.body("hand").xpos.tolist(), "fingers": float(fingers),
                     "proprio": proprio_from_obs(obs["state"]).tolist()})
        obs = env.step(env.expert_action(), render=False)
    env.close()
print(json.dumps(rows))
"""


@slow
def test_proprio_is_hand_position_and_finger_opening():
    env = dict(os.environ, PYTHONPATH=ROOT, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    out = subprocess.run([sys.executable, "-c", _STATE_PROBE], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(rows) > 50
    hand = np.array([r["hand"] for r in rows])
    opening = np.clip(np.array([r["fingers"] for r in rows]) / 0.1, 0.0, 1.0)
    proprio = np.array([r["proprio"] for r in rows])
    np.testing.assert_allclose(proprio[:, :3], hand, atol=1e-6)
    np.testing.assert_allclose(proprio[:, 3], opening, atol=1e-6)
    assert opening.max() - opening.min() > 0.1, "the gripper never moved: the probe would not catch a wrong index"
    with pytest.raises(ValueError, match="39"):
        proprio_from_obs(np.zeros(38))


@slow
def test_two_camera_proprio_dataset_reads_back_with_tfds(tmp_path):
    spec = DemoSpec(tasks=("reach",), episodes_per_task=2, val_episodes_per_task=0, image_size=SIZE,
                    max_steps=150, wrist_camera=WRIST, proprio=True)
    out = str(tmp_path / "data")
    summary = generate(out, spec, workers=1, say=lambda m: None)
    assert summary["episodes"] == {"train": 2}
    with open(os.path.join(out, "dataset_config.json")) as f:
        cfg = json.load(f)
    assert cfg == [{"name": "metaworld_demo", "image_key": "image", "standardize": "generic_eef_pos",
                    "version": "1.0.0", "action_encoding": "EEF_POS", "gripper": "absolute",
                    "image_keys": ["image", "wrist_image"], "proprio_key": "state"}]
    builder = tfds.builder_from_directory(os.path.join(out, spec.name, spec.version))
    episodes = list(tfds.as_numpy(builder.as_dataset(split="train")))
    assert len(episodes) == 2
    for ep in episodes:
        steps = list(ep["steps"])
        assert len(steps) > 5
        for s in steps:
            o = s["observation"]
            assert set(o) == {"image", "wrist_image", "state", "env_state"}
            assert o["image"].shape == o["wrist_image"].shape == (SIZE, SIZE, 3)
            assert o["image"].dtype == o["wrist_image"].dtype == np.uint8
            assert o["state"].shape == (4,) and o["state"].dtype == np.float32
            assert o["env_state"].shape == (39,)
            np.testing.assert_array_equal(o["state"], o["env_state"][:4])
            assert np.abs(o["image"].astype(np.int16) - o["wrist_image"].astype(np.int16)).mean() > 20
        # The hand moves during the episode: the state is per step, not a constant.
        hand = np.stack([s["observation"]["state"][:3] for s in steps])
        assert np.linalg.norm(hand[-1] - hand[0]) > 0.01
