"""The 7B `predict_action` program (prefill + 6 cached greedy steps), compiled ahead of time for a mesh.

Built from the model and decoding functions the policy runs (`vla_jax.models.decode.greedy_decode`
on the split-layer parameter layout), with bf16 weights as `Policy.load` keeps them. The weights are
placed by the same logical-axis rules as training on a mesh (data, fsdp, tensor): the default
`tensor=N` is Megatron-style tensor parallelism (attention heads, MLP hidden and vocabulary split over
chips, the model width replicated); the KV cache and activations follow by XLA's propagation.

Shapes: B prompts of `text_len` tokens (OpenVLA's prompt is ~20-30 tokens, padded to a bucket) plus
256 image patches: ~290 positions, then 7 action tokens; the cache holds text_len + 256 + 7 slots.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Dict, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.decode import greedy_decode
from vla_jax.models.openvla import OpenVLA
from vla_jax.plan import aot, hlo_cost
from vla_jax.spec import BatchSpec
from vla_jax.plan.train_program import memory_report, shard_bytes


def _drop_layer_axis(spec: PartitionSpec) -> PartitionSpec:
    return PartitionSpec(*tuple(spec)[1:])


def abstract_decode_params(model: OpenVLA, mesh, rules=shd.LOGICAL_RULES):
    """ShapeDtypeStructs (with NamedShardings) of the params in the decoding layout
    {'shared': ..., 'layers': (L per-layer trees)} (`decode.split_layers`), nothing allocated."""
    cfg = model.config
    example = BatchSpec.for_model(cfg, text_len=16).zeros(1)  # init shapes only
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), example["pixel_values"], example["input_ids"])["params"]
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
    params = nn.meta.unbox(boxed)

    def leaf(x, spec, layer=False):
        shape = x.shape[1:] if layer else x.shape
        spec = _drop_layer_axis(spec) if layer else spec
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(mesh, spec))

    is_spec = lambda s: isinstance(s, PartitionSpec)
    shared = {k: v for k, v in params.items()}
    shared_specs = {k: v for k, v in specs.items()}
    shared["llm"] = {k: v for k, v in params["llm"].items() if k != "layers"}
    shared_specs["llm"] = {k: v for k, v in specs["llm"].items() if k != "layers"}
    shared_abs = jax.tree.map(leaf, shared, shared_specs, is_leaf=lambda x: is_spec(x) or hasattr(x, "shape"))
    one_layer = jax.tree.map(functools.partial(leaf, layer=True), params["llm"]["layers"], specs["llm"]["layers"],
                             is_leaf=lambda x: is_spec(x) or hasattr(x, "shape"))
    return {"shared": shared_abs, "layers": tuple(one_layer for _ in range(cfg.llama.num_layers))}


def compile_predict_action(devices: Sequence[Any], mesh_shape=(1, 1, -1), batch: int = 1, text_len: int = 32,
                           preset: str = "openvla-7b", dtype: str = "bfloat16") -> Dict[str, Any]:
    """Compiles greedy decoding of the codec's action tokens (7 for OpenVLA) for `devices`; returns the
    per-chip report. Input shapes come from the model's BatchSpec (image) and `text_len`. A program the
    TPU compiler refuses for lack of HBM is reported ('compiler_oom', per_device_bytes['peak'] = the
    bytes it needed), not raised."""
    model_cfg = with_dtypes(get_preset(preset), dtype, dtype)
    model_cfg = dataclasses.replace(model_cfg, execution=dataclasses.replace(model_cfg.execution,
                                                                             attention_query_block=0))
    model = OpenVLA(model_cfg)
    mesh = shd.make_mesh(mesh_shape, devices)
    params = abstract_decode_params(model, mesh)
    dp = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    if batch % dp:
        raise ValueError(f"batch {batch} must divide by the data-parallel size {dp} (mesh data x fsdp)")
    spec = BatchSpec.for_model(model_cfg, text_len)
    new_tokens = spec.codec.num_action_tokens
    shapes = dict(spec.shapes(batch), lengths=(batch,))
    dtypes = dict({k: d for k, (_, d) in spec.layout().items()}, lengths=np.dtype(np.int32))
    inputs = {k: jax.ShapeDtypeStruct(shapes[k], dtypes[k], sharding=shd.batch_sharding(mesh, len(shapes[k])))
              for k in ("pixel_values", "input_ids", "lengths")}
    fn = jax.jit(functools.partial(greedy_decode, model, num_tokens=new_tokens))
    t0 = time.perf_counter()
    with shd.mesh_rules(mesh):
        lowered = fn.lower(params, inputs["pixel_values"], inputs["input_ids"], inputs["lengths"])
    t1 = time.perf_counter()
    compiled, oom = aot.compile_or_oom(lowered)
    t2 = time.perf_counter()
    report = {
        "program": "predict_action", "preset": preset, "dtype": dtype, "batch": batch, "text_len": text_len,
        "sequence_len": text_len + model_cfg.num_inserted_tokens, "new_tokens": new_tokens, "actions_per_call": batch,
        "devices": mesh.devices.size, "device_kind": mesh.devices.flat[0].device_kind, "mesh": dict(mesh.shape),
        "seconds": {"trace_and_lower": t1 - t0, "compile": t2 - t1},
    }
    return add_compiled_figures(report, compiled, oom, params, inputs)


def add_compiled_figures(report: Dict[str, Any], compiled, oom, params, inputs) -> Dict[str, Any]:
    """Adds an inference program's per-device bytes (params, inputs, XLA's memory analysis) and the HLO
    counts (FLOPs, bytes, collectives, loops) to `report`; for a program the TPU compiler refused for
    lack of HBM (`oom` from `aot.compile_or_oom`), its own figures instead. Returns `report`."""
    pb = {"params": shard_bytes(params), "inputs": shard_bytes(inputs)}
    if oom is not None:
        report.update(per_device_bytes=dict(pb, peak=oom["needed_bytes"]), compiler_oom=oom)
        return report
    hlo = compiled.as_text()
    counted = hlo_cost.analyze(hlo)
    report.update(per_device_bytes=dict(pb, **memory_report(compiled)), _hlo=hlo,
                  compiled_flops_per_device=counted["flops"], compiled_bytes_per_device=counted["bytes"],
                  compiled_collective_bytes_per_device=counted["collective_bytes"], compiled_loops=counted["loops"])
    return report
