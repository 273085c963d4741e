"""vla_jax.plan's parts, fast: the compiled-HLO FLOP counter against hand-counted matmuls (on XLA:CPU and,
with libtpu, on the TPU compiler), slice names, mesh checks, the libtpu-missing message and the CLI's
bad-input errors. The compile of the 7B-width model for a TPU slice is tests/plan/test_plan_tpu_compile.py."""

import importlib.util
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vla_jax.plan import chips, hlo_cost, planner

REPO = pathlib.Path(__file__).resolve().parents[2]
L, B, D = 5, 8, 64


def require_libtpu():
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("the TPU compile tests need the `libtpu` package next to jax (pip install \"libtpu==0.0.42.*\", "
                    "pinned in requirements.txt)", pytrace=False)


def _scanned_grad():
    """d/dw of sum(tanh(... tanh(x @ w_0) ... @ w_{L-1})) with the L layers in one lax.scan."""
    def f(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0].sum()
    return jax.jit(jax.grad(f))


# Forward: L matmuls [B,D]x[D,D]; backward: per layer dx and dw, two more of the same size.
EXPECTED_FLOPS = 3 * L * 2 * B * D * D


def test_hlo_flops_count_every_loop_iteration_on_cpu():
    compiled = _scanned_grad().lower(jax.ShapeDtypeStruct((L, D, D), jnp.float32),
                                     jax.ShapeDtypeStruct((B, D), jnp.float32)).compile()
    r = hlo_cost.analyze(compiled.as_text())
    assert r["flops"] == EXPECTED_FLOPS
    assert sorted(n for _, n in r["loops"]) == [L, L]
    # XLA's own count takes each loop body once: the reason hlo_cost exists.
    assert compiled.cost_analysis()["flops"] < EXPECTED_FLOPS / 2


def test_hlo_flops_count_every_loop_iteration_on_tpu():
    require_libtpu()
    from jax.sharding import NamedSharding, PartitionSpec as P

    devs = chips.devices(chips.parse("v5e:2x2"))
    mesh = jax.sharding.Mesh(np.asarray(devs).reshape(4), ("d",))
    w = jax.ShapeDtypeStruct((L, D, D), jnp.float32, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((4 * B, D), jnp.float32, sharding=NamedSharding(mesh, P("d")))
    compiled = _scanned_grad().lower(w, x).compile()
    assert compiled.input_shardings[0][1].spec == P("d")
    r = hlo_cost.analyze(compiled.as_text())
    # Per chip: a quarter of the batch rows, the same matmuls.
    assert r["flops"] == EXPECTED_FLOPS
    assert [n for _, n in r["loops"]].count(L) >= 2


@pytest.mark.parametrize("name, topology, num_chips, kind", [
    ("v5p-128", "v5p:4x4x4", 64, "TPU v5"), ("v5e-16", "v5e:4x4", 16, "TPU v5 lite"),
    ("v5litepod-4", "v5e:2x2", 4, "TPU v5 lite"), ("v4-8", "v4:2x2x1", 4, "TPU v4"),
    ("v6e-256", "v6e:16x16", 256, "TPU v6 lite"), ("v5e-1", "v5e:1x1", 1, "TPU v5 lite"),
    ("v5p:2x2x2", "v5p:2x2x2", 8, "TPU v5")])
def test_slice_names_map_to_topologies(name, topology, num_chips, kind):
    t = chips.parse(name)
    assert (t.topology, t.num_chips, t.chip.device_kind) == (topology, num_chips, kind)


@pytest.mark.parametrize("bad", ["v5p-100", "v7x-8", "tpu", "v4-6", "v5e-3"])
def test_unknown_topology_lists_the_known_ones(bad):
    with pytest.raises(ValueError, match=f"unknown TPU topology {bad!r}; known: .*v5e-16.*v5p-128"):
        chips.parse(bad)
    with pytest.raises(ValueError, match="v5e slices are 2-D"):
        chips.parse("v5e:2x2x2")


def test_mesh_that_does_not_divide_the_chips_names_the_axis():
    assert planner.check_mesh((1, -1, 4), 64, "v5p-128") == (1, 16, 4)
    with pytest.raises(ValueError, match="mesh axis 'tensor'=3 does not divide the 64 chips of v5p-128"):
        planner.check_mesh((1, -1, 3), 64, "v5p-128")
    with pytest.raises(ValueError, match="mesh axis 'data'=5"):
        planner.check_mesh((5, 2, 1), 16, "v5e-16")
    with pytest.raises(ValueError, match="= 8 chips, but v5e-16 has 16"):
        planner.check_mesh((2, 2, 2), 16, "v5e-16")


def test_missing_libtpu_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    with pytest.raises(RuntimeError, match=r"install the `libtpu` package"):
        chips.devices(chips.parse("v5e-4"))


def _plan_cli(*args, block_libtpu=False):
    code = ("import sys, runpy\n"
            + ("class _Block:\n    def find_spec(self, name, *a):\n"
               "        if name == 'libtpu': raise ModuleNotFoundError('blocked libtpu')\n"
               "sys.meta_path.insert(0, _Block())\n" if block_libtpu else "")
            + "sys.argv = ['vla_jax.plan'] + sys.argv[1:]\nrunpy.run_module('vla_jax.plan', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_cli_bad_topology_and_mesh_are_clear_errors():
    res = _plan_cli("--config=configs/oxe.py", "--topology=v5p-100")
    assert res.returncode != 0 and "unknown TPU topology 'v5p-100'" in res.stderr and "v5p-128" in res.stderr
    res = _plan_cli("--config=configs/oxe.py", "--topology=v5e-16", "--mesh=1,-1,3")
    assert res.returncode != 0 and "mesh axis 'tensor'=3 does not divide the 16 chips" in res.stderr


@pytest.mark.slow  # a planner subprocess compiling the debug step for simulated CPU devices (~25 s alone)
def test_cpu_devices_mode_needs_no_libtpu():
    res = _plan_cli("--config=configs/debug.py", "--devices=2", "--batch=2", block_libtpu=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 simulated CPU devices" in res.stdout and "per device:" in res.stdout and "peak estimate" in res.stdout
    res = _plan_cli("--config=configs/debug.py", "--topology=v5e-4", block_libtpu=True)
    assert res.returncode != 0 and "install the `libtpu` package" in res.stderr


def test_find_batch_searches_powers_of_two_and_the_fewest_micro_batches(monkeypatch):
    # A stand-in for the compile: per-chip peak = 2 GB + 0.5 GB per example in one micro-batch, on a 16 GB chip.
    # Largest power of two that fits: 16 (10 GB; 32 would need 18 GB). The config's 2048 over 16 chips is 128
    # per chip: 8 micro-batches of 16.
    import ml_collections

    calls = []

    def fake_train_plan(cfg, devices, where, mesh, batch, grad_accum, remat_policy):
        dp = mesh[0] * mesh[1]
        micro = batch // dp // grad_accum
        calls.append((batch, grad_accum))
        peak = 2e9 + 0.5e9 * micro
        return {"per_device_bytes": {"peak": peak}, "chip": {"hbm_bytes": 16e9},
                "fit": planner.fit_verdict(peak, 16e9)}

    monkeypatch.setattr(planner, "train_plan", fake_train_plan)
    cfg = ml_collections.ConfigDict({"global_batch_size": 2048, "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    res = planner.find_batch(cfg, list(range(16)), "v5e-16", log=lambda *a: None)
    assert res["largest_per_chip_batch"] == 16
    assert res["grad_accum_steps"] == 8
    assert calls[:5] == [(2048, 1), (1024, 1), (512, 1), (256, 1), (2048, 8)]
