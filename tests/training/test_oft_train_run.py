"""OpenVLA-OFT through train.py: a short run on the real Bridge debug episodes (K=4, L1 head) lowers
the L1 loss and writes a checkpoint whose batch_spec asset carries the OFT codec; bad OFT settings
stop the run with errors naming the values; the 'step' schedule is torch's MultiStepLR."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from vla_jax.training import run
from vla_jax.training import state as st
from tests.training.test_run_errors import _debug_config

REPO = pathlib.Path(__file__).resolve().parents[2]
OFT_FLAGS = ["--config.model.parallel_decoding=True", "--config.model.chunk_size=4", "--config.model.action_head=l1",
             "--config.data.action_chunk=4", "--config.data.max_seq_len=64"]


@pytest.mark.slow  # a 12-step train.py run (~45 s alone); the OFT loss and step are checked fast in test_oft_train_step.py
def test_short_oft_run_learns_and_records_the_codec(tmp_path, bridge_data_dir, llama_tokenizer_path):
    workdir = tmp_path / "oft"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, "train.py", "--config=configs/debug.py", f"--workdir={workdir}",
                          f"--config.data.data_dir={bridge_data_dir}", f"--config.tokenizer={llama_tokenizer_path}",
                          *OFT_FLAGS, "--config.num_steps=12", "--config.save_every=12",
                          "--config.optim.schedule=constant", "--config.log.progress=False",
                          "--config.log.tensorboard=False"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(r["supervised_tokens"] == 8 * 4 * 7 for r in recs)  # L1 over B x K x D values
    first, last = np.mean([r["loss"] for r in recs[:3]]), np.mean([r["loss"] for r in recs[-4:]])
    assert last < 0.8 * first, (first, last)
    spec = json.loads(next((workdir / "checkpoints" / "12").rglob("batch_spec.json")).read_text())
    assert spec["codec"] == {"action_dim": 7, "n_bins": 256, "base_vocab_size": 32000, "chunk_size": 4,
                             "decoding": "parallel", "head": "l1"}
    assert spec["text_len"] == 64


def test_data_chunk_must_match_the_model_chunk():
    cfg = _debug_config(**{"model.parallel_decoding": True, "model.chunk_size": 4, "model.action_head": "l1",
                           "data.action_chunk": 8})
    with pytest.raises(ValueError, match=r"config.data.action_chunk=8 but config.model.chunk_size=4"):
        run.batch_spec(cfg, run.model_config(cfg.model))
    cfg = _debug_config(**{"model.parallel_decoding": True, "model.chunk_size": 1, "model.action_head": "l1",
                           "data.action_chunk": 4})
    with pytest.raises(ValueError, match=r"config.data.action_chunk=4 but config.model.chunk_size=1"):
        run.batch_spec(cfg, run.model_config(cfg.model))


@pytest.mark.parametrize("model, message", [
    (dict(parallel_decoding=False, chunk_size=1, action_head="l1"), r"action_head='l1'.*needs parallel_decoding=True"),
    (dict(parallel_decoding=False, chunk_size=4, action_head="tokens"), r"chunk_size=4 needs parallel_decoding=True"),
    (dict(parallel_decoding=True, chunk_size=4, action_head="mse"), r"action_head='mse'"),
])
def test_invalid_head_and_decoding_combinations_name_the_values(model, message):
    cfg = _debug_config(**{f"model.{k}": v for k, v in model.items()})
    with pytest.raises(ValueError, match=r"config.model \(parallel_decoding=.*" + message):
        run.model_config(cfg.model)


def test_step_schedule_is_torch_multisteplr():
    opt = st.OptimConfig(learning_rate=5e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0,
                         schedule="step", decay_steps=7, decay_factor=0.1)
    sched = st.make_schedule(opt, 20)
    p = torch.nn.Parameter(torch.zeros(1))
    torch_opt = torch.optim.AdamW([p], lr=5e-4)
    torch_sched = torch.optim.lr_scheduler.MultiStepLR(torch_opt, milestones=[7], gamma=0.1)
    for step in range(20):  # the lr used by optimizer step `step` (counted from 0, as upstream's loop)
        np.testing.assert_allclose(float(sched(step)), torch_opt.param_groups[0]["lr"], rtol=1e-6)
        torch_opt.step()
        torch_sched.step()
    with pytest.raises(ValueError, match=r"decay_steps=3 must be > warmup_steps=5"):
        st.make_schedule(st.OptimConfig(**{**opt.__dict__, "decay_steps": 3, "warmup_steps": 5}), 20)
