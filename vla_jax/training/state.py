"""Train state, the AdamW optimizer (every hyperparameter explicit) and trainable-parameter masks.

The state is created already sharded: `jax.eval_shape(init)` gives the boxed (logically named)
abstract state, its logical specs become NamedShardings through the rules table, and
`jax.jit(init, out_shardings=...)` materialises each shard on its device. No host or device ever
holds an unsharded copy.

Freezing and LoRA: a boolean `trainable` mask over the parameter tree splits the parameters into
a trainable and a frozen subtree (`optax.MaskedNode` fills the holes). Gradients are taken and
optimizer moments kept only for the trainable subtree, so a frozen 7B LLM costs no gradient or
Adam memory. `ParamHooks` is the seam for LoRA: `extend_params` adds adapter parameters at init,
`trainable` selects them, and `apply_params` turns (base + adapters) into the effective weights
inside the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vla_jax import sharding as shd
from vla_jax.models.params import count_params

Params = Any


@flax.struct.dataclass
class TrainState:
    """step: int32 []; params: the full parameter tree; opt_state: optimizer state over the trainable
    subtree; rng: raw uint32 [2] key (raw so checkpoints store it as a plain array)."""

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class ParamHooks:
    """Optional parameter transforms (the LoRA seam); all default to the identity / everything trainable.

    extend_params: (boxed params, rng) -> boxed params, run inside the (jitted, sharded) init, e.g. to
      add adapter weights carrying logical axis names.
    trainable: params -> tree of Python bools (True = trained). Overrides the freeze options.
    apply_params: params -> effective params handed to the model inside the loss (e.g. W + s * A @ B).
    """

    extend_params: Optional[Callable[[Params, jax.Array], Params]] = None
    trainable: Optional[Callable[[Params], Any]] = None
    apply_params: Optional[Callable[[Params], Params]] = None


# --------------------------------------------------------------------------------------------
# Optimizer


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping. Mirrors torch.optim.AdamW: decoupled decay `lr * wd * p`
    applied to every trainable parameter, eps added after the square root, bias correction on.

    schedule: 'constant' | 'warmup_constant' | 'warmup_cosine' (cosine to end_lr_fraction * lr at
    num_steps) | 'step' (linear warmup if any, then lr until step decay_steps and lr * decay_factor
    from there on: torch's MultiStepLR with one milestone, as OpenVLA-OFT). grad_clip <= 0 disables
    clipping.
    """

    learning_rate: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    grad_clip: float
    schedule: str = "constant"
    warmup_steps: int = 0
    end_lr_fraction: float = 0.0
    decay_steps: int = 0
    decay_factor: float = 0.1

    @classmethod
    def from_config(cls, cfg) -> "OptimConfig":
        # decay_steps/decay_factor came later: recorded configs without them keep the defaults.
        optional = ("decay_steps", "decay_factor")
        names = [f.name for f in dataclasses.fields(cls) if f.name in cfg or f.name not in optional]
        missing = [n for n in names if n not in cfg]
        if missing:
            raise ValueError(f"config.optim is missing {missing}; every AdamW hyperparameter must be explicit")
        return cls(**{n: cfg[n] for n in names})


SCHEDULES = ("constant", "warmup_constant", "warmup_cosine", "step")


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
    lr, warm = float(cfg.learning_rate), int(cfg.warmup_steps)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"config.optim.schedule={cfg.schedule!r}; expected one of {SCHEDULES}")
    if warm < 0 or (cfg.schedule != "constant" and warm >= max(num_steps, 1)):
        raise ValueError(f"config.optim.warmup_steps={warm} must be in [0, num_steps={num_steps})")
    if cfg.schedule == "constant":
        return optax.constant_schedule(lr)
    if cfg.schedule == "warmup_constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])
    if cfg.schedule == "step":
        decay = int(cfg.decay_steps)
        if not warm < decay:
            raise ValueError(f"config.optim.decay_steps={decay} must be > warmup_steps={warm} with schedule='step'")
        if not 0.0 < float(cfg.decay_factor) <= 1.0:
            raise ValueError(f"config.optim.decay_factor={cfg.decay_factor} must be in (0, 1]")
        # MultiStepLR: lr for steps [0, decay), lr * factor from step `decay` on (optax counts from 0 too).
        stepped = optax.piecewise_constant_schedule(lr, {decay: float(cfg.decay_factor)})
        if warm == 0:
            return stepped
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warm),
                                     lambda n: stepped(n + warm)], [warm])
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, num_steps, end_value=lr * cfg.end_lr_fraction)


