"""`python train.py --config=configs/debug.py` end to end on the real Bridge debug episodes:
the tiny model overfits, SIGTERM saves and a restart continues with exactly the losses of an
uninterrupted run, and bad input stops before training with a message naming the numbers or keys
involved. (NaN handling: tests/training/test_train_loop.py.)

All runs share a persistent XLA compilation cache, so only the first one compiles. They use 2
simulated devices (a 1x2 FSDP mesh): enough to exercise sharded checkpoints, cheap on 2 cores."""

import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # trains the debug model through train.py several times

REPO = pathlib.Path(__file__).resolve().parents[2]
OVERFIT_STEPS = 60


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def debug_args(bridge_data_dir, llama_tokenizer_path, compile_cache):
    return ["--config=configs/debug.py", f"--config.data.data_dir={bridge_data_dir}",
            f"--config.tokenizer={llama_tokenizer_path}", "--config.log.progress=False",
            "--config.log.tensorboard=False", f"--config.compile_cache_dir={compile_cache}"]


def train_cmd(workdir, args, *overrides):
    return [sys.executable, "train.py", f"--workdir={workdir}", *args, *overrides]


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")


def run_train(workdir, args, *overrides, timeout=300):
    return subprocess.run(train_cmd(workdir, args, *overrides), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def checkpoint_steps(workdir):
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, debug_args):
    """Run A: OVERFIT_STEPS steps from scratch, one checkpoint at the end."""
    workdir = tmp_path_factory.mktemp("run_a")
    res = run_train(workdir, debug_args, f"--config.num_steps={OVERFIT_STEPS}", "--config.save_every=1000")
    assert res.returncode == 0, res.stderr[-3000:]
    return workdir


