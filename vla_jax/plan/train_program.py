"""The exact train step of a config, built abstractly for a given device list and compiled ahead of time.

Used for simulated CPU devices (`--devices=N`) and for the compile-only devices of a TPU topology
(`--topology=v5p-128`, the TPU compiler in libtpu): the same model, rules table, optimizer, remat and
dtypes as `train.py`; only the devices differ. Nothing is allocated: the state and batch are
`jax.ShapeDtypeStruct`s carrying their `NamedSharding`s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Optional, Sequence

import jax
import numpy as np

from vla_jax import sharding as shd
from vla_jax.models.config import REMAT_POLICIES
from vla_jax.models.openvla import OpenVLA
from vla_jax.plan import hlo_cost
from vla_jax.training import metrics as mlib
from vla_jax.training import run, state as st, step as sp


def accelerator_model_config(cfg, llama_layers: int = 0, remat_policy: str = "nothing_saveable"):
    """config.model -> OpenVLAConfig with the accelerators' execution choices (layers scanned, attention
    in one block), not the CPU ones this process would pick, and the Llama's `remat_policy`.
    llama_layers > 0: that many Llama layers (the guard-rail test's reduced depth at full width)."""
    model_cfg = run.model_config(cfg.model)
    llama = dataclasses.replace(model_cfg.llama, remat_policy=remat_policy)
    if llama_layers:
        llama = dataclasses.replace(llama, num_layers=int(llama_layers))
    execution = dataclasses.replace(model_cfg.execution, unroll_layers=False, attention_query_block=0)
    return dataclasses.replace(model_cfg, llama=llama, execution=execution)


def apply_overrides(cfg, mesh: Optional[Sequence[int]] = None, batch: int = 0, grad_accum: int = 0):
    """A copy of the run config with the mesh sizes (data, fsdp, tensor), global batch and micro-batches set."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        if mesh:
            cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (int(x) for x in mesh)
        if batch:
            cfg.global_batch_size = int(batch)
        if grad_accum:
            cfg.grad_accum_steps = int(grad_accum)
    return cfg


def shard_bytes(tree) -> int:
    """Bytes the fullest device holds of `tree` (ShapeDtypeStructs with shardings)."""
    per_device: Dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        n = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * np.dtype(leaf.dtype).itemsize
        for d in leaf.sharding.device_set:
            per_device[d] = per_device.get(d, 0) + n
    return max(per_device.values()) if per_device else 0


@dataclasses.dataclass
class TrainProgram:
    """Everything needed to lower the step: jitted callable, abstract state and batch, and what was built."""

    cfg: Any
    model_cfg: Any
    mesh: Any
    mask: Any
    jitted: Any
    abstract_state: Any
    abstract_batch: Dict[str, jax.ShapeDtypeStruct]
    loss_cfg: Any
    remat_policy: str


def build(cfg, devices: Sequence[Any], llama_layers: int = 0, remat_policy: str = "nothing_saveable") -> TrainProgram:
    """The train step of `cfg` (already carrying any mesh/batch overrides) for `devices`."""
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"--remat_policy={remat_policy!r}; expected one of {REMAT_POLICIES}")
    model_cfg = accelerator_model_config(cfg, llama_layers, remat_policy)
    model = OpenVLA(model_cfg)
    mesh = run.make_mesh(cfg.mesh, devices)
    run.check_batch_layout(cfg, mesh)
    tx, schedule = st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)
    hooks = run.param_hooks(cfg)
    spec = run.batch_spec(cfg, model_cfg)
    example = run.example_inputs(spec)
    mask = run.trainable(cfg, st.abstract_params(model, example, hooks), hooks)
    shardings, abstract = st.abstract_train_state(model, tx, mesh, shd.LOGICAL_RULES, cfg.seed, example, mask, hooks)
    shapes = spec.shapes(cfg.global_batch_size)
    batch_abs = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shd.batch_sharding(mesh, len(s.shape)))
                 for k, s in spec.abstract(cfg.global_batch_size).items()}
    loss_cfg = sp.LossConfig.for_model(model_cfg, spec)
    step_fn = sp.make_train_step(model, tx, schedule, loss_cfg, mask, cfg.grad_accum_steps, hooks, mesh)
    jitted = sp.jit_train_step(step_fn, mesh, shardings, shapes)
    return TrainProgram(cfg, model_cfg, mesh, mask, jitted, abstract, batch_abs, loss_cfg, remat_policy)


def memory_report(compiled) -> Dict[str, int]:
    """compiled.memory_analysis() -> per-device bytes; peak = arguments + outputs - aliased (donated)
    + temporaries + generated code."""
    mem = compiled.memory_analysis()
    arg, out, alias, temp, code = (int(getattr(mem, f"{k}_size_in_bytes"))
                                   for k in ("argument", "output", "alias", "temp", "generated_code"))
    return {"xla_argument": arg, "xla_output": out, "xla_alias": alias, "xla_temp": temp, "xla_code": code,
            "peak": arg + out - alias + temp + code}


def compile_program(prog: TrainProgram, keep_hlo: bool = False) -> Dict[str, Any]:
    """Lowers and compiles `prog`; returns the report dict (bytes per device, FLOPs, timings)."""
    cfg, model_cfg, mesh = prog.cfg, prog.model_cfg, prog.mesh
    t0 = time.perf_counter()
    lowered = prog.jitted.lower(prog.abstract_state, prog.abstract_batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    n_dev = mesh.devices.size
    b, t = cfg.global_batch_size, cfg.data.max_seq_len
    summary = st.param_summary(prog.abstract_state.params, prog.mask)
    flops_step = b * mlib.train_flops_per_example(model_cfg, t, prog.loss_cfg.num_supervised,
                                                  mlib.parts_trainable(prog.mask))
    hlo = compiled.as_text()
    counted = hlo_cost.analyze(hlo)
    xla_cost = compiled.cost_analysis() or {}
    if isinstance(xla_cost, (list, tuple)):
        xla_cost = xla_cost[0] if xla_cost else {}
    report = {
        "config": {"preset": cfg.model.preset, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype,
                   "remat": cfg.model.remat, "remat_policy": prog.remat_policy,
                   "global_batch_size": b, "grad_accum_steps": cfg.grad_accum_steps, "text_len": t,
                   "sequence_len": t + model_cfg.num_inserted_tokens, "llama_layers": model_cfg.llama.num_layers},
        "devices": n_dev, "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape),
        "per_device_batch": b // run.data_parallel_size(mesh),
        "params": summary["total"], "trainable_params": summary["trainable"],
        "per_device_bytes": dict(
            params=shard_bytes(prog.abstract_state.params), optimizer_state=shard_bytes(prog.abstract_state.opt_state),
            batch=shard_bytes(prog.abstract_batch), **memory_report(compiled)),
        "flops_per_step": flops_step, "flops_per_device_per_step": flops_step / n_dev,
        "compiled_flops_per_device": counted["flops"], "compiled_bytes_per_device": counted["bytes"],
        "compiled_loops": counted["loops"], "compiled_collective_bytes_per_device": counted["collective_bytes"],
        "attention_square_buffers": hlo_cost.square_buffers(hlo, t + model_cfg.num_inserted_tokens),
        "xla_cost_analysis_flops_per_device": float(xla_cost.get("flops", 0.0)),
        "seconds": {"trace_and_lower": t1 - t0, "compile": t2 - t1},
        "activation_constraints": prog.jitted.constrain_activations,
    }
    # The --devices report has always called it the peak estimate; readers of its JSON keep working.
    report["per_device_bytes"]["peak_estimate"] = report["per_device_bytes"]["peak"]
    if keep_hlo:
        report["_hlo"] = hlo
        report["_compiled"] = compiled
    return report


def sharding_table(prog: TrainProgram, compiled=None) -> list:
    """One line per state leaf: 'path  shape dtype  PartitionSpec' of the params and optimizer state, as
    the compiled program takes them (compiled.input_shardings) or, without `compiled`, as requested."""
    state = prog.abstract_state
    if compiled is not None:
        shardings = compiled.input_shardings[0][0]
    else:
        shardings = jax.tree.map(lambda x: x.sharding, state)
    lines = []
    for part in ("params", "opt_state"):
        leaves = jax.tree_util.tree_flatten_with_path(getattr(state, part))[0]
        shards = jax.tree.leaves(getattr(shardings, part))
        if len(leaves) != len(shards):
            raise AssertionError(f"{part}: {len(leaves)} leaves but {len(shards)} shardings")
        for (path, leaf), sh in zip(leaves, shards):
            spec = tuple(sh.spec)
            while spec and spec[-1] is None:  # P('fsdp', None) == P('fsdp')
                spec = spec[:-1]
            name = f"{part}/" + "/".join(_key(k) for k in path)
            lines.append(f"{name}  {list(leaf.shape)} {np.dtype(leaf.dtype).name}  P{spec!r}")
    return lines


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
