"""Sharded inference: a policy's parameters placed over a device mesh and its decoder compiled for it.

    policy = Policy.load(path, mesh=(1, 1, 4))      # data, fsdp, tensor sizes, or a jax Mesh
    python -m vla_jax.serve --checkpoint=PATH --mesh=1,1,4

The compiled program is the checkpoint's decoder: the greedy autoregressive decoder (prefill into a
KV cache + one cached step per action token, on `decode.split_layers`' layout), or for an
OpenVLA-OFT checkpoint (`parallel_decoding=True`) the single bidirectional pass of
`models.parallel_decode` with its discrete argmax or its L1 head (stacked layout, no cache).

Placement uses training's logical-axis rules (`vla_jax.sharding.LOGICAL_RULES`): over `tensor` the
attention heads, MLP width and vocabulary rows are split (Megatron-style: each device holds
1/tensor of every layer and the partial sums meet in one all-reduce after o_proj / down_proj);
over `fsdp` the model width (weights all-gathered layer by layer, for memory). The KV cache is
sharded over heads (`llama.init_cache` carries the logical names, which these rules map to
`tensor`). OFT's L1 head follows the same table (`action_head.py`'s names): its matrices are split
over `tensor` on the head width W, which is the LLM width (heads x head_dim), so a tensor axis that
divides the heads divides W too; their input side (D x H, W) goes over `fsdp`. Activations are
sharded over the batch axes (`data`, `fsdp`) when the batch bucket divides by their size, else
replicated.

LoRA checkpoints: the adapters are placed beside their kernels' shards (`lora_shardings`: A over the
kernel's input axes, B over its output axes) and folded in on the mesh (`loading._merge_lora`), so
each device computes only the shard of each merged kernel that it holds.

Before anything is placed on a device, `check_divisible` rejects a mesh whose axes do not divide the
sharded dimensions (naming the parameter, the dimension and both sizes), and `check_fits` compiles
the decoder for abstract parameters and compares XLA's per-device memory with the devices' capacity.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vla_jax import sharding as shd
from vla_jax.models.config import OpenVLAConfig
from vla_jax.models import lora
from vla_jax.models.decode import greedy_decode
from vla_jax.models.openvla import OpenVLA
from vla_jax.models.parallel_decode import parallel_decode

GB = 1e9
MeshSpec = Union[Mesh, str, Sequence[int]]


def as_mesh(spec: MeshSpec, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor"), from a Mesh, "D,F,T" or (D, F, T) (one may be -1),
    over `devices` (default: all)."""
    if isinstance(spec, Mesh):
        if tuple(spec.axis_names) != shd.MESH_AXES:
            raise ValueError(f"mesh axes must be {shd.MESH_AXES}, got {tuple(spec.axis_names)}")
        return spec
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.replace("x", ",").split(",")]
        except ValueError:
            raise ValueError(f"mesh {spec!r}: expected three sizes data,fsdp,tensor such as '1,1,8'") from None
    sizes = [int(x) for x in spec]
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh {tuple(spec)}: expected three sizes (data, fsdp, tensor), each >= 1 or one -1")
    return shd.make_mesh(sizes, devices)


def _boxed_shapes(cfg: OpenVLAConfig) -> Any:
    """The model's params (stacked layout, OFT's params['action_head'] included) as ShapeDtypeStructs
    boxed with their logical names (nn.LogicallyPartitioned)."""
    s, n = cfg.image_size, cfg.num_images
    pixels = np.zeros((1, s, s, 3) if n == 1 else (1, n, s, s, 3), np.uint8)  # proprio: init makes its own
    return jax.eval_shape(lambda: OpenVLA(cfg).init(jax.random.PRNGKey(0), pixels,
                                                    np.ones((1, 4), np.int32)))["params"]


def logical_specs(cfg: OpenVLAConfig) -> Dict[str, Any]:
    """{'shapes', 'specs'}: the model's params (stacked layout) as ShapeDtypeStructs in cfg.param_dtype
    and their logical PartitionSpecs (names such as 'embed', 'heads', 'layers')."""
    boxed = _boxed_shapes(cfg)
    return {"shapes": nn.meta.unbox(boxed), "specs": nn.get_partition_spec(boxed)}


