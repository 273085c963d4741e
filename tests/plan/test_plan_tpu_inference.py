"""Inference plans and out-of-HBM reports compiled by the TPU compiler (libtpu, no TPU), fast: the OFT single
pass of configs/oft.py (K=8, L1 head) at the 'debug' preset on one v5e chip and tensor-parallel over a v5e-4
slice, checked against the analytic matmul count (vla_jax.training.metrics' formulas plus the L1 head written
out here) and against the weights' own size; a program larger than a chip's HBM, which the TPU compiler
refuses, comes back as a plan that does not fit with the compiler's own numbers.
The two OFT compiles are marked slow (debug-model TPU compiles: 217 s for the file with the 2 cores
shared by a 7B compile and other jobs, 41 s of CPU); the rest takes seconds."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

from tests.plan.test_plan_tpu_units import require_libtpu
from vla_jax.plan import aot

REPO = pathlib.Path(__file__).resolve().parents[2]
TEXT_LEN = 16
GIB = 2 ** 30


def _config(name, preset, arg=None):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}_plan_inf", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(arg)
    cfg.model.preset = preset
    cfg.lock()
    return cfg


def _devices(name):
    require_libtpu()
    from vla_jax.plan import chips

    return chips.devices(chips.parse(name))


def _oft(devices, mesh, batch):
    from vla_jax.plan import oft_inference, planner

    r = oft_inference.compile_oft_predict(devices, _config("oft", "debug", "cameras=1,proprio=0").model, mesh, batch,
                                          TEXT_LEN)  # one camera: the analytic count below is written for one
    return planner.inference_verdicts(r, budget_gb=0.001, passes=1)


@pytest.fixture(scope="module")
def one_chip():
    return _oft(_devices("v5e-1"), (1, 1, 1), 2)


@pytest.fixture(scope="module")
def four_chips():
    return _oft(_devices("v5e-4"), (1, 1, 4), 2)


def _analytic_forward_flops(batch):
    """Matmul FLOPs of the debug OFT model's single pass, from the geometry: towers and projector as
    metrics.forward_flops counts them; the Llama over BOS + 256 patches + the rest of the prompt + 56
    slots + </s> with the whole (bidirectional) score square; the L1 head per chunk step: LN ->
    Linear(7*H -> H) -> 2 x Linear(H -> H) -> Linear(H -> 7), no lm_head."""
    from vla_jax.models.config import get_preset
    from vla_jax.training import metrics

    cfg = get_preset("debug")
    s = TEXT_LEN + 56 + 1 + cfg.num_patches
    towers = metrics.vit_forward_flops(cfg.dino) + metrics.vit_forward_flops(cfg.siglip)
    proj = metrics.projector_forward_flops(cfg)
    ll = cfg.llama
    d, hd = ll.hidden_size, ll.hidden_size // ll.num_heads
    layer = 2 * s * d * hd * 4 * ll.num_heads + 2 * 2 * s * s * d + 2 * 3 * s * d * ll.intermediate_size
    head = 8 * 2 * (7 * d * d + 2 * d * d + d * 7)
    return batch * (towers + proj + ll.num_layers * layer + head)


# Each of these compiles the debug model for TPU (~20 s of CPU each; 80-120 s wall with the 2 cores shared).
@pytest.mark.slow
def test_oft_single_pass_on_one_chip_is_the_analytic_forward(one_chip):
    r = one_chip
    assert (r["program"], r["chunk_size"], r["action_head"], r["devices"]) == ("oft_predict", 8, "l1", 1)
    assert r["actions_per_call"] == 2 * 8 and r["sequence_len"] == 256 + TEXT_LEN + 57
    # Every matmul of the pass is counted once: no remat, no decoding loop; the three layer stacks are scans.
    assert abs(r["compiled_flops_per_device"] / _analytic_forward_flops(2) - 1) < 0.01
    assert sorted(n for _, n in r["compiled_loops"]) == [2, 2, 2]
    assert r["compiled_collective_bytes_per_device"] == 0
    # The weights are 2 bytes x the parameter count; XLA takes as arguments only those the pass uses: no
    # lm_head (the L1 head reads the hidden states; 32064 x 128 x 2 B), no SigLIP pooling head or last blocks
    # (small here), plus the inputs, in the TPU's padded layouts (a few percent).
    pb = r["per_device_bytes"]
    assert pb["params"] == 2 * r["params"]
    used = pb["params"] - 32064 * 128 * 2 + pb["inputs"]
    assert abs(pb["xla_argument"] / used - 1) < 0.05, (pb["xla_argument"], used)
    assert r["fit"]["fits"] and not r["budget"]["fits"]
    e = r["estimate"]
    assert e["actions_per_s"] == pytest.approx(16 / e["roofline_s"])
    assert e["weight_stream_s"] == pytest.approx(pb["params"] / 819e9)


@pytest.mark.slow
def test_oft_single_pass_tensor_parallel_splits_weights_and_work(one_chip, four_chips):
    one, four = one_chip, four_chips
    assert four["mesh"] == {"data": 1, "fsdp": 1, "tensor": 4} and four["devices"] == 4
    # Heads, MLP width, vocabulary and the head's width are split 4 ways; norms, biases and the patch
    # embeddings stay whole, so a chip holds a little more than a quarter.
    assert 0.25 < four["per_device_bytes"]["params"] / one["per_device_bytes"]["params"] < 0.35
    assert 0.25 < four["compiled_flops_per_device"] / one["compiled_flops_per_device"] < 0.40
    assert four["compiled_collective_bytes_per_device"] > 0


def test_oft_program_needs_an_oft_config():
    from vla_jax.plan import oft_inference

    with pytest.raises(ValueError, match="needs a config with config.model.parallel_decoding=True.*predict_action"):
        oft_inference.oft_model_config(_config("oxe", "debug").model)


def test_a_program_beyond_the_chip_is_reported_with_the_compilers_numbers():
    from jax.sharding import NamedSharding, PartitionSpec

    devs = _devices("v5e-1")
    mesh = jax.sharding.Mesh(devs, ("d",))
    x = jax.ShapeDtypeStruct((9 * GIB,), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled, oom = aot.compile_or_oom(jax.jit(lambda a: a * 2).lower(x))
    assert compiled is None
    # Argument and result: 2 x 18 GiB, against a v5e chip's 16 GiB less what the runtime keeps.
    assert oom["needed_bytes"] == 36 * GIB
    assert 15 * GIB < oom["capacity_bytes"] <= 16 * GIB
    assert oom["over_bytes"] == oom["needed_bytes"] - oom["capacity_bytes"]
    # An argument that fits compiles as usual.
    y = jax.ShapeDtypeStruct((GIB,), jnp.bfloat16, sharding=NamedSharding(mesh, PartitionSpec()))
    compiled, oom = aot.compile_or_oom(jax.jit(lambda a: a * 2).lower(y))
    assert oom is None and compiled.memory_analysis().argument_size_in_bytes == 2 * GIB


def test_hbm_refusal_message_parses_and_other_errors_do_not():
    # libtpu 0.0.42.1's wording (seen from the compile above); its 'G' is GiB.
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (17.51G) "
           "exceeds available HBM (15.75G).")
    oom = aot.parse_hbm_oom(msg)
    assert oom["needed_bytes"] == pytest.approx(17.51 * GIB)
    assert oom["capacity_bytes"] == pytest.approx(15.75 * GIB)
    assert oom["over_bytes"] == pytest.approx(1.76 * GIB)
    assert oom["message"] == msg
    assert aot.parse_hbm_oom("INVALID_ARGUMENT: shapes do not match") is None
    assert aot.parse_hbm_oom("RESOURCE_EXHAUSTED: out of host memory") is None


@pytest.mark.slow  # one TPU compile of the debug train step (minutes of wall time with the 2 cores shared)
def test_a_train_step_beyond_the_chip_does_not_fit_by_the_compilers_count():
    from vla_jax.plan import planner, report

    cfg = _config("debug", "debug")
    r = planner.train_plan(cfg, _devices("v5e-1"), "v5e-1", batch=8192)
    oom, fit, pb = r["compiler_oom"], r["fit"], r["per_device_bytes"]
    assert not fit["fits"] and fit["margin_bytes"] == -oom["over_bytes"] < 0
    assert pb["peak"] == oom["needed_bytes"] > oom["capacity_bytes"]
    # The state and batch shards come from the shardings; the rest of what the compiler needed is activations.
    assert pb["xla_argument"] == pb["params"] + pb["optimizer_state"] + pb["batch"]
    assert pb["xla_temp"] == pytest.approx(pb["peak"] - pb["xla_argument"])
    micro = fit["suggestion"]["micro_batch_per_chip"]
    assert 1 <= micro < 8192 and fit["suggestion"]["grad_accum_steps"] == 8192 // micro
    text = report.format_train(r)
    assert f"DOES NOT FIT: over by {oom['over_bytes'] / 1e9:.2f} GB" in text and "refused the program" in text
    assert "estimate" not in r  # no program, no roofline
