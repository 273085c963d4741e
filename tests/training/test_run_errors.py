"""Errors name the flag that fixes them, a failed run leaves no empty folders, a warmup longer than a
short run is shortened, and `eval.py --checkpoint=RUN` alone finds the held-out split of the data
the checkpoint recorded (old checkpoints: an error naming the flags to pass)."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.policy.test_policy_helpers import model_config, random_params, stats_entry, write_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)  # one CPU device is enough in the subprocesses
    return env


def _debug_config(**overrides):
    from configs.debug import get_config

    cfg = get_config()
    for k, v in overrides.items():
        node = cfg
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return cfg


@pytest.mark.parametrize("tokenizer, what", [("", "config.tokenizer is empty"),
                                             ("/nonexistent/tokenizer.model", "is not a file")])
def test_missing_tokenizer_names_the_flag_and_where_to_get_one(tokenizer, what):
    from vla_jax.training import run

    cfg = _debug_config(tokenizer=tokenizer)
    with pytest.raises(ValueError) as err:
        run.make_data(cfg, run.model_config(cfg.model), 8, None)
    msg = str(err.value)
    assert what in msg and "--config.tokenizer=PATH/tokenizer.model" in msg
    assert "HF OpenVLA folder" in msg and "base Llama-2 folder" in msg


def test_unknown_dataset_names_the_flag_and_the_registered_datasets(llama_tokenizer_path):
    from vla_jax.data import oxe
    from vla_jax.data.pipeline import DataConfig, make_train_iterator

    with pytest.raises(ValueError) as err:
        make_train_iterator(DataConfig(data_dir="/tmp", mixture="my_robot_dataset"), str(llama_tokenizer_path))
    msg = str(err.value)
    assert "'my_robot_dataset' is neither a mixture nor a registered dataset" in msg
    assert "--config.data.dataset_configs=FILE.json" in msg
    assert all(name in msg for name in oxe.registered_datasets())


@pytest.mark.slow  # a train.py subprocess that builds the data pipeline and the step (~20 s alone)
def test_failed_train_run_leaves_no_empty_checkpoints_folder(tmp_path, bridge_data_dir, llama_tokenizer_path):
    workdir = tmp_path / "run"
    res = subprocess.run([sys.executable, "train.py", "--config=configs/debug.py", f"--workdir={workdir}",
                          f"--config.data.data_dir={bridge_data_dir}", f"--config.tokenizer={llama_tokenizer_path}",
                          "--config.data.mixture=my_robot_dataset", "--config.log.progress=False"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "--config.data.dataset_configs=FILE.json" in res.stderr, res.stderr[-3000:]
    assert not (workdir / "checkpoints").exists() and not workdir.exists()
    # A workdir that existed before keeps existing (only what the run created goes).
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    res = subprocess.run([sys.executable, "train.py", "--config=configs/debug.py", f"--workdir={workdir}",
                          f"--config.data.data_dir={bridge_data_dir}", "--config.tokenizer=",
                          "--config.log.progress=False"], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode != 0 and "--config.tokenizer=PATH/tokenizer.model" in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]


def test_warmup_longer_than_the_run_is_shortened_with_a_warning(caplog):
    from vla_jax.training import run, state as st

    cfg = _debug_config(num_steps=4)  # configs/debug.py warms up over 10 steps
    with pytest.raises(ValueError, match="warmup_steps=10 must be in"):
        st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)  # what stopped short runs
    with caplog.at_level(logging.WARNING):
        run.fit_warmup(cfg)
    assert cfg.optim.warmup_steps == 2
    assert "warmup_steps=10 is not shorter than config.num_steps=4: warming up over 2 steps" in caplog.text
    _, schedule = st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)
    lr = cfg.optim.learning_rate
    np.testing.assert_allclose([float(schedule(s)) for s in range(4)], [0.0, lr / 2, lr, lr], rtol=1e-6)
    untouched = _debug_config(num_steps=40)
    run.fit_warmup(untouched)
    assert untouched.optim.warmup_steps == 10


def _checkpoint_with_record(workdir, tokenizer_path, data_dir):
    """A random-weight checkpoint whose training_data record says it trained on the Bridge debug data."""
    from vla_jax.checkpoints import Checkpointer, load_assets

    cfg = model_config()
    write_checkpoint(str(workdir), cfg, random_params(cfg), {"bridge_dataset": stats_entry(0.01)}, str(tokenizer_path))
    assets = load_assets(str(workdir))
    state = {"params": random_params(cfg)}
    record = {"data_dir": str(data_dir), "mixture": "bridge_dataset", "split": "train",
              "mixture_weights": [["bridge_dataset", 1.0]],
              "datasets": [{"name": "bridge_dataset", "image_key": "image_0", "standardize": "bridge_orig"}],
              "dataset_configs_file": None, "tokenizer": str(tokenizer_path)}
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None, async_save=False)
    ck.save(2, state, {"process_count": 0, "states": []},
            {k: assets[k] for k in ("config", "dataset_statistics", "tokenizer")} | {"training_data": record},
            assets["meta"]["model"], force=True)
    ck.close()
    return workdir


@pytest.mark.slow  # trains a checkpoint, then an eval.py run (~18 s alone)
def test_eval_with_only_the_checkpoint(tmp_path, llama_tokenizer_path, bridge_data_dir):
    from vla_jax.evaluation.episodes import iter_episodes

    run = _checkpoint_with_record(tmp_path / "run", llama_tokenizer_path, bridge_data_dir)
    res = subprocess.run([sys.executable, str(REPO / "eval.py"), f"--checkpoint={run}", "--episodes=2",
                          "--plots=1", "--progress=false"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((run / "eval" / "report.json").read_text())
    assert (rep["dataset"], rep["split"], rep["data_dir"]) == ("bridge_dataset", "val", str(bridge_data_dir))
    held_out = list(iter_episodes(str(bridge_data_dir), "bridge_dataset", "val", 2))
    assert rep["per_dataset"]["bridge_dataset"]["frames"] == sum(len(e) for e in held_out) > 0
    assert rep["gripper_convention"] == "openvla" and (run / "eval" / rep["plots"][0]).exists()


def test_eval_of_a_checkpoint_without_the_record_names_the_flags(tmp_path, llama_tokenizer_path):
    cfg = model_config()
    old = write_checkpoint(str(tmp_path / "old"), cfg, random_params(cfg), {"bridge_dataset": stats_entry(0.01)},
                           str(llama_tokenizer_path))
    res = subprocess.run([sys.executable, str(REPO / "eval.py"), f"--checkpoint={old}"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "does not record its training data" in res.stderr and "--data_dir=FOLDER" in res.stderr
    assert "--dataset=NAME" in res.stderr and "--dataset_configs=FILE.json" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "old" / "eval").exists()