def _split_tree(tree: dict, num_layers: int) -> dict:
    """Stacked-layout tree of per-leaf values -> `decode.split_layers` layout (layer values drop axis 0)."""
    shared = dict(tree)
    shared["llm"] = {k: v for k, v in tree["llm"].items() if k != "layers"}
    return {"shared": shared, "layers": (tree["llm"]["layers"],) * num_layers}


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def check_divisible(shapes: Any, specs: Any, mesh: Mesh, rules=shd.LOGICAL_RULES) -> None:
    """ValueError naming the first parameter whose sharded dimension does not divide by its mesh axes."""
    mesh_specs = nn.logical_to_mesh(specs, rules)
    flat_shapes = traverse_util.flatten_dict(shapes)
    flat_logical = traverse_util.flatten_dict(specs, is_leaf=lambda p, x: _is_spec(x))
    flat_mesh = traverse_util.flatten_dict(mesh_specs, is_leaf=lambda p, x: _is_spec(x))
    for path, leaf in flat_shapes.items():
        for i, (size, axes) in enumerate(zip(leaf.shape, flat_mesh[path])):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            parts = int(np.prod([mesh.shape[a] for a in axes]))
            if size % parts:
                name = flat_logical[path][i]
                raise ValueError(
                    f"mesh {dict(mesh.shape)} cannot shard parameter {'/'.join(path)} {tuple(leaf.shape)}: its "
                    f"'{name}' dimension (axis {i}) has size {size}, which the mesh's {'x'.join(axes)} axis of size "
                    f"{parts} does not divide; choose a {'x'.join(axes)} size that divides {size}")


def param_shardings(cfg: OpenVLAConfig, mesh: Mesh, rules=shd.LOGICAL_RULES, split: bool = False) -> Any:
    """NamedShardings for the params of `cfg` (stacked layout, or `decode.split_layers`'s when split),
    after `check_divisible`."""
    info = logical_specs(cfg)
    check_divisible(info["shapes"], info["specs"], mesh, rules)
    shardings = shd.logical_to_sharding(info["specs"], mesh, rules)
    if not split:
        return shardings
    layer = jax.tree.map(lambda s: NamedSharding(mesh, PartitionSpec(*s.spec[1:])),
                         shardings["llm"]["layers"])
    return _split_tree(dict(shardings, llm=dict(shardings["llm"], layers=layer)), cfg.llama.num_layers)


def abstract_params(cfg: OpenVLAConfig, mesh: Mesh, rules=shd.LOGICAL_RULES) -> Any:
    """The stacked-layout params (what OFT's single pass runs on) as ShapeDtypeStructs carrying their
    shardings (no memory)."""
    shapes = logical_specs(cfg)["shapes"]
    shardings = param_shardings(cfg, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_split_params(cfg: OpenVLAConfig, mesh: Mesh, rules=shd.LOGICAL_RULES) -> Any:
    """The decoding-layout params as ShapeDtypeStructs carrying their shardings (no memory)."""
    shapes = logical_specs(cfg)["shapes"]
    layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), shapes["llm"]["layers"])
    split = _split_tree(dict(shapes, llm=dict(shapes["llm"], layers=layer)), cfg.llama.num_layers)
    shardings = param_shardings(cfg, mesh, rules, split=True)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), split, shardings)


def batch_parallel(mesh: Mesh, batch: int) -> Tuple[str, ...]:
    """The batch axes (data, fsdp) a batch of this size is split over: both when it divides, else none."""
    n = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
    return shd.BATCH_AXES if n > 1 and batch % n == 0 else ()


def activation_rules(mesh: Mesh, batch: int, rules=shd.LOGICAL_RULES):
    """`rules` with the activations' batch axis mapped to `batch_parallel(mesh, batch)` (or replicated)."""
    axes = batch_parallel(mesh, batch)
    return tuple((k, (axes or None) if k == "act_batch" else v) for k, v in rules)


def lora_shardings(cfg: OpenVLAConfig, lora_cfg: lora.LoraConfig, mesh: Mesh, rules=shd.LOGICAL_RULES) -> Any:
    """NamedShardings for a LoRA tree (`lora.init_lora`'s layout) of `cfg`'s params: A [*batch, *in, r]
    split like its kernel's input axes, B [*batch, r, *out] like its output axes, the rank replicated.
    A fold `W + scale * A @ B` then yields each device's shard of W from its own shards of A and B."""
    flat = {}
    for t in lora.targets(_boxed_shapes(cfg), lora_cfg):
        for leaf, names in ((lora.LORA_A, t.a_names), (lora.LORA_B, t.b_names)):
            flat[t.path + (leaf,)] = NamedSharding(mesh, nn.logical_to_mesh_axes(names, rules))
    return traverse_util.unflatten_dict(flat)


