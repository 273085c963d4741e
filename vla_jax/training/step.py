"""The train step: action-token loss, metrics, gradient accumulation, one jitted sharded update.

Loss (OPENVLA_REFERENCE.md §1.5, §7): HF's shifted causal-LM cross-entropy restricted to the
supervised positions (7 action tokens + EOS per example), softmax over the full vocabulary in
fp32, mean over every supervised token of the global batch. With I embeddings inserted after BOS
(fused = [t_0, p_1..p_I, t_1, t_2, ...]: every camera's patches, then the proprio token if any;
I = `OpenVLAConfig.num_inserted_tokens`), text token t >= 1 sits at fused index t + I and is
predicted by the logit at fused index t + I - 1; the lm_head runs only there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from vla_jax import sharding as shd
from vla_jax.models.execution import ExecutionConfig
from vla_jax.spec import IGNORE_INDEX, ActionCodec, BatchSpec
from vla_jax.training.state import ParamHooks, TrainState, merge, select

SUM_KEYS = ("ce_sum", "tokens", "correct", "l1_sum", "actions", "ds_correct", "ds_l1_sum", "ds_actions")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the loss reads, all from the run's BatchSpec: num_inserted I (the positions inserted after
    BOS, a model fact: `OpenVLAConfig.num_inserted_tokens`), the batch layout (which keys the step
    takes: cameras, proprio) and through it the ActionCodec (supervised positions per example, the
    action-id range and its decoding) and the mixture size (per-dataset metrics)."""

    num_inserted: int
    spec: BatchSpec

    @property
    def codec(self) -> ActionCodec:
        return self.spec.codec

    @property
    def num_supervised(self) -> int:
        return self.spec.codec.num_supervised

    @property
    def num_datasets(self) -> int:
        return self.spec.num_datasets

    @classmethod
    def for_model(cls, model_config, spec: BatchSpec) -> "LossConfig":
        if spec.image_size != model_config.image_size:
            raise ValueError(f"BatchSpec.image_size={spec.image_size} but the model takes {model_config.image_size}")
        check_inputs_match(model_config, spec)
        return cls(num_inserted=model_config.num_inserted_tokens, spec=spec)


def check_inputs_match(model_config, spec: BatchSpec) -> None:
    """ValueError unless the batch layout's cameras and proprio are what the model takes."""
    n, p = int(getattr(model_config, "num_images", 1)), getattr(model_config, "proprio_dim", None)
    if len(spec.cameras) != n:
        raise ValueError(f"the batch layout has {len(spec.cameras)} camera(s) {list(spec.cameras)} but the model "
                         f"takes num_images={n}")
    if spec.proprio_dim != p:
        raise ValueError(f"the batch layout has proprio_dim={spec.proprio_dim} but the model has proprio_dim={p}")


def supervised_positions(labels, num_inserted: int, k: int):
    """labels int32 [B, L] (-100 = unsupervised) -> (logit positions [B, K] into the fused sequence,
    targets [B, K], valid [B, K] bool). The first K supervised tokens of each row, in order; rows with
    fewer than K are padded with invalid entries (the host-side check rejects rows with more)."""
    supervised = labels != IGNORE_INDEX
    # Stable argsort of "not supervised" lists the supervised indices first, in sequence order.
    order = jnp.argsort(~supervised, axis=1, stable=True)[:, :k].astype(jnp.int32)
    targets = jnp.take_along_axis(labels, order, axis=1)
    valid = targets != IGNORE_INDEX
    # Label index 0 (BOS) is never supervised, so order >= 1 wherever valid.
    positions = jnp.maximum(order + num_inserted - 1, 0)
    return positions, jnp.where(valid, targets, 0), valid


