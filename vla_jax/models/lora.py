"""LoRA for OpenVLA, reproducing `vla-scripts/finetune.py` (PEFT 0.11.1, OPENVLA_REFERENCE.md §9, gotcha 16).

Adapters live in their own pytree. Two ways to run them, same values (fp32) and gradients:
  * per layer (training's default): `attach_lora` puts each adapter beside its kernel in the params
    tree (A, and B pre-multiplied by alpha / r), and `models.dense.Linear` adds `(x @ A) @ B` to
    `x @ W` inside the layer body, the scanned/remat'd or unrolled one alike (scanned kernels' adapters
    are stacked like the kernels, so the scan slices them per layer). No merged kernel exists, neither
    whole stacks of them before the scan nor their full-size cotangents in the backward.
  * merged: `apply_lora` folds them into the kernels before the model runs, `W_eff = W + (alpha/r) A @ B`
    (export, PEFT's merge_and_unload; and the memory baseline of bench/plan_7b_memory.py).

API
  LoraConfig(rank=32, alpha=16, targets='all-linear', init='gaussian', dropout=0.0)
  init_lora(params, cfg, rng) -> lora            adapters for every targeted kernel of `params`
  attach_lora(params, lora, cfg)                  -> params with adapters beside their kernels (per-layer LoRA)
  apply_lora(params, lora, cfg, dtype=None)      -> effective params (differentiable wrt `lora`)
  merge(params, lora, cfg)                        -> merged base params for export (= PEFT merge_and_unload)
  trainable_mask(tree) -> bool tree               True on the adapters the optimizer updates
  targets(params, cfg) -> [Target]                what gets adapted (PEFT name, shapes), for logs/tests
  count_params(tree) -> int
  Combined tree for `vla_jax.training.state.ParamHooks` (the adapters sit under params['lora']):
  ParamHooks(**hook_functions(cfg)) gives extend_params=add_lora, trainable=trainable_mask,
  apply_params=attached_params (per layer; `per_layer=False`: effective_params, merged).

`params` is the tree under 'params' (keys dino/siglip/projector/llm), boxed (nn.LogicallyPartitioned)
or plain, real arrays or ShapeDtypeStructs (under jax.eval_shape). Outputs keep the boxing of the input.

Adapter layout (structured shapes; numerically PEFT's flat A/B). For a kernel [*batch, *in, *out]
(scanned kernels have one leading 'layers' batch axis; it is a batch axis for LoRA):
  lora_A [*batch, *in, r]   logical names (*batch names, *in names, None)
  lora_B [*batch, r, *out]  logical names (*batch names, None, *out names)
so delta = reshape(A)[.., in_flat, r] @ reshape(B)[.., r, out_flat]. PEFT's torch weights are
lora_A.weight [r, in_flat] = A.T and lora_B.weight [out_flat, r] = B.T (per layer), with in/out
flattened in our kernel's axis order. The two exceptions, where our layout differs from torch's:
  * ViT `qkv` is one nn.Linear in timm (3D outputs in (3, heads, head_dim) row order) but three
    kernels query/key/value here. PEFT puts ONE adapter on it, so we do too: lora path
    `.../attn/qkv`, A [L, D, r] shared, B [L, r, 3, H, hd] whose [:, :, i] feeds query/key/value.
  * `patch_embed` (a Conv2d, stride = kernel = patch): our kernel is [p, p, 3, D] (in = (p, p, 3)).
    PEFT's conv adapter is lora_A.weight [r, 3, p, p] = A.transpose(3, 2, 0, 1), lora_B.weight
    [D, r, 1, 1] = B.T[..., None, None].

PEFT "all-linear" (0.11.1) = every nn.Linear base name, the output embedding NOT removed (its full
name `language_model.lm_head` is compared against base names), plus any other module whose name ends
in one of those base names: the ViT Conv2d `patch_embed.proj` ends in `proj`. Not adapted: the token
embedding, norms, biases, cls/reg/pos tokens, LayerScale, the MAP-head latent. See `_TABLE`.
openvla-7b at r=32: 110,828,288 adapter parameters, the reference count (OPENVLA_REFERENCE.md §9).
Adapters of modules the model never runs (the towers' last_block, SigLIP's attn_pool) are created
(PEFT creates and counts them) but `trainable_mask` leaves them out, as torch's AdamW skips them.

Init "gaussian": A ~ normal(std = 1/r) (PEFT: `nn.init.normal_(lora_A, std=1 / r)`), B = 0, so
the adapted model starts equal to the base model. Dropout 0 only (a merged weight cannot express
dropout on the adapter input).

Numerics, per layer: A and B (scaled) are cast to the compute dtype like the kernel, so under bf16
compute the adapter path runs in bf16 beside the bf16 base matmul, as PEFT training does with OpenVLA's
bf16 model (its adapters follow the base weight's dtype), and deltas below bf16's resolution of W
still count. For a fused qkv the shared A is applied once per member (the same values three times).

Numerics, merged: the delta is computed in fp32 at HIGHEST precision and added to W in fp32 (or W's wider
dtype), then cast to `dtype` (default W's dtype). With bf16 compute the modules cast the effective
kernel to bf16, so the forward sees bf16(W + delta): the rounding of PEFT's bf16 merged export, but
not of PEFT training, which adds scale * B(A(x)) beside the bf16 base and so also sees deltas below
bf16's resolution of W (~2^-8 relative). The backward passes through the cast unchanged.
Memory, merged: the effective kernels and, in the backward, their full-size cotangents are
materialised (bench/plan_7b_memory.py measures both ways at 7B; BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vla_jax.models.dense import LORA_A, LORA_B  # adapter leaf names, also read by Linear
from vla_jax.models.params import count_params  # noqa: F401  (part of this module's API, see above)

LORA_KEY = "lora"  # where add_lora puts the adapters in a combined params tree

# Our kernel's module name -> (PEFT base name, number of input axes, number of output axes).
# This is the PEFT "base names" table for OpenVLA: the names PEFT sees on the torch modules.
_TABLE: Dict[str, Tuple[str, int, int]] = {
    # ViT blocks (DINOv2 and SigLIP): timm Attention.qkv (fused, see _FUSED), Attention.proj, Mlp.fc1/fc2
    "query": ("qkv", 1, 2), "key": ("qkv", 1, 2), "value": ("qkv", 1, 2),
    "out": ("proj", 2, 1),
    "fc1": ("fc1", 1, 1), "fc2": ("fc2", 1, 1),
    # ViT PatchEmbed.proj (Conv2d; matched by the base name "proj")
    "patch_embed": ("proj", 3, 1),
    # SigLIP MAP head (timm AttentionPoolLatent): q, kv, proj Linears (its mlp is fc1/fc2 above)
    "q": ("q", 1, 1), "kv": ("kv", 1, 1), "proj": ("proj", 1, 1),
    # Projector (FusedMLPProjector)
    "fc3": ("fc3", 1, 1),
    # Llama
    "q_proj": ("q_proj", 1, 2), "k_proj": ("k_proj", 1, 2), "v_proj": ("v_proj", 1, 2),
    "o_proj": ("o_proj", 2, 1),
    "gate_proj": ("gate_proj", 1, 1), "up_proj": ("up_proj", 1, 1), "down_proj": ("down_proj", 1, 1),
    "lm_head": ("lm_head", 1, 1),
}
# Kernels that are one torch Linear in the reference: (our members in torch output order, lora name).
_FUSED = (("query", "key", "value"), "qkv")
PEFT_BASE_NAMES = tuple(sorted({v[0] for v in _TABLE.values()}))

# Modules OpenVLA creates but never runs (vit.py: features come from block depth-2). Their adapters
# get no gradient; torch's AdamW skips parameters without a gradient, so they stay at their init.
_UNUSED = (("dino", "last_block"), ("dino", "attn_pool"), ("siglip", "last_block"), ("siglip", "attn_pool"))

# OpenVLA-OFT's L1 action head (params['action_head']) and proprio projector (params['proprio_projector'])
# are modules beside the PEFT-wrapped VLA in upstream's finetune.py: they get no adapters and are
# trained in full (OFT_REFERENCE.md §9). So are OFT+'s FiLM linears (params['film']): upstream wraps
# the towers' blocks after get_peft_model, so PEFT never sees them (§8).
FULLY_TRAINED = ("action_head", "proprio_projector", "film")
# FiLM linears of the towers' last block, which never runs: no gradient, left out like _UNUSED.
_UNUSED_FILM = (("film", "dino", "last_block"), ("film", "siglip", "last_block"))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """finetune.py's LoraConfig. targets: 'all-linear' or a tuple of PEFT base names (PEFT matches a
    module whose name ends in one of them), e.g. ('q_proj', 'v_proj')."""

    rank: int = 32
    alpha: float = 16.0
    targets: Union[str, Tuple[str, ...]] = "all-linear"
    init: str = "gaussian"
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if self.init != "gaussian":
            raise ValueError(f"LoraConfig.init={self.init!r}; only 'gaussian' (finetune.py's choice) is implemented")
        if self.dropout != 0.0:
            raise ValueError(f"LoraConfig.dropout={self.dropout!r}; only 0.0 is supported (finetune.py's value; "
                             f"a merged weight could not express dropout on the adapter input)")
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                raise ValueError(f"LoraConfig.targets={self.targets!r}; expected 'all-linear' or a tuple of "
                                 f"PEFT base names from {PEFT_BASE_NAMES}")
        else:
            object.__setattr__(self, "targets", tuple(self.targets))
            bad = [t for t in self.targets if t not in PEFT_BASE_NAMES]
            if bad or not self.targets:
                raise ValueError(f"LoraConfig.targets has unknown base names {bad} (or is empty); "
                                 f"known: {PEFT_BASE_NAMES}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def selects(self, peft_name: str) -> bool:
        return self.targets == "all-linear" or peft_name in self.targets


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapter. path: its place in the LoRA tree; kernels: the params paths it updates (3 for a
    fused qkv, in output order); in_shape/out_shape exclude the batch axes; out_shape of a fused
    adapter starts with the member axis."""

    path: Tuple[str, ...]
    peft_name: str
    kernels: Tuple[Tuple[str, ...], ...]
    batch_shape: Tuple[int, ...]
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    a_names: Tuple[Optional[str], ...]
    b_names: Tuple[Optional[str], ...]

    def a_shape(self, rank: int) -> Tuple[int, ...]:
        return self.batch_shape + self.in_shape + (rank,)

    def b_shape(self, rank: int) -> Tuple[int, ...]:
        return self.batch_shape + (rank,) + self.out_shape

    def num_params(self, rank: int) -> int:
        return int(np.prod(self.batch_shape, dtype=np.int64)) * rank * (
            int(np.prod(self.in_shape, dtype=np.int64)) + int(np.prod(self.out_shape, dtype=np.int64)))


