"""The OpenVLA-OFT loss of the train step (parallel decoding, OFT_REFERENCE.md §2-§6).

`training/step.py` calls `make_parallel_loss_fn` when the run's ActionCodec has decoding='parallel'
(its only branch point); everything else of the step (micro-batches, optimizer, metrics) is shared.

One bidirectional forward over the zeroed action slots (`OpenVLA.parallel_hidden`); the slots are the
action-token labels (`parallel.action_mask_from_labels`), the padding comes from the batch's
`attention_mask` (the BatchSpec carries it with decoding='parallel': the pipeline already produces it,
and deriving it from input_ids != pad would need the tokenizer's pad id inside the step).

head 'tokens': cross-entropy over the A = K * D action tokens and </s> (`parallel_logits`, targets from
  `oft_losses.chunk_token_targets`); the metric sums are the autoregressive step's, so `loss`,
  `action_accuracy` and `l1_loss` (|decoded argmax - decoded label|) mean the same thing.
head 'l1': torch's L1Loss over batch['actions'] [B, K, D] (mean over every element, gripper
  included). Its sums fill the same keys: `loss` = `l1_loss` = mean |pred - target|,
  `supervised_tokens` = the number of regressed values, and `action_accuracy` = the fraction of
  predicted values that fall in the target's 256-bin (the bin the token head would have to hit), so
  the two heads' accuracies are comparable.

Both return sums; the step divides by the global count (`count`) so accumulated micro-batches give
exactly the global-batch mean.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from vla_jax.models.openvla import OpenVLA
from vla_jax.spec import IGNORE_INDEX
from vla_jax.training import oft_losses
from vla_jax.training.state import ParamHooks


def action_slots(labels, codec):
    """labels int32 [B, T] -> bool [B, T]: the action slots (action-id labels; </s> is not one)."""
    return codec.is_action_id(labels) & (labels != IGNORE_INDEX)


def count(batch: Dict[str, jax.Array], codec) -> jax.Array:
    """The loss's denominator over a (global) batch: supervised tokens (head 'tokens': A + 1 per row)
    or regressed values (head 'l1': B * K * D)."""
    if codec.head == "l1":
        return jnp.asarray(batch["actions"].size, jnp.float32)
    return jnp.maximum(jnp.sum((batch["labels"] != IGNORE_INDEX).astype(jnp.float32)), 1.0)


def _bin_index(x, codec):
    """Normalized values float [...] -> their 256-bin index (the codec's digitize on clipped values)."""
    edges = jnp.asarray(codec.bin_edges, jnp.float32)
    return jnp.digitize(jnp.clip(x, -1.0, 1.0), edges)


def _l1_sums(pred, target, dataset_index, num_datasets: int, codec) -> Dict[str, jax.Array]:
    """pred/target float32 [B, K, D] -> the step's metric sums (see the module docstring)."""
    b = pred.shape[0]
    err = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)).reshape(b, -1)  # [B, K*D]
    hit = (_bin_index(pred, codec) == _bin_index(target, codec)).astype(jnp.float32).reshape(b, -1)
    n = jnp.full((b,), err.shape[1], jnp.float32)
    onehot = jax.nn.one_hot(dataset_index, num_datasets, dtype=jnp.float32)  # [B, D]
    row_err, row_hit = jnp.sum(err, axis=1), jnp.sum(hit, axis=1)
    total = jnp.sum(row_err)
    return {
        "ce_sum": total, "tokens": jnp.sum(n), "correct": jnp.sum(row_hit), "l1_sum": total, "actions": jnp.sum(n),
        "ds_correct": onehot.T @ row_hit, "ds_l1_sum": onehot.T @ row_err, "ds_actions": onehot.T @ n,
    }


def make_parallel_loss_fn(model: OpenVLA, cfg, hooks: ParamHooks, token_sums):
    """-> loss_fn(params, micro_batch, total, rng) -> (loss sum / total, metric sums), as step.py's.

    cfg: step.LossConfig (its codec has decoding='parallel'); token_sums: step.py's `_metric_sums`
    (the token head reuses the autoregressive metrics). batch: pixel_values, input_ids, attention_mask,
    labels, dataset_index (+ actions [B, K, D] for head 'l1', + proprio [B, P] with a proprio input)."""
    codec = cfg.codec
    if codec.decoding != "parallel":
        raise ValueError(f"make_parallel_loss_fn needs an ActionCodec with decoding='parallel', got {codec.decoding!r}")
    mcfg = getattr(model, "config", None)
    if mcfg is not None:
        want = (True, codec.chunk_size, codec.head)
        got = (bool(mcfg.parallel_decoding), int(mcfg.chunk_size), str(mcfg.action_head))
        if got != want:
            raise ValueError(f"the model (parallel_decoding, chunk_size, action_head)={got} does not match the "
                             f"batch layout's action codec {want}")

    def loss_fn(params, batch, total, rng):
        if hooks.apply_params is not None:
            params = hooks.apply_params(params)
        slots = action_slots(batch["labels"], codec)
        args = (batch["pixel_values"], batch["input_ids"], batch["attention_mask"], slots)
        kw = dict(proprio=batch.get("proprio"), rngs={"dropout": rng})
        if codec.head == "l1":
            pred = model.apply({"params": params}, *args, method=OpenVLA.parallel_actions, **kw)
            sums = _l1_sums(pred, batch["actions"], batch["dataset_index"], cfg.num_datasets, codec)
        else:
            logits = model.apply({"params": params}, *args, method=OpenVLA.parallel_logits, **kw)
            targets, valid = oft_losses.chunk_token_targets(batch["labels"], codec.num_supervised)
            sums = token_sums(logits, targets, valid, batch["dataset_index"], cfg)
        return sums["ce_sum"] / total, sums

    loss_fn.count = lambda batch: count(batch, codec)
    return loss_fn
