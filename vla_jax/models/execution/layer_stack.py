"""Stacked layers ([L, ...] parameters) run as an unrolled Python loop instead of `nn.scan`.

The Llama's layers and each ViT tower's blocks keep their parameters stacked on a leading 'layers'
axis (one `nn.scan` creates them; checkpoints, sharding rules and the HF/timm converters use that
layout). Run as a scan, XLA executes one while loop: each step reads its layer's weights through
dynamic slices and writes the residuals its backward needs into [L, ...] buffers, which XLA:CPU
fills with zeros (a broadcast copied into each buffer, every step) before the loop. Unrolled, every
layer is its own program region on static slices of the same arrays, with none of those buffers.

`unstack` gives the L per-layer parameter trees; its backward stacks the L gradients once (JAX's
own transpose of L static slices would pad each gradient to [L, ...] and add them up).
`run_unrolled` applies the scanned layer module to them one after the other. Used for the
full forward (training, scoring) when `unroll(ExecutionConfig.unroll_layers)`: by default on the
CPU backend only, where it made the train step faster (BENCHMARKS.md, "stacked layers unrolled").
Accelerators keep the scan (one compiled layer body: shorter compiles at 7B depth; not measured).
The KV-cache paths keep the scan too (`decode.py` has its own per-layer layout).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


def unroll(configured: Optional[bool]) -> bool:
    """Whether stacked layers run unrolled: `configured`, or when None, on the CPU backend only."""
    if configured is None:
        return jax.default_backend() == "cpu"
    return bool(configured)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack(tree: Any, n: int) -> List[Any]:
    """A tree of [n, ...] leaves -> n trees of their [...] slices (layer i = index i)."""
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def _unstack_fwd(tree, n):
    return unstack(tree, n), None


def _unstack_bwd(n, _, grads):
    return (jax.tree.map(lambda *g: jnp.stack(g), *grads),)


unstack.defvjp(_unstack_fwd, _unstack_bwd)


def run_unrolled(layer: nn.Module, stacked: Any, x, *args, remat: bool = False, policy: Optional[Callable] = None,
                 last_layer_args: Optional[tuple] = None, xs: Any = None):
    """x through every layer in turn, x = layer.apply({'params': p_i}, x, *args)[0], where p_i are the
    per-layer slices of `stacked` (the [L, ...] params of an `nn.scan` of `layer`). remat: each layer
    is a `jax.checkpoint` (with `policy`), as `nn.remat` would make it inside the scan.
    last_layer_args: other arguments for the last layer only (e.g. the Llama's rows to compute there,
    which an unrolled loop can give it and a scan cannot).
    xs: None, or a tree of [L, ...] arrays whose slice i is layer i's second argument (what an
    `nn.scan` over the layers passes as its scanned input, e.g. the towers' per-block FiLM)."""
    def runner(layer_args):
        def run(p, x, xi):
            extra = () if xi is None else (xi,)
            return layer.apply({"params": p}, x, *extra, *layer_args)[0]

        return jax.checkpoint(run, policy=policy) if remat else run

    run = runner(args)
    layers = unstack(stacked, jax.tree.leaves(stacked)[0].shape[0])
    for i, p in enumerate(layers):
        xi = None if xs is None else jax.tree.map(lambda a, i=i: a[i], xs)
        x = (runner(last_layer_args) if i == len(layers) - 1 and last_layer_args is not None else run)(p, x, xi)
    return x