def _is_box(x) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _value(leaf):
    return leaf.unbox() if _is_box(leaf) else leaf


def _names(leaf, ndim: int, n_batch: int) -> Tuple[Optional[str], ...]:
    """The kernel's logical axis names; plain arrays get 'layers' on batch axes and None elsewhere."""
    if isinstance(leaf, nn.LogicallyPartitioned):
        return tuple(leaf.names)
    return ("layers",) * n_batch + (None,) * (ndim - n_batch)


def _path_str(path) -> str:
    return "/".join(path)


def targets(params: Any, cfg: LoraConfig) -> List[Target]:
    """The adapters `cfg` puts on `params`, sorted by LoRA path.

    Every kernel must be in the base-name table, so a new Linear cannot be silently left out of
    'all-linear' (ValueError naming it otherwise).
    """
    flat = traverse_util.flatten_dict(params)
    fused_members, fused_name = _FUSED
    groups: Dict[Tuple[str, ...], Dict[str, Any]] = {}
    out: List[Target] = []
    for path, leaf in flat.items():
        if path[-1] != "kernel" or path[0] in FULLY_TRAINED:
            continue
        module = path[-2] if len(path) >= 2 else ""
        if module not in _TABLE:
            raise ValueError(f"kernel {_path_str(path)}: module {module!r} is not in the LoRA base-name table "
                             f"(vla_jax/models/lora.py _TABLE); add it with its PEFT name and in/out axis counts")
        peft_name, n_in, n_out = _TABLE[module]
        if not cfg.selects(peft_name):
            continue
        shape = tuple(_value(leaf).shape)
        n_batch = len(shape) - n_in - n_out
        if n_batch < 0:
            raise ValueError(f"kernel {_path_str(path)} has shape {shape}; expected at least {n_in} input and "
                             f"{n_out} output axes")
        names = _names(leaf, len(shape), n_batch)
        if len(names) != len(shape):
            raise ValueError(f"kernel {_path_str(path)}: {len(names)} logical names {names} for shape {shape}")
        info = dict(path=path, shape=shape, n_batch=n_batch, n_in=n_in, names=names)
        if module in fused_members:
            groups.setdefault(path[:-2], {})[module] = info
            continue
        in_end = n_batch + n_in
        out.append(Target(path=path[:-1], peft_name=peft_name, kernels=(path,), batch_shape=shape[:n_batch],
                          in_shape=shape[n_batch:in_end], out_shape=shape[in_end:],
                          a_names=names[:in_end] + (None,), b_names=names[:n_batch] + (None,) + names[in_end:]))
    for parent, members in groups.items():
        if set(members) != set(fused_members):
            raise ValueError(f"{_path_str(parent)}: fused qkv needs kernels {fused_members}, found {sorted(members)}")
        infos = [members[m] for m in fused_members]
        if len({(i["shape"], i["names"]) for i in infos}) != 1:
            raise ValueError(f"{_path_str(parent)}: query/key/value kernels differ in shape or names: "
                             f"{[(i['shape'], i['names']) for i in infos]}")
        i = infos[0]
        nb, in_end, shape, names = i["n_batch"], i["n_batch"] + i["n_in"], i["shape"], i["names"]
        out.append(Target(path=parent + (fused_name,), peft_name=_TABLE[fused_members[0]][0],
                          kernels=tuple(m["path"] for m in infos), batch_shape=shape[:nb], in_shape=shape[nb:in_end],
                          out_shape=(len(fused_members),) + shape[in_end:], a_names=names[:in_end] + (None,),
                          b_names=names[:nb] + (None, None) + names[in_end:]))
    if not out:
        raise ValueError(f"LoraConfig.targets={cfg.targets!r} selects no kernel in these params")
    return sorted(out, key=lambda t: t.path)