def _metric_sums(logits, targets, valid, dataset_index, cfg: LossConfig) -> Dict[str, jax.Array]:
    """Per-micro-batch sums (summable across micro-batches): CE, token count, action-token correct
    count, |decoded pred - decoded label| sum, action count, and the same per dataset [D]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    validf = valid.astype(jnp.float32)
    is_action = valid & cfg.codec.is_action_id(targets)
    actf = is_action.astype(jnp.float32)
    pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    decode = lambda ids: cfg.codec.decode(ids, xp=jnp)  # float32; non-action ids decode after clipping
    correct = (pred == targets).astype(jnp.float32) * actf
    l1 = jnp.abs(decode(pred) - decode(targets)) * actf
    onehot = jax.nn.one_hot(dataset_index, cfg.num_datasets, dtype=jnp.float32)  # [B, D]
    return {
        "ce_sum": jnp.sum(ce * validf), "tokens": jnp.sum(validf),
        "correct": jnp.sum(correct), "l1_sum": jnp.sum(l1), "actions": jnp.sum(actf),
        "ds_correct": onehot.T @ jnp.sum(correct, axis=1), "ds_l1_sum": onehot.T @ jnp.sum(l1, axis=1),
        "ds_actions": onehot.T @ jnp.sum(actf, axis=1),
    }


def make_loss_fn(model: nn.Module, cfg: LossConfig, hooks: ParamHooks = ParamHooks()):
    """-> loss_fn(params, micro_batch, total_tokens, rng) -> (CE sum / total_tokens, metric sums).

    Dividing each micro-batch's CE sum by the global supervised-token count makes the sum over
    micro-batches exactly the mean over the global batch; `loss_fn.count(global_batch)` gives that
    count. A codec with decoding='parallel' (OpenVLA-OFT) takes its loss from
    `vla_jax.training.oft_step` instead (the one branch point; same signature and metric sums).
    """
    if cfg.codec.decoding == "parallel":
        from vla_jax.training import oft_step

        return oft_step.make_parallel_loss_fn(model, cfg, hooks, _metric_sums)

    def loss_fn(params, batch, total_tokens, rng):
        if hooks.apply_params is not None:
            params = hooks.apply_params(params)
        positions, targets, valid = supervised_positions(batch["labels"], cfg.num_inserted, cfg.num_supervised)
        logits = model.apply({"params": params}, batch["pixel_values"], batch["input_ids"], positions,
                             proprio=batch.get("proprio"), rngs={"dropout": rng})
        sums = _metric_sums(logits, targets, valid, batch["dataset_index"], cfg)
        return sums["ce_sum"] / total_tokens, sums

    loss_fn.count = lambda batch: jnp.maximum(jnp.sum((batch["labels"] != IGNORE_INDEX).astype(jnp.float32)), 1.0)
    return loss_fn


def _split_micro(x, n: int, mesh=None):
    """[B, ...] -> [n, B/n, ...] with micro-batch m = rows m, m+n, m+2n, ...: each device's contiguous
    block of rows contributes equally to every micro-batch, so no data moves between devices."""
    y = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    y = jnp.swapaxes(y, 0, 1)
    if mesh is None:
        return y
    spec = PartitionSpec(None, shd.BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))


def finalize_metrics(sums: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Sums -> ratios (loss, accuracy, l1, per-dataset arrays)."""
    safe = lambda n: jnp.maximum(n, 1.0)
    return {
        "loss": sums["ce_sum"] / safe(sums["tokens"]),
        "action_accuracy": sums["correct"] / safe(sums["actions"]),
        "l1_loss": sums["l1_sum"] / safe(sums["actions"]),
        "supervised_tokens": sums["tokens"],
        "ds_action_accuracy": sums["ds_correct"] / safe(sums["ds_actions"]),
        "ds_l1_loss": sums["ds_l1_sum"] / safe(sums["ds_actions"]),
        "ds_actions": sums["ds_actions"],
    }


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_cfg: LossConfig, mask: Any, grad_accum_steps: int = 1,
                    hooks: ParamHooks = ParamHooks(), mesh=None, return_grads: bool = False) -> Callable:
    """-> train_step(state, batch) -> (new state, metrics) (not jitted; see `jit_train_step`).

    batch: the keys of loss_cfg.spec (pixel_values uint8 [B, S, S, 3] or [B, N, S, S, 3] with N cameras,
    input_ids/labels int32 [B, L], dataset_index int32 [B] for OpenVLA; proprio float32 [B, P] with a
    proprio input; with OFT's parallel decoding also attention_mask int32 [B, L] and, for the L1 head,
    actions float32 [B, K, D]; other keys are ignored). Gradients flow only into the
    trainable subtree of `mask`. mesh: keeps each micro-batch spread over the data-parallel devices
    (grad_accum_steps > 1). return_grads: add the trainable gradients to the metrics as metrics['grads'] (tests, debugging).
    """
    loss_fn = make_loss_fn(model, loss_cfg, hooks)
    n_micro = int(grad_accum_steps)
    if n_micro < 1:
        raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

    def train_step(state: TrainState, batch: Dict[str, jax.Array]):
        batch = loss_cfg.spec.select(batch)
        trainable, frozen = select(state.params, mask, True), select(state.params, mask, False)
        total = loss_fn.count(batch)  # global: micro-batch losses are sums over it
        # A fresh key per step (and micro-batch) derived from the state's key: a resumed run draws
        # the same numbers. (The OpenVLA model has no dropout; the key is there for any that is added.)
        step_rng = jax.random.fold_in(state.rng, state.step)

        def grad_of(mb, rng):
            fn = lambda t: loss_fn(merge(mask, t, frozen), mb, total, rng)
            return jax.value_and_grad(fn, has_aux=True)(trainable)

        if n_micro == 1:
            (_, sums), grads = grad_of(batch, step_rng)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, n_micro, mesh), batch)

            def body(carry, xs):
                g_acc, s_acc = carry
                mb, i = xs
                (_, sums), g = grad_of(mb, jax.random.fold_in(step_rng, i))
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

            d = loss_cfg.num_datasets
            zero_sums = {k: jnp.zeros((d,) if k.startswith("ds_") else (), jnp.float32) for k in SUM_KEYS}
            init = (jax.tree.map(jnp.zeros_like, trainable), zero_sums)
            (grads, sums), _ = jax.lax.scan(body, init, (micro, jnp.arange(n_micro)))

        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_params = merge(mask, new_trainable, frozen)
        metrics = finalize_metrics(sums)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(trainable)  # before the update
        # The loss above was computed before the update: these two let the loop refuse to save an
        # update that exploded while the loss still looked fine.
        metrics["update_norm"] = optax.tree.norm(updates)
        metrics["params_finite"] = jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new_trainable)])).astype(jnp.float32)
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        if return_grads:
            metrics["grads"] = grads
        new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state)
        return new_state, metrics

    # jit_train_step reads the model's execution switches (constrain_activations) from here.
    train_step.execution = getattr(getattr(model, "config", None), "execution", ExecutionConfig())
    return train_step