def test_debug_config_overfits_real_bridge_episodes(uninterrupted):
    rec = losses(uninterrupted)
    assert sorted(rec) == list(range(1, OVERFIT_STEPS + 1))
    first = np.mean([rec[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([rec[s]["loss"] for s in range(OVERFIT_STEPS - 4, OVERFIT_STEPS + 1)])
    acc_first = np.mean([rec[s]["action_accuracy"] for s in (1, 2, 3)])
    acc_last = np.mean([rec[s]["action_accuracy"] for s in range(OVERFIT_STEPS - 9, OVERFIT_STEPS + 1)])
    assert first > 9.0  # ~log(32064): an untrained model
    assert last < 0.5 * first, (first, last)
    assert acc_last > acc_first + 0.05, (acc_first, acc_last)
    # The checkpoint carries everything inference needs.
    step_dir = pathlib.Path(uninterrupted) / "checkpoints" / str(OVERFIT_STEPS)
    stats = json.loads((step_dir / "dataset_statistics" / "dataset_statistics.json").read_text())
    assert set(stats) == {"bridge_dataset"} and len(stats["bridge_dataset"]["action"]["q99"]) == 7
    tok = json.loads((step_dir / "tokenizer" / "tokenizer.json").read_text())
    assert tok["action_tokenizer"]["first_id"] == 31744 and tok["max_seq_len"] == 40
    cfg = json.loads((step_dir / "config" / "config.json").read_text())
    assert cfg["model"]["preset"] == "debug" and cfg["num_steps"] == OVERFIT_STEPS
    # The batch layout it trained on (configs/debug.py: 112 px, 40 text tokens, one dataset, no augmentation).
    spec = json.loads((step_dir / "batch_spec" / "batch_spec.json").read_text())
    assert (spec["image_size"], spec["text_len"], spec["num_datasets"], spec["test_center_crop"]) == (112, 40, 1, False)
    assert spec["cameras"] == ["primary"] and spec["proprio_dim"] is None
    assert spec["codec"] == {"action_dim": 7, "n_bins": 256, "base_vocab_size": 32000, "chunk_size": 1,
                             "decoding": "autoregressive", "head": "tokens"}


def test_sigterm_saves_and_restart_continues_with_identical_losses(uninterrupted, tmp_path, debug_args):
    workdir = tmp_path / "run_b"
    proc = subprocess.Popen(train_cmd(workdir, debug_args, f"--config.num_steps={OVERFIT_STEPS}",
                                      "--config.save_every=1000"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    (stopped,) = checkpoint_steps(workdir)
    assert 5 <= stopped < OVERFIT_STEPS and "preempted: saved step" in out + err
    assert max(losses(workdir)) == stopped

    # Restart the same command (shorter num_steps only to save test time): it resumes from `stopped`.
    end = min(stopped + 8, OVERFIT_STEPS)
    res = run_train(workdir, debug_args, f"--config.num_steps={end}", "--config.save_every=1000")
    assert res.returncode == 0, res.stderr[-3000:]
    ref, got = losses(uninterrupted), losses(workdir)
    assert sorted(got) == list(range(1, end + 1))  # no step repeated or skipped
    for s in range(stopped + 1, end + 1):
        assert got[s]["loss"] == ref[s]["loss"], (s, got[s]["loss"], ref[s]["loss"])
        assert got[s]["grad_norm"] == ref[s]["grad_norm"]
    assert checkpoint_steps(workdir) == [stopped, end]


def test_several_steps_per_call_follow_the_uninterrupted_run(uninterrupted, tmp_path, debug_args):
    """steps_per_call=4 with save_every=6 over 12 steps: calls of 4 steps where no checkpoint falls
    inside (1-4, 7-10), single steps in between (5, 6, 11, 12); every step logged, checkpoints at 6 and 12,
    and the losses those of the one-step-per-call run A (the same batches in the same order; the
    scanned program may round differently, so not bit for bit)."""
    workdir = tmp_path / "run_c"
    res = run_train(workdir, debug_args, "--config.num_steps=12", "--config.save_every=6", "--config.steps_per_call=4")
    assert res.returncode == 0, res.stderr[-3000:]
    ref, got = losses(uninterrupted), losses(workdir)
    assert sorted(got) == list(range(1, 13)) and checkpoint_steps(workdir) == [6, 12]
    for s in got:
        np.testing.assert_allclose(got[s]["loss"], ref[s]["loss"], rtol=1e-5, err_msg=f"step {s}")
        np.testing.assert_allclose(got[s]["grad_norm"], ref[s]["grad_norm"], rtol=1e-4, err_msg=f"step {s}")


def _snapshot(workdir):
    return {str(p): p.stat().st_mtime_ns for p in pathlib.Path(workdir).rglob("*")}


@pytest.mark.parametrize("overrides, message", [
    (["--config.global_batch_size=7"],
     r"global_batch_size=7 must be divisible by the data-parallel size \(2 = mesh data 1 x fsdp 2\)"),
    (["--config.mesh.data=3", "--config.mesh.fsdp=2"],
     r"config.mesh \(data=3, fsdp=2, tensor=1\) does not fit the 2 devices"),
    (["--config.optim.lr=0.1"], r"--config.optim.lr: config.optim has no key 'lr'"),
])
def test_bad_input_stops_before_training(tmp_path, debug_args, overrides, message):
    res = run_train(tmp_path / "bad", debug_args, *overrides, timeout=120)
    assert res.returncode != 0
    assert re.search(message, res.stdout + res.stderr), (res.stdout + res.stderr)[-3000:]
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
    assert checkpoint_steps(tmp_path / "bad") == []


def test_checkpoint_of_another_geometry_is_refused(uninterrupted, debug_args):
    before = _snapshot(uninterrupted)
    res = run_train(uninterrupted, debug_args, "--config.model.preset=tiny", f"--config.num_steps={OVERFIT_STEPS + 5}",
                    timeout=120)
    assert res.returncode != 0
    err = res.stdout + res.stderr
    assert "does not match this run: model geometry differs" in err, err[-3000:]
    assert "llama.hidden_size: 128 in the checkpoint vs 64 now" in err
    assert "state leaves differ in shape" in err
    assert _snapshot(uninterrupted) == before  # nothing written or overwritten