def make_optimizer(cfg: OptimConfig, num_steps: int) -> Tuple[optax.GradientTransformation, optax.Schedule]:
    """-> (optax transformation over the trainable subtree, learning-rate schedule)."""
    for name, lo, hi in (("learning_rate", 0.0, None), ("weight_decay", 0.0, None), ("b1", 0.0, 1.0),
                         ("b2", 0.0, 1.0), ("eps", 0.0, None)):
        v = getattr(cfg, name)
        if v < lo or (hi is not None and v >= hi):
            raise ValueError(f"config.optim.{name}={v} must be >= {lo}" + (f" and < {hi}" if hi else ""))
    schedule = make_schedule(cfg, num_steps)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0,
                             weight_decay=cfg.weight_decay, mask=None))
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------------------------
# Trainable masks and the trainable/frozen split

# Parameters OpenVLA creates but never runs (the towers' last block, final norm and SigLIP's MAP
# head: features come from block depth-2). They get no gradient, so torch's AdamW skips them; we
# leave them out of the optimizer (no moments, no decay).
UNUSED_VISION_PARAMS = ("last_block", "norm", "attn_pool")
VISION_TOWERS = ("dino", "siglip")
# OpenVLA-OFT's modules that an OpenVLA checkpoint does not have: created from their init when a run
# starts from one, and always trained (upstream trains them in full beside the LoRA adapters).
NEW_MODULES = ("action_head", "proprio_projector", "film")


def trainable_mask(params: Params, *, vision: bool = True, projector: bool = True, llm: bool = True) -> Any:
    """Bool tree over `params` (boxed or not): which parameters the optimizer updates."""
    params = nn.meta.unbox(params)
    expected = {"dino", "siglip", "projector", "llm"}
    # OpenVLA-OFT's modules that are new at fine-tuning are always trained: the L1 action head
    # (action_head='l1') and the proprio projector (proprio_dim set).
    if set(params) - set(NEW_MODULES) != expected:
        raise ValueError(f"parameter tree has top-level keys {sorted(params)}, expected {sorted(expected)} "
                         f"(+ 'action_head' with OpenVLA-OFT's L1 head, 'proprio_projector' with a proprio input, "
                         f"'film' with OFT+'s FiLM)")
    flags = {"dino": vision, "siglip": vision, "projector": projector, "llm": llm, **{k: True for k in NEW_MODULES}}

    def leaf(path, _):
        top = path[0].key
        if top in VISION_TOWERS and path[1].key in UNUSED_VISION_PARAMS:
            return False
        if top == "film" and path[2].key == "last_block":  # OFT+'s FiLM of the never-run last block
            return False
        return bool(flags[top])

    return jax.tree_util.tree_map_with_path(leaf, params)


def select(tree: Params, mask: Any, keep: bool = True) -> Params:
    """Leaves where mask == keep; the others become `optax.MaskedNode()` (an empty subtree)."""
    return jax.tree.map(lambda m, x: x if bool(m) == keep else optax.MaskedNode(), mask, tree)


def merge(mask: Any, trainable: Params, frozen: Params) -> Params:
    """Inverse of (select(tree, mask, True), select(tree, mask, False))."""
    return jax.tree.map(lambda m, t, f: t if bool(m) else f, mask, trainable, frozen,
                        is_leaf=lambda x: isinstance(x, optax.MaskedNode))


# --------------------------------------------------------------------------------------------
# Sharded creation


def _check_divisible(abstract: Any, shardings: Any) -> None:
    """Every sharded dim must divide by its mesh-axes size; name the first parameter that does not."""
    flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_s = jax.tree.leaves(shardings)
    for (path, a), s in zip(flat_a, flat_s):
        for dim, (n, axes) in enumerate(zip(a.shape, tuple(s.spec) + (None,) * (len(a.shape) - len(s.spec)))):
            if axes is None:
                continue
            size = int(np.prod([s.mesh.shape[ax] for ax in (axes if isinstance(axes, tuple) else (axes,))]))
            if n % size:
                raise ValueError(f"parameter {jax.tree_util.keystr(path)} of shape {tuple(a.shape)} cannot be "
                                 f"sharded: dim {dim} (size {n}) over mesh axes {axes} ({size} devices); "
                                 f"change the mesh or the logical-axis rules")


