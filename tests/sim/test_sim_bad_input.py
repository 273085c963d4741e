"""Bad input to the simulation package: unknown tasks, rendering backends that cannot work, bad shapes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vla_jax.sim.closed_loop import run_evaluation
from vla_jax.sim.demos import DemoSpec
from vla_jax.sim.instructions import INSTRUCTIONS, resolve_task
from vla_jax.sim.metaworld_env import metaworld_to_openvla, openvla_to_metaworld
from vla_jax.sim.rendering import RenderContextError
from vla_jax.sim.worker import SimWorkers


def test_unknown_task_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown Meta-World task 'pick-up-banana'.*drawer-open.*window-open"):
        resolve_task("pick-up-banana")
    with pytest.raises(ValueError, match="valid tasks"):
        DemoSpec(tasks=("reach", "nope"))
    with pytest.raises(ValueError, match="valid tasks"):
        run_evaluation(None, ["nope"], 1, str(tmp_path), say=lambda m: None)
    assert resolve_task("reach") == resolve_task("reach-v3") == "reach-v3"


def test_instruction_table_covers_metaworld():
    """Every Meta-World v3 environment has exactly one instruction (names read from metaworld itself,
    in a child process: MuJoCo is kept out of this TensorFlow process)."""
    code = "import json, metaworld; print(json.dumps(sorted(metaworld.env_dict.ALL_V3_ENVIRONMENTS)))"
    env = dict(os.environ, MUJOCO_GL="egl")
    names = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                                      check=True).stdout.strip().splitlines()[-1])
    assert len(names) == 50
    assert sorted(n[: -len("-v3")] for n in names) == sorted(INSTRUCTIONS)


@pytest.mark.parametrize("backend", ["glfw", "not-a-backend"])
def test_rendering_backend_failure_says_which_mujoco_gl_to_try(backend, monkeypatch):
    """glfw without a display fails when the context is made; an unknown value fails at import.
    Either way the error reaches the caller (across the worker process) naming MUJOCO_GL values."""
    monkeypatch.setenv("MUJOCO_GL", backend)
    for var in ("DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RenderContextError) as err:
        SimWorkers(1, image_size=32)  # each worker renders a probe frame at start
    msg = str(err.value)
    assert f"MUJOCO_GL={backend!r}" in msg and "MUJOCO_GL=egl" in msg and "MUJOCO_GL=osmesa" in msg
    assert isinstance(err.value, ValueError)


def test_action_conversion_shapes_and_convention():
    with pytest.raises(ValueError, match=r"\[\.\.\., 4\]"):
        metaworld_to_openvla(np.zeros(7))
    with pytest.raises(ValueError, match=r"\[\.\.\., 7\]"):
        openvla_to_metaworld(np.zeros(4))
    # Meta-World grip +1 closes, -1 opens; OpenVLA gripper 0 = closed, 1 = open.
    a7 = metaworld_to_openvla(np.array([[0.1, -0.2, 2.0, 1.0], [0.0, 0.0, 0.0, -1.0]]))
    np.testing.assert_allclose(a7, [[0.1, -0.2, 1.0, 0, 0, 0, 0.0], [0, 0, 0, 0, 0, 0, 1.0]], atol=1e-7)
    a4 = np.random.default_rng(0).uniform(-1, 1, (100, 4))
    np.testing.assert_allclose(openvla_to_metaworld(metaworld_to_openvla(a4)), a4, atol=1e-6)
