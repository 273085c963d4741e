"""Checks of a dataset's statistics entry before streaming: dropped trajectories (warnings),
episodes too short for action chunks, cameras missing in some episodes (errors)."""

from __future__ import annotations

import logging
import warnings
from typing import Mapping, Sequence

from vla_jax.data import normalization

log = logging.getLogger("vla_jax.data.pipeline")


class DataWarning(UserWarning):
    """Data problems that the pipeline works around (dropped trajectories, ...)."""


def check_cameras(src_name: str, builder, entry: Mapping, camera_keys: Sequence[str]) -> None:
    """ValueError naming the dataset, the camera key and the episode(s) where a camera the run
    reads has an empty image in some step (the camera is missing there). An episode is named
    'FILE__RECORD': the data file under the dataset folder and the record's index in it."""
    missing = entry.get(normalization.MISSING_CAMERAS_KEY, {})
    for key in camera_keys:
        episodes = missing.get(key, [])
        if not episodes:
            continue
        more = f" and {len(episodes) - 5} more" if len(episodes) > 5 else ""
        raise ValueError(f"dataset {src_name!r}: camera 'observation/{key}' is missing (empty image) in "
                         f"{len(episodes)} episode(s): {', '.join(map(str, episodes[:5]))}{more} (data file "
                         f"__ record index, in {builder.data_dir}); every episode needs every camera the run "
                         f"reads (DataConfig.cameras)")


def warn_counts(name: str, entry: Mapping) -> None:
    """Warns (DataWarning and log) about the trajectories the statistics pass counted as dropped."""
    counts = entry.get(normalization.COUNTS_KEY, {})
    what = {"nonfinite": "have NaN/inf actions and are dropped",
            "empty": "have no steps after standardization and are dropped",
            "unlabeled": "have no language instruction and are skipped"}
    for k, msg in what.items():
        if counts.get(k):
            text = f"dataset {name!r}: {counts[k]} trajectories (over all splits) {msg}"
            log.warning(text)
            warnings.warn(text, DataWarning, stacklevel=3)


def check_chunk_lengths(name: str, entry: Mapping, k: int) -> dict:
    """Trajectories too short for chunks of `k` actions, from a statistics entry's length histogram.

    Returns {"dropped_episodes", "dropped_frames", "episodes", "longest"} (over all splits; only
    finite, labeled trajectories, the ones the pipeline streams). Warns (DataWarning and log) when
    some are dropped; ValueError naming the dataset, `k` and the longest trajectory when none is
    long enough (the stream would be empty).
    """
    hist = {int(t): int(n) for t, n in entry[normalization.LENGTHS_KEY].items()}
    short = {t: n for t, n in hist.items() if t < k}
    out = {"dropped_episodes": sum(short.values()), "dropped_frames": sum(t * n for t, n in short.items()),
           "episodes": sum(hist.values()), "longest": max(hist, default=0)}
    if out["dropped_episodes"] == out["episodes"]:
        raise ValueError(f"dataset {name!r}: no trajectory has the {k} steps an action chunk of "
                         f"action_chunk={k} needs (longest: {out['longest']} steps, over "
                         f"{out['episodes']} usable trajectories of all splits); lower action_chunk "
                         f"to <= {out['longest']}")
    if out["dropped_episodes"]:
        text = (f"dataset {name!r}: {out['dropped_episodes']} of {out['episodes']} trajectories (over all "
                f"splits; {out['dropped_frames']} frames) are shorter than action_chunk={k} and are dropped")
        log.warning(text)
        warnings.warn(text, DataWarning, stacklevel=3)
    return out