def _check_lora_tree(flat_lora: dict, tgts: Sequence[Target], rank: int) -> None:
    expected = {t.path + (LORA_A,): t.a_shape(rank) for t in tgts}
    expected.update({t.path + (LORA_B,): t.b_shape(rank) for t in tgts})
    missing = sorted(set(expected) - set(flat_lora))
    extra = sorted(set(flat_lora) - set(expected))
    if missing or extra:
        raise ValueError(f"LoRA tree does not match params and LoraConfig(rank={rank}, ...): missing "
                         f"{[_path_str(p) for p in missing[:5]]}, unexpected {[_path_str(p) for p in extra[:5]]}")
    for path, want in expected.items():
        got = tuple(flat_lora[path].shape)
        if got != want:
            raise ValueError(f"LoRA {_path_str(path)} has shape {got}, expected {want} (rank {rank})")


def init_lora(params: Any, cfg: LoraConfig, rng: jax.Array, dtype: str = "float32") -> dict:
    """-> {…path…: {'lora_A': A, 'lora_B': B}} with A ~ N(0, std=1/r), B = 0, boxed with logical names.

    params: the model params (boxed or not; ShapeDtypeStructs work under jax.eval_shape).
    dtype: adapter dtype (fp32 master weights; PEFT would follow the base weight's dtype).
    """
    tgts = targets(params, cfg)
    dt = jnp.dtype(dtype)
    sizes = [math.prod(t.a_shape(cfg.rank)) for t in tgts]
    # One draw for all adapters: each separate jax.random call costs seconds of XLA compile on CPU.
    noise = jax.random.normal(rng, (sum(sizes),), dt) * jnp.asarray(1.0 / cfg.rank, dt)
    pieces = jnp.split(noise, np.cumsum(sizes)[:-1].tolist())
    flat = {}
    for piece, t in zip(pieces, tgts):
        a = piece.reshape(t.a_shape(cfg.rank))
        flat[t.path + (LORA_A,)] = nn.LogicallyPartitioned(a, t.a_names)
        flat[t.path + (LORA_B,)] = nn.LogicallyPartitioned(jnp.zeros(t.b_shape(cfg.rank), dt), t.b_names)
    return traverse_util.unflatten_dict(flat)


