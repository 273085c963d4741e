"""Guard rail: the real train step at full OpenVLA-7B width (both full vision towers, the projector, the
32064-row embedding and lm_head) with 2 Llama layers instead of 32, compiled by the TPU compiler (libtpu)
for a v5e-4 slice (v5e:2x2) with configs/oxe.py's mesh rules, AdamW and remat. No TPU is needed.

Asserts: it compiles for 4 TPU v5 lite chips; every parameter and optimizer-state leaf has the sharding
in tests/golden/plan_tpu_v5e4_shardings.txt (a rules change shows up as a diff; regenerate with
VLA_JAX_UPDATE_GOLDEN=1 after checking the diff is intended); FSDP leaves no chip holding a whole large
tensor; the per-chip peak stays within the bound below; the compiled matmul FLOPs agree with the analytic
count once remat's recomputed forward is added. One compile: the file took 26 min on a 2-core CPU shared
with six other jobs (not timed idle; the full 7B step compiles in 79 s there)."""

import difflib
import importlib.util
import os
import pathlib

import numpy as np
import pytest

from tests.plan.test_plan_tpu_units import require_libtpu

REPO = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "plan_tpu_v5e4_shardings.txt"
LLAMA_LAYERS, BATCH = 2, 8  # 2 examples per chip


def _oxe_config():
    spec = importlib.util.spec_from_file_location("cfg_oxe_plan", REPO / "configs" / "oxe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(None)
    cfg.lock()
    return cfg


@pytest.fixture(scope="module")
def plan():
    require_libtpu()
    from vla_jax.plan import chips, planner

    devs = chips.devices(chips.parse("v5e-4"))
    return planner.train_plan(_oxe_config(), devs, "v5e-4", batch=BATCH, llama_layers=LLAMA_LAYERS,
                              keep_compiled=True)


def test_compiles_for_the_tpu_slice(plan):
    assert plan["devices"] == 4 and plan["device_kind"] == "TPU v5 lite"
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert plan["activation_constraints"]


def test_every_state_leaf_has_the_golden_sharding(plan):
    from vla_jax.plan import train_program

    prog, compiled = plan["_program"], plan["_compiled"]
    table = train_program.sharding_table(prog, compiled)
    # The compiled program takes the state exactly as the rules table asked.
    assert table == train_program.sharding_table(prog)
    if os.environ.get("VLA_JAX_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("\n".join(table) + "\n")
    golden = GOLDEN.read_text().splitlines()
    diff = "\n".join(difflib.unified_diff(golden, table, "golden", "compiled", lineterm="", n=0))
    assert table == golden, f"sharding of the train state changed (VLA_JAX_UPDATE_GOLDEN=1 to accept):\n{diff}"


def test_fsdp_leaves_no_chip_a_whole_large_tensor(plan):
    import jax

    state = plan["_program"].abstract_state
    for part in (state.params, state.opt_state):
        for path, leaf in jax.tree_util.tree_flatten_with_path(part)[0]:
            if leaf.size >= 2 ** 20:
                shard = leaf.sharding.shard_shape(leaf.shape)
                assert int(np.prod(shard)) * 4 == leaf.size, (jax.tree_util.keystr(path), leaf.shape, shard)


def test_per_chip_peak_within_bound(plan):
    pb = plan["per_device_bytes"]
    n_params, n_train = plan["params"], plan["trainable_params"]
    # State per chip from the parameter counts alone: fp32 weights + two fp32 Adam moments, over 4 chips.
    state = (4 * n_params + 8 * n_train) / 4
    assert 1.0 <= (pb["params"] + pb["optimizer_state"]) / state < 1.01
    # The bound: state + fp32 gradients (one more copy of the trainable weights) + 2 GB of activations
    # and collective buffers for 2 examples per chip (7.46 GB of 7.76 measured); and within a v5e chip's 16 GB.
    bound = state + 4 * n_train / 4 + 2.0e9
    assert pb["xla_argument"] <= pb["peak"] <= bound, (pb["peak"], bound)
    assert plan["fit"]["fits"] and plan["fit"]["hbm_bytes"] == 16e9


def test_compiled_flops_match_the_analytic_count_plus_remat(plan):
    # Loops: the scanned blocks forward and backward (DINOv2 24 - 1, SigLIP 27 - 1 blocks run, 2 Llama layers).
    trips = sorted(n for _, n in plan["compiled_loops"])
    assert trips == sorted([23, 23, 26, 26, LLAMA_LAYERS, LLAMA_LAYERS]), trips
    # Remat recomputes each rematerialised block's forward once in the backward pass: model FLOPs are 3x
    # the forward, the compiled program ~4x for those parts.
    ratio = plan["compiled_flops_per_device"] / plan["flops_per_device_per_step"]
    assert 1.15 < ratio < 1.40, ratio


def test_a_plan_that_does_not_fit_says_by_how_much_and_what_would(plan):
    from vla_jax.plan import planner, report

    small = dict(plan, fit=planner.fit_verdict(plan["per_device_bytes"]["peak"], 6e9))
    small["chip"] = dict(plan["chip"], hbm_bytes=6e9)
    small["fit"]["suggestion"] = planner.suggest_batch(small, 6e9)
    text = report.format_train(small)
    over = (plan["per_device_bytes"]["peak"] - 6e9) / 1e9
    assert f"DOES NOT FIT: over by {over:.2f} GB" in text
    assert "the state alone does not fit" in text or "--grad_accum=" in text
