"""Offline evaluation: the policy acts on every frame of held-out episodes; compare with the recording.

Each frame is decoded autoregressively (greedy, no teacher forcing), exactly as when deployed;
frames are batched (they do not depend on each other: OpenVLA sees one frame, no history).
Ground truth in normalized units uses the *checkpoint's* statistics for the dataset (the ones the
policy un-normalizes with), not statistics recomputed from the evaluation data.

Chunked (parallel-decoding, OpenVLA-OFT) policies predict K actions per frame: frame t is compared with
the recorded chunk actions[t : t + K], K from the checkpoint's codec; like training's data pipeline,
only frames with a full chunk ahead (t <= T - K) are acted on, the others are counted in
`EvalResult.frames_without_chunk`. Metrics pool the chunk's actions and report L1 per chunk position
(`ActionMetrics`); token accuracy exists for the tokens head only. Kept trajectories show row 0 of
each predicted chunk (the action for that frame).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from vla_jax.evaluation.episodes import Episode
from vla_jax.evaluation.metrics import ActionMetrics, gripper_dims


@dataclasses.dataclass
class EpisodeResult:
    """One episode's recorded and predicted raw actions [T, D] (kept for plots)."""

    dataset: str
    index: int
    instruction: str
    true_raw: np.ndarray
    pred_raw: np.ndarray


@dataclasses.dataclass
class EvalResult:
    per_dataset: Dict[str, ActionMetrics]
    overall: ActionMetrics
    episodes: List[EpisodeResult]
    skipped_frames: int
    seconds: float
    frames_without_chunk: int = 0


def _progress(total: Optional[int], enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="episode", dynamic_ncols=True, file=sys.stderr)


