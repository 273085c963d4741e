"""Capacity planning without the hardware: compile the real train step for N simulated devices.

    python -m vla_jax.plan --config=configs/oxe.py --devices=64 [--mesh=1,-1,1] [--batch=2048]
        [--grad_accum=1] [--json=plan.json] [--config.key=value ...]

XLA compiles the full step (vision towers + projector + LLM, forward + backward + AdamW, with the
config's sharding, remat and dtypes) ahead of time for a mesh of N CPU devices; nothing is
allocated. Per device it reports the parameter, optimizer-state and batch bytes (from the
shardings), XLA's argument/output/temporary sizes (compiled.memory_analysis(); the peak is
argument + output - aliased + temporary) and the step's FLOPs. Temporaries come from the CPU
backend's buffer assignment: expect +-1-2 GB against a GPU/TPU compile. FLOPs are analytic
(vla_jax.training.metrics): XLA's cost analysis counts a scanned layer once.
"""

from __future__ import annotations

import os
import sys


def _set_device_count(argv) -> None:
    """--devices must act before JAX initialises its CPU backend."""
    n = None
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            n = a.split("=", 1)[1]
        elif a == "--devices" and i + 1 < len(argv):
            n = argv[i + 1]
    if n is not None:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={int(n)}"])
        os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _set_device_count(sys.argv)

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_integer("devices", 8, "Number of simulated devices.")
    flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (overrides config.mesh), e.g. 1,-1,1.")
    flags.DEFINE_integer("batch", 0, "Global batch size (0: the config's).")
    flags.DEFINE_integer("grad_accum", 0, "Micro-batches per step (0: the config's).")
    flags.DEFINE_string("json", "", "Also write the report as JSON to this file.")
    flags.mark_flags_as_required(["config"])

GB = 1e9