def compile_decoder(model: OpenVLA, params: Any, mesh: Mesh, batch: int, length: int, num_tokens: int,
                    allowed_range: Optional[Tuple[int, int]] = None, rules=shd.LOGICAL_RULES):
    """AOT-compiles the model's decoder over `mesh` for one (batch, prompt length) bucket.

    Autoregressive models: `greedy_decode` on decoding-layout params (`decode.split_layers`) ->
    tokens int32 [B, num_tokens]. OpenVLA-OFT models (config.parallel_decoding): `parallel_decode`'s
    single pass on stacked-layout params -> int32 token ids [B, K, D] (action_head 'tokens') or float32
    normalized actions [B, K, D] ('l1'); num_tokens must then be the K * D slots + </s> and
    allowed_range None (the argmax runs over the full vocabulary, as upstream).
    params: arrays or ShapeDtypeStructs carrying NamedShardings on `mesh`.
    Returns the compiled executable: (params, pixels uint8 [B, S, S, 3], ids int32 [B, T],
    lengths int32 [B]) -> the output above, replicated.
    """
    cfg = model.config
    s = cfg.image_size
    if cfg.parallel_decoding:
        if num_tokens != cfg.num_action_slots + 1 or allowed_range is not None:
            raise ValueError(f"a parallel-decoding model fills its {cfg.num_action_slots} action slots + </s> = "
                             f"{cfg.num_action_slots + 1} positions over the full vocabulary; got num_tokens="
                             f"{num_tokens}, allowed_range={allowed_range}")
        decoder = functools.partial(parallel_decode, model)
    else:
        decoder = functools.partial(greedy_decode, model, num_tokens=num_tokens, allowed_range=allowed_range)
    axes = batch_parallel(mesh, batch)
    lead = NamedSharding(mesh, PartitionSpec(axes or None))
    images = NamedSharding(mesh, PartitionSpec(axes or None, None, None, None))
    ids = NamedSharding(mesh, PartitionSpec(axes or None, None))
    p_shardings = jax.tree.map(lambda x: x.sharding, params)
    fn = jax.jit(decoder, in_shardings=(p_shardings, images, ids, lead),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
    args = (params, jax.ShapeDtypeStruct((batch, s, s, 3), np.uint8, sharding=images),
            jax.ShapeDtypeStruct((batch, length), np.int32, sharding=ids),
            jax.ShapeDtypeStruct((batch,), np.int32, sharding=lead))
    with shd.mesh_rules(mesh, activation_rules(mesh, batch, rules)):
        return fn.lower(*args).compile()


def memory_per_device(compiled) -> Dict[str, int]:
    """XLA's per-device bytes of a compiled program: argument, output, alias, temp and
    peak = argument + output - alias + temp (VERIFIED_FACTS: the CPU backend's peak field omits temp)."""
    mem = compiled.memory_analysis()
    out = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def device_capacity(device: jax.Device) -> Optional[int]:
    """Bytes of memory the device offers (its allocator's limit), or None where JAX does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def check_fits(compiled, mesh: Mesh, capacity: Optional[int] = None, what: str = "the model") -> Dict[str, int]:
    """Raises ValueError when the compiled program needs more memory per device than `capacity`
    (default: the mesh's first device's limit; no check where unknown). Returns memory_per_device."""
    mem = memory_per_device(compiled)
    cap = capacity if capacity is not None else device_capacity(mesh.devices.flat[0])
    if cap is not None and mem["peak"] > cap:
        raise ValueError(
            f"{what} needs {mem['peak'] / GB:.2f} GB per device on mesh {dict(mesh.shape)} (compiled decoder: "
            f"{mem['argument'] / GB:.2f} GB parameters and inputs + {mem['temp'] / GB:.2f} GB temporaries + "
            f"{mem['output'] / GB:.3f} GB outputs), but each device has {cap / GB:.2f} GB; use more devices "
            f"(a larger tensor or fsdp axis) or bfloat16 parameters (param_dtype='bfloat16')")
    return mem