def delta(a: jax.Array, b: jax.Array, t: Target, scale: float) -> jax.Array:
    """scale * A @ B for one adapter: A [*batch, *in, r], B [*batch, r, *out] -> [*batch, *in, *out] fp32."""
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(t.batch_shape + (-1, r))
    b2 = b.astype(jnp.float32).reshape(t.batch_shape + (r, -1))
    # HIGHEST: accelerators would otherwise run an fp32 matmul in bf16 passes and round the delta.
    d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * jnp.float32(scale)
    return d.reshape(t.batch_shape + t.in_shape + t.out_shape)


def apply_lora(params: Any, lora: Any, cfg: LoraConfig, dtype: Optional[str] = None) -> Any:
    """-> params with every targeted kernel W replaced by W + (alpha/r) * A @ B.

    Same structure and boxing as `params`; untargeted leaves are returned as they are.
    dtype: dtype of the effective kernels (default: each kernel's own dtype).
    Differentiable wrt `lora` (and `params`). Raises ValueError when `lora` does not fit `params`.
    """
    tgts = targets(params, cfg)
    flat_lora = traverse_util.flatten_dict(nn.meta.unbox(lora))
    _check_lora_tree(flat_lora, tgts, cfg.rank)
    flat = traverse_util.flatten_dict(params)
    for t in tgts:
        d = delta(flat_lora[t.path + (LORA_A,)], flat_lora[t.path + (LORA_B,)], t, cfg.scale)
        member_axis = len(t.batch_shape) + len(t.in_shape)
        for i, kpath in enumerate(t.kernels):
            leaf = flat[kpath]
            w = _value(leaf)
            di = jnp.take(d, i, axis=member_axis) if len(t.kernels) > 1 else d
            out_dt = jnp.dtype(dtype) if dtype is not None else w.dtype
            new = (w.astype(jnp.promote_types(w.dtype, jnp.float32)) + di).astype(out_dt)
            flat[kpath] = leaf.replace_boxed(new) if _is_box(leaf) else new
    return traverse_util.unflatten_dict(flat)


