"""OpenVLA-OFT's training losses (OFT_REFERENCE.md §6), pure functions of model outputs and targets.

Discrete head: cross-entropy over the full vocabulary (fp32 log-softmax) at the A + 1 readout
positions of `OpenVLA.parallel_logits`, whose targets are the A action tokens and </s>, i.e. HF's
shifted causal-LM loss over the labels (-100 everywhere else), mean over the supervised tokens.
Continuous head: torch's `L1Loss()` (mean |pred - target|) over every element of the (B, K, D)
normalized chunk, the gripper dimension included.

Sums are returned beside means so that a step accumulating micro-batches can divide by the global
count (as `training/step.py` does for the autoregressive loss).
"""

from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from vla_jax.spec import IGNORE_INDEX


def chunk_token_targets(labels, num_targets: int) -> Tuple[jax.Array, jax.Array]:
    """labels int32 [B, T] (-100 except the A action ids and </s>) -> (targets [B, N], valid bool [B, N])
    with N = num_targets = A + 1: each row's supervised labels in sequence order, the order of the
    `parallel_logits` rows. Rows with fewer supervised labels get invalid (0, False) entries."""
    labels = jnp.asarray(labels)
    supervised = labels != IGNORE_INDEX
    order = jnp.argsort(~supervised, axis=1, stable=True)[:, :num_targets]
    targets = jnp.take_along_axis(labels, order, axis=1)
    valid = targets != IGNORE_INDEX
    return jnp.where(valid, targets, 0).astype(jnp.int32), valid


def discrete_ce_sum(logits, targets, valid: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
    """logits float [B, N, V], targets int [B, N], valid bool [B, N] (default all) ->
    (sum of -log softmax(logits)[target] over valid entries, number of valid entries), both float32."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {logits.shape} and targets {targets.shape} must agree on [B, N]")
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    w = jnp.ones(targets.shape, jnp.float32) if valid is None else valid.astype(jnp.float32)
    return jnp.sum(nll * w), jnp.sum(w)


def discrete_ce(logits, targets, valid: Optional[jax.Array] = None) -> jax.Array:
    """Mean cross-entropy over the valid entries (see `discrete_ce_sum`); 0 when none is valid."""
    total, count = discrete_ce_sum(logits, targets, valid)
    return total / jnp.maximum(count, 1.0)


def l1_sum(pred, target) -> Tuple[jax.Array, jax.Array]:
    """pred, target float [B, K, D] -> (sum |pred - target| in float32, element count B*K*D)."""
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be [B, K, D], got {pred.shape} and {target.shape}")
    diff = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.sum(diff), jnp.asarray(diff.size, jnp.float32)


def l1_loss(pred, target) -> jax.Array:
    """torch.nn.L1Loss(): mean |pred - target| over all B*K*D elements (gripper included)."""
    total, count = l1_sum(pred, target)
    return total / count
