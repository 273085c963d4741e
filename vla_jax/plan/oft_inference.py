"""The OpenVLA-OFT single pass (`--program=oft_predict`), compiled ahead of time for a mesh.

What a policy runs for an OFT model (`vla_jax.models.parallel_decode.parallel_decode`): each prompt
gets A = K x D zeroed action slots and </s> appended, one bidirectional forward runs over
[BOS, 256 image patches, prompt, A slots, </s>], and the L1 head (or the lm_head's argmax, head
'tokens') reads the A readout states -> K actions of D values per row. No KV cache and no loop over
tokens, so one call yields K actions. The model (chunk K, head, geometry) comes from the run
config's `config.model` (configs/oft.py: K=8, L1 head, OpenVLA-7B).

Weights: `dtype` everywhere (bf16 by default, as `Policy.load` keeps a 7B checkpoint; the L1 head's
parameters too), placed by training's logical-axis rules (`vla_jax.policy.mesh.param_shardings`) on
a (data, fsdp, tensor) mesh; the default tensor=N splits heads, MLP width and vocabulary over the
chips. Layers run as one scan (the accelerators' execution choice), so a 7B compile is small.
Shapes: B prompts of `text_len` tokens (a padded bucket), i.e. 256 + text_len + A + 1 positions.

The report adds the analytic forward FLOPs (`forward_flops_per_example`, from
`vla_jax.training.metrics`' formulas plus the L1 head) next to the compiled ones, and the actions per
call (B x K) that turn a latency into actions/s.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Dict, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vla_jax import sharding as shd
from vla_jax.models.config import OpenVLAConfig, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.models.parallel_decode import parallel_decode
from vla_jax.plan import aot
from vla_jax.plan.inference import add_compiled_figures
from vla_jax.training import metrics as mlib
from vla_jax.training import run


def oft_model_config(model_section, dtype: str = "bfloat16") -> OpenVLAConfig:
    """config.model of a run config -> the OFT model as a policy runs it on an accelerator (`dtype`
    weights and compute, no remat, layers scanned, attention in one block). ValueError unless the
    config is an OpenVLA-OFT one (parallel_decoding=True)."""
    cfg = run.model_config(model_section)
    if not cfg.parallel_decoding:
        raise ValueError(f"--program=oft_predict plans OpenVLA-OFT's single pass and needs a config with "
                         f"config.model.parallel_decoding=True (e.g. configs/oft.py); this config's model "
                         f"({model_section.preset}) decodes autoregressively: use --program=predict_action")
    cfg = with_dtypes(cfg, dtype, dtype, remat=False)
    execution = dataclasses.replace(cfg.execution, unroll_layers=False, attention_query_block=0)
    return dataclasses.replace(cfg, execution=execution)


def head_forward_flops(cfg: OpenVLAConfig) -> float:
    """Matmul FLOPs of the L1 head for one row: K chunk steps through Linear(D*H -> W), the residual
    blocks' Linear(W -> W) and Linear(W -> D), with W = H (vla_jax.models.action_head)."""
    if cfg.action_head != "l1":
        return 0.0
    k, d, h = cfg.chunk_size, cfg.action_dim, cfg.llama.hidden_size
    return 2.0 * k * (d * h * h + 2 * h * h + h * d)


def forward_flops_per_example(cfg: OpenVLAConfig, text_len: int) -> float:
    """Analytic matmul FLOPs of one row's single pass: towers, projector, the Llama over the fused
    sequence (text_len prompt + A slots + </s>, plus the patches; bidirectional: the whole score
    square) and the head (the lm_head at A rows for head 'tokens')."""
    logits = cfg.num_action_slots if cfg.action_head == "tokens" else 0
    parts = mlib.forward_flops(cfg, text_len + cfg.num_action_slots + 1, logits)
    return float(sum(parts.values())) + head_forward_flops(cfg)


def abstract_params(cfg: OpenVLAConfig, mesh) -> Any:
    """The stacked params (with params['action_head']) as ShapeDtypeStructs carrying the NamedShardings
    a sharded policy would use; ValueError naming a dimension the mesh does not divide."""
    from vla_jax.policy import mesh as pmesh

    info = pmesh.logical_specs(cfg)  # one abstract init: shapes and logical axis names
    pmesh.check_divisible(info["shapes"], info["specs"], mesh)
    shapes, shardings = info["shapes"], shd.logical_to_sharding(info["specs"], mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def compile_oft_predict(devices: Sequence[Any], model_section, mesh_shape=(1, 1, -1), batch: int = 1,
                        text_len: int = 32, dtype: str = "bfloat16") -> Dict[str, Any]:
    """Compiles the OFT single pass of `model_section` (config.model) for `devices` at `batch` prompts of
    `text_len` tokens; returns the per-chip report (bytes, compiled and analytic FLOPs, HBM traffic,
    actions per call). A program the TPU compiler refuses for lack of HBM is reported, not raised:
    'compiler_oom' holds its figures and per_device_bytes['peak'] the bytes it needed."""
    from vla_jax.policy import mesh as pmesh

    cfg = oft_model_config(model_section, dtype)
    model = OpenVLA(cfg)
    mesh = shd.make_mesh(mesh_shape, devices)
    params = abstract_params(cfg, mesh)
    axes = pmesh.batch_parallel(mesh, batch)
    dp = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    if dp > 1 and not axes:
        raise ValueError(f"batch {batch} must divide by the data-parallel size {dp} (mesh data x fsdp)")
    s = cfg.image_size

    def rows(shape, dtype):  # split over the batch axes when the batch divides, else replicated
        spec = PartitionSpec(axes or None, *([None] * (len(shape) - 1)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    pixels = (batch, s, s, 3) if cfg.num_images == 1 else (batch, cfg.num_images, s, s, 3)
    inputs = {"pixel_values": rows(pixels, np.uint8), "prompt_ids": rows((batch, text_len), np.int32),
              "lengths": rows((batch,), np.int32),
              "proprio": None if cfg.proprio_dim is None else rows((batch, cfg.proprio_dim), np.float32)}
    fn = jax.jit(functools.partial(parallel_decode, model), out_shardings=NamedSharding(mesh, PartitionSpec()))
    t0 = time.perf_counter()
    with shd.mesh_rules(mesh, pmesh.activation_rules(mesh, batch)):
        lowered = fn.lower(params, inputs["pixel_values"], inputs["prompt_ids"], inputs["lengths"],
                           inputs["proprio"])
    t1 = time.perf_counter()
    compiled, oom = aot.compile_or_oom(lowered)
    t2 = time.perf_counter()
    n_dev = mesh.devices.size
    report = {
        "program": "oft_predict", "preset": model_section.preset, "dtype": dtype, "batch": batch,
        "text_len": text_len, "chunk_size": cfg.chunk_size, "action_dim": cfg.action_dim,
        "action_head": cfg.action_head, "sequence_len": cfg.num_inserted_tokens + text_len + cfg.num_action_slots + 1,
        "actions_per_call": batch * cfg.chunk_size,
        "devices": n_dev, "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape),
        "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))),
        "model_flops_per_device": batch * forward_flops_per_example(cfg, text_len) / n_dev,
        "seconds": {"trace_and_lower": t1 - t0, "compile": t2 - t1},
    }
    return add_compiled_figures(report, compiled, oom, params, inputs)
