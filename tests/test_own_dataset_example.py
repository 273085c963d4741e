"""examples/own_dataset/run.sh end to end at small size: recordings -> a tfds GeneratorBasedBuilder
RLDS dataset -> registered by JSON -> inspect -> train (4 steps of the debug model: its 10-step warmup
is shortened) -> eval.py with only --checkpoint -> serve -> a deploy.py-style client, in OpenVLA's and
in the dataset's gripper convention."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_dataset"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # trains, evaluates and serves in subprocesses: ~2.5 min on 2 cores
def test_own_dataset_example_runs_end_to_end(tmp_path):
    work = tmp_path / "my_robot"
    env = dict(os.environ, WORK=str(work), STEPS="4", PORT=str(_free_port()), PYTHON=sys.executable,
               JAX_PLATFORMS="cpu", TRAIN_FLAGS="--config.model.image_size=56 --config.log.tensorboard=false",
               PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one CPU device
    res = subprocess.run(["bash", str(EXAMPLE / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    out = res.stdout

    # The dataset: built by the tfds builder, both splits, read through the JSON registration.
    info = json.loads((work / "data" / "my_robot_dataset" / "1.0.0" / "dataset_info.json").read_text())
    assert {s["name"]: int(s["shardLengths"][0]) for s in info["splits"]} == {"train": 12, "val": 4}
    assert "episodes 16, frames 320" in out and "'pick up the" in out
    assert (work / "inspect" / "my_robot_dataset_frames.png").stat().st_size > 5000

    # The warmup of configs/debug.py (10 steps) was shortened for the 4-step run, with a warning.
    assert "warmup_steps=10 is not shorter than config.num_steps=4: warming up over 2 steps" in res.stderr
    # The checkpoint recorded what it trained on: the JSON file's content, not only its path.
    step = work / "run" / "checkpoints" / "4"
    record = json.loads((step / "training_data" / "training_data.json").read_text())
    assert record["data_dir"] == str(work / "data") and record["mixture"] == "my_robot_dataset"
    assert record["dataset_configs_file"]["content"] == (EXAMPLE / "dataset_config.json").read_text()
    assert [d["gripper"] for d in record["datasets"]] == ["absolute_inverted"]
    assert json.loads((step / "config" / "config.json").read_text())["optim"]["warmup_steps"] == 2

    # eval.py --checkpoint=RUN: the held-out split (val: 4 episodes x 20 steps) of the training data.
    report = json.loads((work / "run" / "eval" / "report.json").read_text())
    assert (report["dataset"], report["split"]) == ("my_robot_dataset", "val")
    assert report["per_dataset"]["my_robot_dataset"]["frames"] == 80

    # The served actions, as a deploy.py client got them: OpenVLA's gripper (1 = open) and the dataset's
    # own (registered absolute_inverted: 1 = close), the motion identical.
    lines = [json.loads(line) for line in out.splitlines() if line.startswith('{"instruction"')]
    assert [x["gripper"] for x in lines] == ["openvla", "dataset"]
    openvla, dataset = (np.array(x["action"]) for x in lines)
    assert openvla.shape == (7,) and lines[0]["instruction"].startswith("pick up the")
    np.testing.assert_array_equal(dataset[:6], openvla[:6])
    np.testing.assert_allclose(dataset[6], 1.0 - openvla[6], atol=1e-5)  # the client prints 5 decimals
