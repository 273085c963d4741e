"""A policy trained by the debug config behaves like a trained policy (what README's eval example shows).

Trains `python train.py --config=configs/debug.py` for STEPS steps on the Bridge debug episodes
(~1500 steps are needed before the tiny from-scratch model fits them, so this is a slow test), then:
1. black, white and noise images give pairwise different actions;
2. offline evaluation (eval.py's code) on the training frames: the L1 error is under half the
   mean-action baseline's and the gripper is right on more than 90% of the frames.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # ~1500 train steps of the debug model through train.py

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 1500
INSTRUCTION = "put carrot on plate"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bridge_data_dir, llama_tokenizer_path):
    workdir = tmp_path_factory.mktemp("debug_trained")
    cmd = [sys.executable, "train.py", "--config=configs/debug.py", f"--workdir={workdir}",
           f"--config.data.data_dir={bridge_data_dir}", f"--config.tokenizer={llama_tokenizer_path}",
           f"--config.num_steps={STEPS}", "--config.log.progress=False", "--config.log.tensorboard=False"]
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def test_different_images_give_different_actions(trained):
    from vla_jax.policy import Policy

    policy = Policy.load(str(trained))
    s = 64  # any size: the policy resizes
    images = [np.zeros((s, s, 3), np.uint8), np.full((s, s, 3), 255, np.uint8),
              np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)]
    actions = policy.predict_actions(images, INSTRUCTION)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        assert np.abs(actions[i] - actions[j]).max() > 0, (i, j, actions)


def test_offline_eval_beats_the_mean_action_baseline(trained, bridge_data_dir, tmp_path):
    from vla_jax.evaluation import run_offline
    from vla_jax.policy import Policy

    policy = Policy.load(str(trained))
    rep = run_offline(policy, checkpoint=str(trained), data_dir=str(bridge_data_dir), dataset="bridge_dataset",
                      out_dir=str(tmp_path / "eval_train"), split="train", progress=False)
    m = rep["overall"]
    print({k: m[k] for k in ("frames", "action_token_accuracy", "l1_normalized", "gripper_accuracy")},
          "baseline", m["baseline_mean_action"]["l1_normalized"])
    assert m["l1_normalized"] < 0.5 * m["baseline_mean_action"]["l1_normalized"]
    assert m["gripper_accuracy"] > 0.9
