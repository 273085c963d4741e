"""Greedy action decoding: one jitted prefill into a static KV cache, then a fixed-length loop.

No Python loop per token and static shapes throughout, so a decoder compiled for one
(batch, prompt length) bucket is reused by every later call with that bucket.

Decoding runs on its own parameter layout (`split_layers`): each Llama layer's weights and KV cache
are separate arrays and the layers are unrolled in the program. Training and checkpoints keep the
stacked layout (one `nn.scan` over [L, ...] tensors), whose per-step layer weights are dynamic
slices of the stacked arrays, which made a cached step on a GPU about three times slower at the 7B
geometry (BENCHMARKS.md, "GPU suite"). Same tokens; on CPU the two layouts time alike.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vla_jax.models.llama import DecoderLayer, init_cache
from vla_jax.models.openvla import OpenVLA

_SPLIT_KEYS = {"shared", "layers"}


def split_layers(params, *, consume: bool = False) -> Dict[str, Any]:
    """Stacked params (every Llama layer tensor `[L, ...]` under params['llm']['layers']) -> the
    decoding layout `{'shared': params without llm.layers, 'layers': tuple of L per-layer trees}`.

    Device arrays are sliced on their device; numpy leaves become numpy views. consume=True deletes
    each stacked device array as soon as it is split, so device memory peaks at the model plus its
    largest stacked tensor instead of twice the layers (for params nobody else holds, e.g. just loaded).
    """
    if not isinstance(params, dict) or "llm" not in params or "layers" not in params["llm"]:
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"split_layers needs OpenVLA params with a stacked 'llm/layers' subtree, got {keys}")
    stacked = params["llm"]["layers"]
    leaves, treedef = jax.tree_util.tree_flatten(stacked)
    num_layers = leaves[0].shape[0]
    per_leaf: List[Tuple] = []
    for leaf in leaves:
        if leaf.shape[0] != num_layers:
            raise ValueError(f"llm/layers leaves disagree on the layer count: {leaf.shape[0]} vs {num_layers}")
        if isinstance(leaf, jax.Array):
            per_leaf.append(_unstack(leaf))
            if consume:
                leaf.delete()
        else:
            per_leaf.append(tuple(np.asarray(leaf)[i] for i in range(num_layers)))
    layers = tuple(jax.tree_util.tree_unflatten(treedef, [p[i] for p in per_leaf]) for i in range(num_layers))
    shared = dict(params)
    shared["llm"] = {k: v for k, v in params["llm"].items() if k != "layers"}
    return {"shared": shared, "layers": layers}


@jax.jit
def _unstack(x):
    return tuple(x[i] for i in range(x.shape[0]))


def stack_layers(split: Dict[str, Any]) -> Dict[str, Any]:
    """Inverse of `split_layers` (a new copy of the layer weights, in the stacked layout)."""
    check_split(split)
    params = dict(split["shared"])
    params["llm"] = dict(params["llm"], layers=jax.tree.map(lambda *xs: jnp.stack(xs), *split["layers"]))
    return params


def is_split(params) -> bool:
    """Whether params are in the decoding layout of `split_layers`."""
    return isinstance(params, dict) and set(params) == _SPLIT_KEYS


def check_split(params) -> None:
    if not is_split(params):
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"decoding needs params in the layout of vla_jax.models.decode.split_layers(params) "
                         f"(keys ['layers', 'shared']), got {keys}")


def init_layer_caches(model: OpenVLA, batch: int, max_len: int) -> List[Dict[str, jax.Array]]:
    """`llama.init_cache` split per layer: {'k', 'v'} each `[batch, max_len, KVH, hd]` (compute dtype)."""
    cache = init_cache(model.config.llama, batch, max_len)
    return [{k: v[i] for k, v in cache.items()} for i in range(model.config.llama.num_layers)]


def _layers(model: OpenVLA, layer_params, x, positions, caches, last_layer_rows=None):
    """x `[B, T, D]` through every layer (unrolled); row b's keys/values land in its cache slots
    positions[b, 0].. (the Attention cache semantics). -> (x, new caches).

    last_layer_rows: optional int32 `[B, R]`: the last layer computes its queries, attention output
    and MLP only for these rows (its keys/values still for all T), so x comes back `[B, R, D]`.
    Only the last real position of each prompt feeds the first token; the rest of the last layer's
    output is never read, so it is not computed (BENCHMARKS.md has the FLOPs saved)."""
    layer = DecoderLayer(model.config.llama, model.config.execution)
    out = []
    for i, (p, c) in enumerate(zip(layer_params, caches)):
        rows = last_layer_rows if i == len(layer_params) - 1 else None
        x, c = layer.apply({"params": p}, x, positions, c, rows)
        out.append(c)
    return x, out


def _head(model: OpenVLA, shared, h):
    """Final norm + lm_head: `[B, 1, D]` -> float32 logits `[B, V]`."""
    return model.apply({"params": shared}, h, method=lambda m, h: m.llm.logits(m.llm.norm(h)))[:, 0]


def greedy_decode(model: OpenVLA, params, pixel_values, input_ids, lengths, num_tokens: int,
                  allowed_range: Optional[Tuple[int, int]] = None, proprio=None):
    """Greedy decoding of `num_tokens` new tokens.

    params: the decoding layout, `split_layers(params)`. pixel_values: uint8 `[B, N, S, S, 3]`
    (`[B, S, S, 3]` with one camera); proprio: float32 `[B, P]` exactly when the model has proprio_dim;
    input_ids: int32 `[B, T]` right-padded prompts (ending with 29871 for OpenVLA); lengths: int32
    `[B]` real tokens per row. allowed_range: optional inclusive (lo, hi) id range the argmax is
    restricted to (e.g. the 256 action ids); None = the whole vocabulary, as OpenVLA's `generate`
    does. Returns int32 tokens `[B, num_tokens]`.
    """
    check_split(params)
    cfg = model.config
    shared, layer_params = params["shared"], params["layers"]
    b, t = input_ids.shape

    def pick(logits):
        if allowed_range is not None:
            ids = jnp.arange(logits.shape[-1])
            logits = jnp.where((ids >= allowed_range[0]) & (ids <= allowed_range[1]), logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    # Prefill: BOS, the I inserted positions (every camera's patches, the proprio token) and the text
    # fill slots 0..T+I-1; the first token comes from each row's last real position (right padding
    # sits after it and is never attended to).
    inserted = cfg.num_inserted_tokens
    caches = init_layer_caches(model, b, t + inserted + num_tokens)
    x = model.apply({"params": shared}, pixel_values, input_ids, proprio, method=OpenVLA.embed_inputs)
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    last = lengths.astype(jnp.int32) + inserted - 1
    hidden, caches = _layers(model, layer_params, x, positions, caches, last_layer_rows=last[:, None])
    first = pick(_head(model, shared, hidden))
    tokens = jnp.zeros((b, num_tokens), jnp.int32).at[:, 0].set(first)
    start = lengths.astype(jnp.int32) + inserted  # position of the first generated token

    def body(i, carry):
        tokens, caches = carry
        x = model.apply({"params": shared}, tokens[:, i - 1][:, None], method=lambda m, ids: m.llm.embed(ids))
        hidden, caches = _layers(model, layer_params, x, (start + i - 1)[:, None], caches)
        return tokens.at[:, i].set(pick(_head(model, shared, hidden))), caches

    tokens, _ = jax.lax.fori_loop(1, num_tokens, body, (tokens, caches))
    return tokens
