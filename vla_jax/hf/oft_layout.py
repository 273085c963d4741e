"""Key tables of OpenVLA-OFT's extra checkpoint files <-> our params (OFT_REFERENCE.md §6b, §7, §9).

A released OFT folder holds the LoRA-merged HF OpenVLA model (read by `keys_openvla`) and, beside it,
one state dict per extra module, saved from its DDP wrapper (so every key starts with `module.`):

  action_head--{STEP}_checkpoint.pt        `L1RegressionActionHead` = `model`: MLPResNet(num_blocks=2)
  proprio_projector--{STEP}_checkpoint.pt  `ProprioProjector`: fc1 -> GELU -> fc2
  vision_backbone--{STEP}_checkpoint.pt    the FiLM-wrapped vision backbone (OFT+; no `module.` prefix:
                                           its own table is in `oft_film`)
  noisy_action_projector--{STEP}_checkpoint.pt   the diffusion head's projector (not supported here)

Tables (file key without `module.`, torch layout [out, in] -> params path, Flax layout [in, out]);
H = LLM width, D = action dim, P = proprio dim, W = head width (= H upstream):

  model.layer_norm1.{weight,bias} [D*H]              -> action_head/layer_norm1/{scale,bias}
  model.fc1.{weight [W, D*H], bias [W]}              -> action_head/fc1/{kernel [D*H, W], bias}
  model.mlp_resnet_blocks.{i}.ffn.0.{weight,bias} [W] -> action_head/mlp_resnet_blocks_{i}/layer_norm/{scale,bias}
  model.mlp_resnet_blocks.{i}.ffn.1.{weight [W, W], bias [W]} -> action_head/mlp_resnet_blocks_{i}/fc/{kernel,bias}
  model.layer_norm2.{weight,bias} [W]                -> action_head/layer_norm2/{scale,bias}
  model.fc2.{weight [D, W], bias [D]}                -> action_head/fc2/{kernel [W, D], bias}
  fc1.{weight [H, P], bias [H]}                      -> proprio_projector/fc1/{kernel [P, H], bias}
  fc2.{weight [H, H], bias [H]}                      -> proprio_projector/fc2/{kernel, bias}

The params side is `vla_jax.models.action_head.L1ActionHead` (params['action_head']) and the proprio
projector (params['proprio_projector']). Conversions are transposes only: bit-exact in any dtype.
Two forms, as in `keys_openvla`: per tensor (`component_rules` -> `TensorRule`s, what the streamed
import/export use) and whole-dict (`state_to_params`, `params_to_state`; small trees, tests).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from flax import traverse_util

from vla_jax.hf.keys_openvla import TensorRule

ACTION_HEAD = "action_head"
PROPRIO = "proprio_projector"
FILM = "vision_backbone"
DIFFUSION = "noisy_action_projector"
SUPPORTED = (ACTION_HEAD, PROPRIO)
COMPONENTS = (ACTION_HEAD, PROPRIO, FILM, DIFFUSION)
DDP_PREFIX = "module."  # torch DistributedDataParallel's wrapper attribute, kept in the saved keys
NUM_BLOCKS = 2  # upstream's L1RegressionActionHead: MLPResNet(num_blocks=2); our L1ActionHead's default
_BLOCK_RE = re.compile(r"model\.mlp_resnet_blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the extra files' shapes depend on. hidden: H; action_dim: D (None: no action head file);
    proprio_dim: P (None: no proprio projector file); head_width: W (H upstream)."""

    hidden: int
    action_dim: Optional[int] = None
    proprio_dim: Optional[int] = None
    head_width: Optional[int] = None
    num_blocks: int = NUM_BLOCKS

    @property
    def width(self) -> int:
        return self.hidden if self.head_width is None else self.head_width


def _linear(key: str, out_dim: int, in_dim: int, path: Tuple[str, ...]) -> List[TensorRule]:
    return [TensorRule(f"{key}.weight", (out_dim, in_dim), (path + ("kernel",),), None,
                       lambda w: (w.T,), lambda a: a[0].T),
            TensorRule(f"{key}.bias", (out_dim,), (path + ("bias",),), None, lambda b: (b,), lambda a: a[0])]


def _layer_norm(key: str, dim: int, path: Tuple[str, ...]) -> List[TensorRule]:
    return [TensorRule(f"{key}.weight", (dim,), (path + ("scale",),), None, lambda w: (w,), lambda a: a[0]),
            TensorRule(f"{key}.bias", (dim,), (path + ("bias",),), None, lambda b: (b,), lambda a: a[0])]


def action_head_rules(g: Geometry) -> List[TensorRule]:
    """Every tensor of `action_head--STEP_checkpoint.*` (keys without `module.`), in module order."""
    h, d, w = g.hidden, g.action_dim, g.width
    root = (ACTION_HEAD,)
    out = _layer_norm("model.layer_norm1", d * h, root + ("layer_norm1",))
    out += _linear("model.fc1", w, d * h, root + ("fc1",))
    for i in range(g.num_blocks):
        block = root + (f"mlp_resnet_blocks_{i}",)
        out += _layer_norm(f"model.mlp_resnet_blocks.{i}.ffn.0", w, block + ("layer_norm",))
        out += _linear(f"model.mlp_resnet_blocks.{i}.ffn.1", w, w, block + ("fc",))
    out += _layer_norm("model.layer_norm2", w, root + ("layer_norm2",))
    out += _linear("model.fc2", d, w, root + ("fc2",))
    return out


