"""Every config in configs/ builds (the 7B ones through jax.eval_shape only: no memory), configs are
locked, the analytic FLOPs agree with XLA's count, and `python -m vla_jax.plan` compiles the real
OpenVLA-7B train step for 8 simulated devices and reports per-device bytes."""

import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.training import metrics as mlib
from vla_jax.training import run
from vla_jax.training import state as st

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.name not in ("__init__.py", "common.py"))
OPENVLA_7B_PARAMS = 7_541_237_184  # VERIFIED_FACTS.md, from the released checkpoint's shapes
LORA_R32_PARAMS = 110_828_288      # OPENVLA_REFERENCE.md §9 (PEFT "all-linear", r=32)
VARIANTS = [(p.name, None) for p in CONFIG_FILES] + [
    ("finetune.py", "dataset=bridge_orig,lora=True"), ("finetune.py", "freeze_vision=True"),
    ("oft.py", "head=tokens,chunk=4,dataset=libero_goal_no_noops,steps=50000,decay=40000")]


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    cfg.lock()
    return cfg


def test_known_configs_exist():
    assert {"oxe.py", "finetune.py", "debug.py"} <= {p.name for p in CONFIG_FILES}


@pytest.mark.parametrize("name, arg", VARIANTS)
def test_config_builds_and_its_train_state_fits_the_mesh(name, arg):
    cfg = load(name, arg)
    assert cfg.num_steps > 0 and cfg.save_every > 0
    for key in ("learning_rate", "weight_decay", "b1", "b2", "eps", "grad_clip", "schedule"):
        assert key in cfg.optim
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0  # locked: a typo is an error
    if name in ("finetune.py", "oft.py"):
        with pytest.raises(ValueError, match="needs a starting checkpoint"):
            run.check_run_config(cfg)
        cfg.init_from = "/some/openvla-7b"
    run.check_run_config(cfg)
    model_cfg = run.model_config(cfg.model)
    mesh = run.make_mesh(cfg.mesh)
    run.check_batch_layout(cfg, mesh)
    model = OpenVLA(model_cfg)
    tx, _ = st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)
    hooks = run.param_hooks(cfg)
    example = run.example_inputs(run.batch_spec(cfg, model_cfg))
    mask = run.trainable(cfg, st.abstract_params(model, example, hooks), hooks)
    _, abstract = st.abstract_train_state(model, tx, mesh, shd.LOGICAL_RULES, cfg.seed, example, mask, hooks)
    summary = st.param_summary(abstract.params, mask)
    if cfg.model.preset == "openvla-7b":
        base = sum(summary[k] for k in ("dino", "siglip", "projector", "llm"))
        assert base == OPENVLA_7B_PARAMS
        if cfg.lora.enabled:
            head = summary.get("action_head", 0)  # OFT's L1 head trains in full beside the adapters
            assert (head > 0) == (cfg.model.action_head == "l1")
            if head:  # OFT_REFERENCE.md §6: the LIBERO head (D=7, width 4096)
                assert round(head / 1e6, 2) == 151.12
            proprio = summary.get("proprio_projector", 0)  # so does OFT's proprio projector
            assert (proprio > 0) == (cfg.model.proprio_dim > 0)
            if cfg.model.proprio_dim == 8:  # OFT_REFERENCE.md §7: 16.82M for LIBERO (the paper's "17M")
                assert proprio == 8 * 4096 + 4096 + 4096 * 4096 + 4096 and round(proprio / 1e6, 2) == 16.82
            assert summary["lora"] == LORA_R32_PARAMS
            extra = head + proprio
            assert 0.95 * LORA_R32_PARAMS + extra < summary["trainable"] <= LORA_R32_PARAMS + extra
        elif cfg.freeze.vision:
            assert summary["trainable"] == summary["projector"] + summary["llm"]
        else:  # everything but the never-run vision parameters
            assert 0.99 * OPENVLA_7B_PARAMS < summary["trainable"] < OPENVLA_7B_PARAMS
        # FSDP: no device holds a whole 7B weight matrix.
        emb = abstract.params["llm"]["embed_tokens"]["embedding"]
        assert emb.sharding.shard_shape(emb.shape) == (32064, 4096 // jax.device_count())


@pytest.mark.parametrize("cameras, proprio", [(1, 0), (2, 8)])
def test_analytic_forward_flops_match_xla_count(cameras, proprio):
    # One scanned layer per stack, so XLA's count (a scan body counted once) is the true count; XLA also
    # counts the element-wise work (norms, softmax, GELU) that the matmul-only formula leaves out. The
    # formula counts the whole causal score square (the model-FLOPs convention); attention in one block
    # (attention_query_block=0) computes exactly that, while CPU's default 64-row blocks skip the blocks
    # above the diagonal (at the two-camera length, 545 positions, XLA then counts 1.6% less).
    cfg = with_dtypes(get_preset("mid"), "float32")
    cfg = dataclasses.replace(cfg, execution=dataclasses.replace(cfg.execution, attention_query_block=0))
    cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, depth=2),
                              siglip=dataclasses.replace(cfg.siglip, depth=2),
                              llama=dataclasses.replace(cfg.llama, num_layers=1), num_images=cameras,
                              proprio_dim=proprio)
    model = OpenVLA(cfg)
    b, t, k = 2, 32, 8
    px = np.zeros((b, 224, 224, 3) if cameras == 1 else (b, cameras, 224, 224, 3), np.uint8)
    ids, pos = np.ones((b, t), np.int32), np.zeros((b, k), np.int32)
    pr = np.zeros((b, proprio), np.float32) if proprio else None
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), px, ids))
    xla = jax.jit(lambda p, x, i, q, r: model.apply(p, x, i, q, proprio=r)).lower(params, px, ids, pos, pr).cost_analysis()["flops"]
    ours = b * sum(mlib.forward_flops(cfg, t, k).values())
    assert 1.0 <= xla / ours < 1.03, (xla, ours)


@pytest.mark.slow
def test_plan_compiles_the_7b_step_for_simulated_devices(tmp_path):
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, "-m", "vla_jax.plan", "--config=configs/oxe.py", "--devices=8",
                          "--batch=8", f"--json={out}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "per device:" in res.stdout and "peak estimate" in res.stdout
    r = json.loads(out.read_text())
    pb = r["per_device_bytes"]
    assert r["params"] == OPENVLA_7B_PARAMS and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    # fp32 params, FSDP over 8: an eighth of 30.2 GB (a few small replicated leaves add < 1%).
    assert 1.0 <= pb["params"] / (OPENVLA_7B_PARAMS * 4 / 8) < 1.01
    # Adam: two fp32 moments per trainable parameter.
    assert 1.0 <= pb["optimizer_state"] / (r["trainable_params"] * 8 / 8) < 1.01
    # XLA's arguments are exactly the sharded state + batch shard (plus step, rng and Adam's counters).
    state_and_batch = pb["params"] + pb["optimizer_state"] + pb["batch"]
    assert 0 <= pb["xla_argument"] - state_and_batch < 1024
    assert pb["xla_temp"] > 1e9 and pb["peak_estimate"] > pb["xla_argument"]
    assert r["flops_per_step"] > 8 * 6 * OPENVLA_7B_PARAMS * 256 * 0.9  # >= ~6 N tokens for the LLM part