def abstract_params(model: nn.Module, example_inputs: Tuple[Any, ...], hooks: ParamHooks = ParamHooks()) -> Params:
    """Boxed ShapeDtypeStruct params (logical names kept), no memory used."""

    def init(rng):
        params = model.init(rng, *example_inputs)["params"]
        return hooks.extend_params(params, rng) if hooks.extend_params else params

    return jax.eval_shape(init, jax.random.PRNGKey(0))


def _model_modules(model: nn.Module) -> Tuple[str, ...]:
    """The NEW_MODULES a model (an OpenVLA, by its config) creates."""
    cfg = getattr(model, "config", None)
    out = []
    if getattr(cfg, "action_head", "tokens") == "l1":
        out.append("action_head")
    if getattr(cfg, "proprio_dim", None) is not None:
        out.append("proprio_projector")
    if getattr(cfg, "film", False):
        out.append("film")
    return tuple(out)


def _state_init_fn(model: nn.Module, tx: optax.GradientTransformation, example_inputs, mask, hooks: ParamHooks):
    """rng -> boxed TrainState (params from model.init, or the model's `params` when given; then
    hooks.extend_params adds e.g. adapters)."""

    def init_boxed(rng, params=None):
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = model.init(init_rng, *example_inputs)["params"]
        else:
            # OpenVLA-OFT fine-tuning from an OpenVLA checkpoint: the L1 head and the proprio projector
            # start from their init (the rest of this init is unused and dropped by the compiler).
            missing = [k for k in NEW_MODULES if k in _model_modules(model) and k not in params]
            if missing:
                fresh = model.init(init_rng, *example_inputs)["params"]
                params = dict(params, **{k: fresh[k] for k in missing})
        if hooks.extend_params:
            params = hooks.extend_params(params, init_rng)
        opt_state = tx.init(select(params, mask, True))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng)

    return init_boxed


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rules, seed: int,
                         example_inputs: Tuple[Any, ...], mask: Any, hooks: ParamHooks = ParamHooks()):
    """-> (state shardings, abstract state of ShapeDtypeStructs carrying those shardings); no memory used.
    The abstract state is the restore target for checkpoints and what compatibility checks compare."""
    init_boxed = _state_init_fn(model, tx, example_inputs, mask, hooks)
    boxed = jax.eval_shape(init_boxed, jax.random.PRNGKey(seed))
    shardings = shd.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    abstract = nn.meta.unbox(boxed)
    _check_divisible(abstract, shardings)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return shardings, abstract


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh, rules, seed: int,
                       example_inputs: Tuple[Any, ...], mask: Any, hooks: ParamHooks = ParamHooks(),
                       params: Optional[Params] = None):
    """Builds the sharded train state.

    example_inputs: model.init arguments (shapes only matter), e.g. numpy uint8 [1, S, S, 3] and int32 [1, T].
    mask: bool tree over the params (from `trainable_mask` or hooks.trainable).
    params: pretrained model parameters (the dino/siglip/projector/llm tree, without hook additions)
      already on their shardings; consumed (their buffers are donated). None initialises randomly.
    Returns (state, state_shardings, abstract_state).
    """
    shardings, abstract = abstract_train_state(model, tx, mesh, rules, seed, example_inputs, mask, hooks)
    init_boxed = _state_init_fn(model, tx, example_inputs, mask, hooks)
    rng = jax.random.PRNGKey(seed)
    if params is None:
        init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings).lower(rng)
    else:
        init = jax.jit(lambda r, p: nn.meta.unbox(init_boxed(r, p)), out_shardings=shardings,
                       donate_argnums=(1,)).lower(rng, params)
    # Init runs once; on CPU, XLA's backend optimizations triple its compile time for nothing.
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    compiled = init.compile(compiler_options=options)
    state = compiled(rng) if params is None else compiled(rng, params)
    return state, shardings, abstract


def param_summary(params: Params, mask: Any) -> Dict[str, int]:
    """{'total': n, 'trainable': n, <top-level module>: n}."""
    params = nn.meta.unbox(params)
    out = {"total": count_params(params), "trainable": count_params(select(params, mask, True))}
    out.update({k: count_params(v) for k, v in params.items()})
    return out