def attach_lora(params: Any, lora: Any, cfg: LoraConfig) -> Any:
    """-> params where each targeted kernel's module also holds `lora_A` [*batch, *in, r] and `lora_B`
    [*batch, r, *out] (= alpha / r * B), which `models.dense.Linear` applies as `(x @ A) @ B`.

    The members of a fused qkv each get the shared A and their slice of B. Only B's scaled copy is
    new memory (r * out values per kernel); no kernel is touched. Same boxing as `params` (adapters
    boxed with their logical names when the kernel is). Differentiable wrt `lora`.
    """
    tgts = targets(params, cfg)
    flat_lora = traverse_util.flatten_dict(nn.meta.unbox(lora))
    _check_lora_tree(flat_lora, tgts, cfg.rank)
    flat = traverse_util.flatten_dict(params)
    for t in tgts:
        a = flat_lora[t.path + (LORA_A,)]
        b = flat_lora[t.path + (LORA_B,)] * jnp.asarray(cfg.scale, flat_lora[t.path + (LORA_B,)].dtype)
        member_axis = len(t.batch_shape) + 1  # B is [*batch, r, (member,) *out]
        b_names = t.b_names[:member_axis] + t.b_names[member_axis + 1:] if len(t.kernels) > 1 else t.b_names
        for i, kpath in enumerate(t.kernels):
            bi = jnp.take(b, i, axis=member_axis) if len(t.kernels) > 1 else b
            boxed = _is_box(flat[kpath])
            flat[kpath[:-1] + (LORA_A,)] = nn.LogicallyPartitioned(a, t.a_names) if boxed else a
            flat[kpath[:-1] + (LORA_B,)] = nn.LogicallyPartitioned(bi, b_names) if boxed else bi
    return traverse_util.unflatten_dict(flat)


