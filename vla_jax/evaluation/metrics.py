"""Offline action metrics, accumulated frame by frame (one accumulator per dataset, plus a total).

For predictions P and recorded actions Y (both [N, D]):
  action_token_accuracy   mean over frames and dims of token(P) == token(normalize(Y)): OpenVLA's
                          "action accuracy" with the recorded action binned as in training.
  l1 / mse (normalized)   |P_norm - normalize(Y)| and its square, per dim and averaged over dims;
                          P_norm are the decoded bin centers (what the model output), normalize(Y)
                          the continuous BOUNDS_Q99 target, so a perfect token still leaves the
                          binning error (at most 1/255).
  l1 / mse (raw)          the same in the dataset's original units, after un-normalizing P.
  gripper_accuracy        over the un-normalized dims (mask False: the gripper), raw value > 0.5
                          (open) of prediction vs recording.
  baseline_mean_action    the L1 a constant prediction of the dataset's mean action would get:
                          the floor any useful policy must beat.

Action chunks (OpenVLA-OFT, chunk_size K > 1 or parallel decoding): every input is [N, K, D] (N frames,
each with its predicted and recorded chunk); the metrics above pool all N * K actions, and
`l1_normalized_per_step` / `l1_raw_per_step` [K] give the L1 (mean over dims) per chunk position.
With `tokens=False` (the L1 head predicts no tokens) the token accuracies are None.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import numpy as np

GRIPPER_THRESHOLD = 0.5


class ActionMetrics:
    """Sums over frames; `summary()` turns them into means. D = action dims."""

    def __init__(self, dim: int, gripper_dims: Optional[List[int]] = None, chunk_size: Optional[int] = None,
                 tokens: bool = True):
        """chunk_size None: inputs [N, D] (one action per frame); an int K: chunks [N, K, D]."""
        self.dim, self.chunk_size, self.tokens = int(dim), chunk_size, bool(tokens)
        self.abs_norm_step = np.zeros(chunk_size or 1, np.float64)
        self.abs_raw_step = np.zeros(chunk_size or 1, np.float64)
        self.actions = 0
        self.gripper_dims = list(gripper_dims or [])
        self.frames = 0
        self.episodes = 0
        z = lambda: np.zeros(self.dim, np.float64)  # noqa: E731
        self.token_correct, self.abs_norm, self.sq_norm, self.abs_raw, self.sq_raw = z(), z(), z(), z(), z()
        self.base_abs_norm, self.base_abs_raw = z(), z()
        self.gripper_correct = 0
        self.gripper_count = 0

    def update(self, pred_tokens, true_tokens, pred_norm, true_norm, pred_raw, true_raw,
               base_norm=None, base_raw=None) -> None:
        """All arrays [N, D] ([N, K, D] with chunk_size K); base_* are the constant baseline prediction [D]
        (optional). pred_tokens / true_tokens may be None when `tokens` is False."""
        if not self.tokens:
            pred_tokens = true_tokens = np.zeros(np.shape(pred_norm), np.int32)
        arrs = [np.asarray(a) for a in (pred_tokens, true_tokens, pred_norm, true_norm, pred_raw, true_raw)]
        shapes = {a.shape for a in arrs}
        want = (self.dim,) if self.chunk_size is None else (self.chunk_size, self.dim)
        if len(shapes) != 1 or arrs[0].shape[1:] != want or arrs[0].ndim != len(want) + 1:
            raise ValueError(f"metric inputs must all be [N, {', '.join(map(str, want))}], got shapes "
                             f"{[a.shape for a in arrs]}")
        self.frames += arrs[0].shape[0]
        if self.chunk_size is not None:
            self.abs_norm_step += np.abs(np.asarray(arrs[2], np.float64) - arrs[3]).mean(-1).sum(0)
            self.abs_raw_step += np.abs(np.asarray(arrs[4], np.float64) - arrs[5]).mean(-1).sum(0)
            arrs = [a.reshape(-1, self.dim) for a in arrs]  # pool the N * K actions
        pt, tt, pn, tn, pr, tr = arrs
        pn, tn, pr, tr = (np.asarray(a, np.float64) for a in (pn, tn, pr, tr))
        self.actions += pt.shape[0]
        self.token_correct += (pt == tt).sum(0)
        self.abs_norm += np.abs(pn - tn).sum(0)
        self.sq_norm += np.square(pn - tn).sum(0)
        self.abs_raw += np.abs(pr - tr).sum(0)
        self.sq_raw += np.square(pr - tr).sum(0)
        if base_norm is not None:
            self.base_abs_norm += np.abs(np.asarray(base_norm, np.float64)[None] - tn).sum(0)
        if base_raw is not None:
            self.base_abs_raw += np.abs(np.asarray(base_raw, np.float64)[None] - tr).sum(0)
        if self.gripper_dims:
            g = self.gripper_dims
            self.gripper_correct += int(((pr[:, g] > GRIPPER_THRESHOLD) == (tr[:, g] > GRIPPER_THRESHOLD)).sum())
            self.gripper_count += pt.shape[0] * len(g)

    def merge(self, other: "ActionMetrics") -> None:
        if (other.dim, other.chunk_size, other.tokens) != (self.dim, self.chunk_size, self.tokens):
            raise ValueError(f"cannot pool metrics of {other.dim}-D actions (chunk {other.chunk_size}, tokens "
                             f"{other.tokens}) with {self.dim}-D (chunk {self.chunk_size}, tokens {self.tokens})")
        for name in ("token_correct", "abs_norm", "sq_norm", "abs_raw", "sq_raw", "base_abs_norm", "base_abs_raw",
                     "abs_norm_step", "abs_raw_step"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("frames", "actions", "episodes", "gripper_correct", "gripper_count"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def summary(self) -> Dict[str, Any]:
        n = max(self.actions, 1)
        per = lambda v: [float(x) for x in v / n]  # noqa: E731
        out = {
            "episodes": self.episodes, "frames": self.frames,
            "action_token_accuracy": float(self.token_correct.sum() / (n * self.dim)) if self.tokens else None,
            "token_accuracy_per_dim": per(self.token_correct) if self.tokens else None,
            "l1_normalized": float(self.abs_norm.sum() / (n * self.dim)), "l1_normalized_per_dim": per(self.abs_norm),
            "mse_normalized": float(self.sq_norm.sum() / (n * self.dim)), "mse_normalized_per_dim": per(self.sq_norm),
            "l1_raw_per_dim": per(self.abs_raw), "mse_raw_per_dim": per(self.sq_raw),
            "gripper_dims": self.gripper_dims,
            "gripper_accuracy": (float(self.gripper_correct / self.gripper_count) if self.gripper_count else None),
            "baseline_mean_action": {"l1_normalized": float(self.base_abs_norm.sum() / (n * self.dim)),
                                     "l1_normalized_per_dim": per(self.base_abs_norm),
                                     "l1_raw_per_dim": per(self.base_abs_raw)},
        }
        if self.chunk_size is not None:
            f = max(self.frames, 1)
            out.update(chunk_size=self.chunk_size, actions=self.actions,
                       l1_normalized_per_step=[float(x) for x in self.abs_norm_step / f],
                       l1_raw_per_step=[float(x) for x in self.abs_raw_step / f])
        return out


def gripper_dims(stats_entry: Mapping[str, Any]) -> List[int]:
    """Dims the statistics leave un-normalized (mask False): the gripper for OpenVLA's EEF datasets."""
    mask = stats_entry["action"].get("mask")
    return [] if mask is None else [i for i, m in enumerate(mask) if not m]