def proprio_rules(g: Geometry) -> List[TensorRule]:
    """Every tensor of `proprio_projector--STEP_checkpoint.*` (keys without `module.`)."""
    root = (PROPRIO,)
    return _linear("fc1", g.hidden, g.proprio_dim, root + ("fc1",)) + _linear("fc2", g.hidden, g.hidden,
                                                                              root + ("fc2",))


def component_rules(g: Geometry) -> Dict[str, List[TensorRule]]:
    """{file component: its rules} for the components `g` has (action head when action_dim is set,
    proprio projector when proprio_dim is set)."""
    out = {}
    if g.action_dim is not None:
        out[ACTION_HEAD] = action_head_rules(g)
    if g.proprio_dim is not None:
        out[PROPRIO] = proprio_rules(g)
    return out


# ----------------------------------------------------------------------------------------------
# Geometry from a file's shapes (before any data is read)


def _shape_of(shapes: Mapping[str, Tuple[int, ...]], key: str, ndim: int, where: str) -> Tuple[int, ...]:
    if key not in shapes:
        raise ValueError(f"{where} has no tensor {DDP_PREFIX}{key} (keys: {sorted(shapes)[:6]}...)")
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"{where}: tensor {DDP_PREFIX}{key} has shape {list(shape)}, expected {ndim} dims")
    return shape


def head_geometry(shapes: Mapping[str, Tuple[int, ...]], hidden: int, where: str) -> Tuple[int, int, int]:
    """(action_dim D, head width W, residual blocks) read from an action head file's shapes; the full
    key/shape check against the rules follows (`check_state`)."""
    d, w = _shape_of(shapes, "model.fc2.weight", 2, where)
    blocks = sorted({int(m.group(1)) for k in shapes for m in [_BLOCK_RE.match(k)] if m})
    if blocks != list(range(len(blocks))):
        raise ValueError(f"{where}: residual blocks {blocks} are not numbered 0..n-1")
    if len(blocks) != NUM_BLOCKS:
        raise ValueError(f"{where} has {len(blocks)} MLPResNet blocks (model.mlp_resnet_blocks.*); the L1 head "
                         f"here has {NUM_BLOCKS}, as upstream's L1RegressionActionHead")
    if w != hidden:
        raise ValueError(f"{where}: tensor {DDP_PREFIX}model.fc2.weight has shape {[d, w]}: head width {w}, but "
                         f"the model's LLM width (text_config.hidden_size) is {hidden} and the L1 head here is "
                         f"that wide, as upstream's")
    return d, w, len(blocks)


def proprio_geometry(shapes: Mapping[str, Tuple[int, ...]], hidden: int, where: str) -> int:
    """The proprio dimension P (fc1.weight is [H, P])."""
    h, p = _shape_of(shapes, "fc1.weight", 2, where)
    if h != hidden:
        raise ValueError(f"{where}: tensor {DDP_PREFIX}fc1.weight has shape {[h, p]}, expected [{hidden}, P] "
                         f"(the model's LLM width is {hidden})")
    return p


def check_state(shapes: Mapping[str, Tuple[int, ...]], rules: Sequence[TensorRule], where: str,
                prefix: str = DDP_PREFIX) -> None:
    """ValueError naming the file (`where`) and the first missing / unexpected keys and wrong shapes.
    `prefix`: what the file's keys start with, for the messages (`module.`; '' for the FiLM file)."""
    want = {r.key: tuple(r.shape) for r in rules}
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    bad = [k for k in want if k in shapes and tuple(shapes[k]) != want[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. " + ", ".join(
            f"{prefix}{k} (expected shape {list(want[k])})" for k in missing[:3]))
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors, e.g. " + ", ".join(
            f"{prefix}{k}" for k in unexpected[:3]))
    if bad:
        parts.append(f"{len(bad)} shape mismatches, e.g. " + ", ".join(
            f"{prefix}{k} has shape {list(shapes[k])}, expected {list(want[k])}" for k in bad[:3]))
    if parts:
        raise ValueError(f"{where} does not match the model: " + "; ".join(parts))


# ----------------------------------------------------------------------------------------------
# Whole-dict form


def state_to_params(component: str, state: Mapping[str, np.ndarray], g: Geometry) -> dict:
    """One file's state dict (keys without `module.`, numpy, torch layouts) -> {component root: subtree}."""
    rules = component_rules(g)[component]
    check_state({k: np.shape(v) for k, v in state.items()}, rules, component)
    flat = {}
    for r in rules:
        for path, arr in zip(r.leaves, r.to_flax(np.asarray(state[r.key]))):
            flat[path] = np.ascontiguousarray(arr)
    return traverse_util.unflatten_dict(flat)


def params_to_state(component: str, params: Mapping, g: Geometry) -> Dict[str, np.ndarray]:
    """params holding {component root: subtree} -> the file's state dict (keys without `module.`)."""
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for r in component_rules(g)[component]:
        missing = [p for p in r.leaves if p not in flat]
        if missing:
            raise ValueError(f"params lack {'/'.join(missing[0])} (needed for {component} {DDP_PREFIX}{r.key})")
        out[r.key] = np.ascontiguousarray(r.to_hf(tuple(np.asarray(flat[p]) for p in r.leaves)))
    used = {p for r in component_rules(g)[component] for p in r.leaves}
    stray = sorted(p for p in flat if p[0] == component and p not in used)
    if stray:
        raise ValueError(f"params have {component} leaves no {component} tensor uses: "
                         f"{['/'.join(p) for p in stray[:5]]}")
    return out