def evaluate(policy, episodes: Iterable[Episode], *, unnorm_key: Optional[str] = None, batch_size: int = 32,
             keep_episodes: int = 3, progress: bool = True, total: Optional[int] = None,
             gripper: str = "openvla") -> EvalResult:
    """Runs `policy` on every frame of `episodes`.

    unnorm_key: statistics to use for every dataset (default: each episode's dataset name, which
    must be among the checkpoint's statistics). keep_episodes: how many episodes per dataset keep
    their trajectories (for plots). gripper: the convention of the raw-unit gripper values, for the
    prediction and the recording alike ('openvla': 1 = open, 0 = closed; 'dataset': the one the
    dataset was registered with, `Policy.convert_gripper`).
    """
    from vla_jax.data.normalization import normalize_actions

    per: Dict[str, ActionMetrics] = {}
    kept: List[EpisodeResult] = []
    kept_count: Dict[str, int] = {}
    skipped, no_chunk, t0 = 0, 0, time.perf_counter()
    chunk = policy.codec.chunk_size if getattr(policy, "parallel", False) else None
    tokens = policy.codec.head == "tokens"
    cameras, proprio = tuple(policy.cameras), bool(policy.spec.proprio_dim)
    multi = len(cameras) > 1 or proprio
    bar = _progress(total, progress)
    for ep in episodes:
        key = policy.resolve_unnorm_key(unnorm_key or ep.dataset)
        policy.check_gripper(gripper, key)
        entry = policy.norm_stats[key]
        dim = policy.action_dim(key)
        if ep.actions.shape[1] != dim:
            raise ValueError(f"dataset {ep.dataset!r} has {ep.actions.shape[1]}-D actions but the {key!r} "
                             f"statistics are {dim}-D")
        keep = np.array([bool(s.strip()) for s in ep.instructions])  # frames without instruction are not acted on
        skipped += int((~keep).sum())
        if chunk is not None:
            full = np.arange(len(keep)) <= len(keep) - chunk
            no_chunk += int((keep & ~full).sum())
            keep &= full
        if not keep.any():
            continue
        if chunk is None:
            true_raw = ep.actions[keep].astype(np.float64)
        else:
            true_raw = np.stack([ep.actions[t:t + chunk] for t in np.flatnonzero(keep)]).astype(np.float64)
        instructions = [s for s, k in zip(ep.instructions, keep) if k]
        frames = np.flatnonzero(keep)
        preds = []
        for lo in range(0, len(frames), batch_size):
            rows = frames[lo:lo + batch_size]
            # several cameras / proprio: every camera by name and the raw state (the policy normalizes it)
            inputs = ep.observations(cameras, rows, proprio) if multi else ep.images[rows]
            preds.append(policy.predict(inputs, instructions[lo:lo + batch_size], key, gripper))
        pred_norm = np.concatenate([p.normalized for p in preds])
        pred_tokens = np.concatenate([p.tokens for p in preds]) if tokens else None
        pred_raw = np.concatenate([p.actions for p in preds])  # gripper already in the `gripper` convention
        true_norm = normalize_actions(true_raw, entry)
        true_tokens = policy.codec.encode(true_norm) if tokens else None
        mean_raw = np.asarray(entry["action"]["mean"], np.float64)
        m = per.get(ep.dataset)
        if m is None:
            m = per[ep.dataset] = ActionMetrics(dim, gripper_dims(entry), chunk, tokens)
        base_norm = normalize_actions(mean_raw, entry)
        # Normalized metrics and tokens stay in OpenVLA's convention (what the model predicts).
        true_raw, mean_raw = (policy.convert_gripper(a, key, gripper) for a in (true_raw, mean_raw))
        m.update(pred_tokens, true_tokens, pred_norm, true_norm, pred_raw, true_raw,
                 base_norm=base_norm, base_raw=mean_raw)
        m.episodes += 1
        if kept_count.get(ep.dataset, 0) < keep_episodes:
            kept_count[ep.dataset] = kept_count.get(ep.dataset, 0) + 1
            first = (lambda a: a) if chunk is None else (lambda a: a[:, 0])  # the action for each frame
            kept.append(EpisodeResult(ep.dataset, ep.index, instructions[0], first(true_raw), first(pred_raw)))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(frames=sum(x.frames for x in per.values()))
    if bar is not None:
        bar.close()
    if not per:
        raise ValueError("no episodes to evaluate (the split is empty, or every episode lacks an instruction"
                         + (f", or none is longer than the chunk of {chunk} actions" if chunk else "") + ")")
    dims = {m.dim for m in per.values()}
    overall = ActionMetrics(dims.pop(), sorted({g for m in per.values() for g in m.gripper_dims}), chunk,
                            tokens) if len(dims) == 1 else None
    if overall is not None:
        for m in per.values():
            overall.merge(m)
    return EvalResult(per, overall, kept, skipped, time.perf_counter() - t0, no_chunk)


GRIPPER_LABELS = {"openvla": "gripper 1 = open, 0 = closed (OpenVLA)", "dataset": "gripper in the dataset's convention"}


def plot_episodes(result: EvalResult, out_dir: str, gripper: str = "openvla") -> List[str]:
    """One PNG per kept episode under out_dir/plots/; returns the paths relative to out_dir."""
    from vla_jax.evaluation.plots import plot_trajectory

    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    paths = []
    for ep in result.episodes:
        rel = os.path.join("plots", f"{ep.dataset}_episode{ep.index:04d}.png")
        title = f"{ep.dataset} episode {ep.index}: \"{ep.instruction}\" (raw units; {GRIPPER_LABELS[gripper]})"
        plot_trajectory(ep.true_raw, ep.pred_raw, os.path.join(out_dir, rel), title=title)
        paths.append(rel)
    return paths


def summarize(result: EvalResult) -> Dict[str, Any]:
    frames = sum(m.frames for m in result.per_dataset.values())
    return {"overall": result.overall.summary() if result.overall is not None else None,
            "per_dataset": {k: m.summary() for k, m in result.per_dataset.items()},
            "skipped_frames_without_instruction": result.skipped_frames,
            "skipped_frames_without_full_chunk": result.frames_without_chunk,
            "timing": {"seconds": round(result.seconds, 3),
                       "frames_per_second": round(frames / result.seconds, 2) if result.seconds > 0 else None}}