def _shard_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings): the largest per-device total."""
    import jax
    import numpy as np

    per_device = {}
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        n = int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize
        for d in leaf.sharding.addressable_devices:
            per_device[d] = per_device.get(d, 0) + n
    return max(per_device.values()) if per_device else 0


def plan(cfg, devices: int, mesh_arg: str = "", batch: int = 0, grad_accum: int = 0) -> dict:
    """Compiles the train step of `cfg` for the current (simulated) devices; returns the report dict."""
    import jax
    import numpy as np

    from vla_jax import sharding as shd
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.training import metrics as mlib
    from vla_jax.training import run, state as st, step as sp

    if jax.device_count() != devices:
        raise ValueError(f"--devices={devices} but JAX sees {jax.device_count()} devices (run as "
                         f"`python -m vla_jax.plan`, which sets XLA_FLAGS before JAX starts)")
    with cfg.unlocked():
        if mesh_arg:
            sizes = [int(x) for x in mesh_arg.split(",")]
            if len(sizes) != 3:
                raise ValueError(f"--mesh={mesh_arg!r} must give 3 sizes: data,fsdp,tensor")
            cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = sizes
        if batch:
            cfg.global_batch_size = batch
        if grad_accum:
            cfg.grad_accum_steps = grad_accum
    # The program the accelerators run: their automatic execution choices, not the CPU ones that
    # this process's backend would pick (layers scanned, attention in one block).
    model_cfg = run.model_config(cfg.model)
    model_cfg = dataclasses.replace(
        model_cfg, llama=dataclasses.replace(model_cfg.llama, unroll_layers=False, attention_query_block=0),
        dino=dataclasses.replace(model_cfg.dino, unroll_layers=False),
        siglip=dataclasses.replace(model_cfg.siglip, unroll_layers=False))
    model = OpenVLA(model_cfg)
    mesh = run.make_mesh(cfg.mesh)
    run.check_batch_layout(cfg, mesh)
    tx, schedule = st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)
    hooks = run.param_hooks(cfg)
    example = run.example_inputs(model_cfg, cfg.data.max_seq_len)
    t0 = time.perf_counter()
    mask = run.trainable(cfg, st.abstract_params(model, example, hooks), hooks)
    shardings, abstract = st.abstract_train_state(model, tx, mesh, shd.LOGICAL_RULES, cfg.seed, example, mask, hooks)
    b, t = cfg.global_batch_size, cfg.data.max_seq_len
    s = model_cfg.image_size
    shapes = {"pixel_values": ((b, s, s, 3), np.uint8), "input_ids": ((b, t), np.int32),
              "labels": ((b, t), np.int32), "dataset_index": ((b,), np.int32)}
    batch_abs = {k: jax.ShapeDtypeStruct(shape, dt, sharding=shd.batch_sharding(mesh, len(shape)))
                 for k, (shape, dt) in shapes.items()}
    loss_cfg = sp.LossConfig.for_model(model_cfg)
    step_fn = sp.make_train_step(model, tx, schedule, loss_cfg, mask, cfg.grad_accum_steps, hooks, mesh)
    jitted = sp.jit_train_step(step_fn, mesh, shardings, {k: v[0] for k, v in shapes.items()})
    lowered = jitted.lower(abstract, batch_abs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    mem = compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    summary = st.param_summary(abstract.params, mask)
    flops_step = b * mlib.train_flops_per_example(model_cfg, t, loss_cfg.num_supervised, mlib.parts_trainable(mask))
    return {
        "config": {"preset": cfg.model.preset, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
                   "remat": cfg.model.remat, "global_batch_size": b, "grad_accum_steps": cfg.grad_accum_steps,
                   "text_len": t, "sequence_len": t + model_cfg.num_patches},
        "devices": devices, "mesh": dict(mesh.shape),
        "per_device_batch": b // run.data_parallel_size(mesh),
        "params": summary["total"], "trainable_params": summary["trainable"],
        "per_device_bytes": {
            "params": _shard_bytes(abstract.params), "optimizer_state": _shard_bytes(abstract.opt_state),
            "batch": _shard_bytes(batch_abs), "xla_argument": arg, "xla_output": out, "xla_alias": alias,
            "xla_temp": temp, "peak_estimate": arg + out - alias + temp},
        "flops_per_step": flops_step, "flops_per_device_per_step": flops_step / devices,
        "seconds": {"trace_and_lower": t1 - t0, "compile": t2 - t1},
        "activation_constraints": jitted.constrain_activations,
    }


def format_report(r: dict) -> str:
    m, c, pb = r["mesh"], r["config"], r["per_device_bytes"]
    lines = [
        f"{c['preset']}: {r['params']:,} params ({r['trainable_params']:,} trainable), {c['param_dtype']} master "
        f"weights, {c['dtype']} compute, remat={c['remat']}",
        f"mesh data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']} over {r['devices']} devices; global batch "
        f"{c['global_batch_size']} ({r['per_device_batch']} per device, {c['grad_accum_steps']} micro-batch(es)), "
        f"{c['sequence_len']} tokens ({c['text_len']} text + image patches)",
        "per device:",
        f"  parameters        {pb['params'] / GB:8.2f} GB",
        f"  optimizer state   {pb['optimizer_state'] / GB:8.2f} GB",
        f"  batch             {pb['batch'] / GB:8.3f} GB",
        f"  XLA arguments     {pb['xla_argument'] / GB:8.2f} GB (state + batch)",
        f"  XLA temporaries   {pb['xla_temp'] / GB:8.2f} GB (activations, gradients, collectives; CPU estimate)",
        f"  peak estimate     {pb['peak_estimate'] / GB:8.2f} GB (arguments + outputs - donated + temporaries)",
        f"FLOPs per step {r['flops_per_step']:.3e} ({r['flops_per_device_per_step']:.3e} per device); "
        f"at 40% MFU on a 989 TFLOP/s (H100 bf16) device: "
        f"{r['flops_per_device_per_step'] / (0.4 * 989e12):.2f} s/step",
        f"(traced+lowered in {r['seconds']['trace_and_lower']:.1f} s, compiled in {r['seconds']['compile']:.1f} s)",
    ]
    if not r["activation_constraints"]:
        lines.append("WARNING: compiled without activation sharding constraints (the model does not trace under "
                     "a mesh); XLA may replicate activations, so the temporaries above can be far too high")
    return "\n".join(lines)


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    report = plan(FLAGS.config, FLAGS.devices, FLAGS.mesh, FLAGS.batch, FLAGS.grad_accum)
    print(format_report(report), flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    from vla_jax.training.run import parse_flags

    app.run(main, flags_parser=parse_flags)