def merge(params: Any, lora: Any, cfg: LoraConfig) -> Any:
    """PEFT's merge_and_unload: the base params with the adapters folded in, each kernel in its own dtype.
    Use for export / saving merged weights (the result loads into the plain model)."""
    return apply_lora(params, lora, cfg, dtype=None)


def _is_unused(path: Tuple[str, ...]) -> bool:
    return any(path[i:i + 2] == pair for pair in _UNUSED for i in range(len(path) - 1))


def trainable_mask(tree: Any) -> Any:
    """Bool tree over `tree` (a LoRA tree or a combined params tree, boxed or not; boxes are leaves):
    True for lora_A/lora_B leaves, except the adapters of modules the model never runs (towers'
    last_block and attn_pool: no gradient, so torch's AdamW never touches them), and for every leaf
    of a FULLY_TRAINED module (OFT's params['action_head'], params['proprio_projector'], OFT+'s params['film']
    except the last tower blocks' FiLM, which gets no gradient); False elsewhere."""

    def leaf(path, _):
        keys = tuple(getattr(k, "key", str(k)) for k in path)
        if keys and keys[0] in FULLY_TRAINED:
            return keys[:3] not in _UNUSED_FILM
        return bool(keys and keys[-1] in (LORA_A, LORA_B) and not _is_unused(keys))

    return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=_is_box)


# ----------------------------------------------------------------------------------------------
# Combined params tree ({dino, siglip, projector, llm, 'lora'}) for the training ParamHooks seam.


def split_lora(params: dict) -> Tuple[dict, Any]:
    """{..., 'lora': adapters} -> (base params without 'lora', adapters)."""
    if LORA_KEY not in params:
        raise ValueError(f"params have no {LORA_KEY!r} entry (keys {sorted(params)}); create it with add_lora")
    return {k: v for k, v in params.items() if k != LORA_KEY}, params[LORA_KEY]


def add_lora(params: dict, rng: jax.Array, cfg: LoraConfig) -> dict:
    """Base params -> {**params, 'lora': init_lora(params, cfg, rng)} (ParamHooks.extend_params)."""
    if LORA_KEY in params:
        raise ValueError(f"params already hold a {LORA_KEY!r} entry")
    return {**params, LORA_KEY: init_lora(params, cfg, rng)}


def effective_params(params: dict, cfg: LoraConfig, dtype: Optional[str] = None) -> dict:
    """Combined params -> effective base params, 'lora' removed (ParamHooks.apply_params)."""
    base, lora = split_lora(params)
    return apply_lora(base, lora, cfg, dtype)


def attached_params(params: dict, cfg: LoraConfig) -> dict:
    """Combined params -> base params with the adapters beside their kernels, 'lora' removed
    (ParamHooks.apply_params of per-layer LoRA)."""
    base, lora = split_lora(params)
    return attach_lora(base, lora, cfg)


def hook_functions(cfg: LoraConfig, per_layer: bool = True, dtype: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments for `ParamHooks`: extend_params, trainable, apply_params.
    per_layer: adapters applied inside each layer (`attach_lora`); False merges every kernel first
    (`effective_params`, with `dtype` as in apply_lora), which holds a second copy of the weights."""
    if per_layer and dtype is not None:
        raise ValueError("hook_functions: dtype applies to merged kernels only (per_layer=False)")
    apply = (lambda p: attached_params(p, cfg)) if per_layer else (lambda p: effective_params(p, cfg, dtype))
    return dict(extend_params=lambda p, rng: add_lora(p, rng, cfg), trainable=trainable_mask, apply_params=apply)