def jit_train_step(train_step: Callable, mesh, state_shardings, batch_shapes: Dict[str, Tuple[int, ...]],
                   rules=shd.LOGICAL_RULES, constrain_activations: Optional[bool] = None, steps_per_call: int = 1):
    """Jits `train_step` with explicit shardings and the state donated; calls run under `mesh` and
    `rules` (Flax's activation constraints are no-ops without them); constrain_activations None: the
    model config's `ExecutionConfig.constrain_activations` (`train_step.execution`, set by
    `make_train_step`; the ExecutionConfig default for other callables).

    batch_shapes: {key: global shape}; each batch key is sharded on its leading axis over the data axes.
    steps_per_call n > 1: the callable runs n consecutive steps in one program (`lax.scan` over the
    step), taking batches stacked as [n, *shape] (`shd.host_batch_to_global(..., stacked=True)`) and
    returning metrics stacked as [n, ...]. Same updates as n calls; what it saves is per call: the
    dispatch and, on XLA:CPU, the program's temporary buffer, which the host allocator maps fresh
    (and the kernel zero-fills page by page) on every execution.
    Returns a callable (state, batch) -> (state, metrics) that also has `.lower(state, batch)`.
    """
    n = int(steps_per_call)
    if n < 1:
        raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")
    stacked = n > 1
    fn = (lambda state, batches: jax.lax.scan(train_step, state, batches)) if stacked else train_step
    batch_shardings = {k: shd.batch_sharding(mesh, len(s) + 1 if stacked else len(s), stacked)
                       for k, s in batch_shapes.items()}
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(fn, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    if constrain_activations is None:
        constrain_activations = getattr(train_step, "execution", ExecutionConfig()).constrain_activations
    return shd.MeshBound(jitted, mesh, rules, constrain_activations)


def stack_batches(batches: Sequence[Dict[str, np.ndarray]], keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """n host batches -> one batch of `keys` stacked as [n, ...] (for a steps_per_call=n step)."""
    return {k: np.stack([b[k] for b in batches]) for k in keys}
