"""Per-dataset action statistics and BOUNDS_Q99 normalization (OPENVLA_REFERENCE.md §4).

Statistics format (one entry per dataset in OpenVLA's `dataset_statistics.json`):
  {"action": {"mean","std","max","min","q01","q99": [A] floats, "mask": [A] bools},
   "proprio": {same six fields over the [P] proprio dims, no mask; all zeros [A] when proprio is not
               used: OpenVLA loads no proprio},
   "num_transitions": int, "num_trajectories": int}
They are computed over every split of the *standardized* trajectories (float32 numpy, `np.quantile`
linear), once, and cached as `dataset_statistics_{key}.json` next to the data, or in a cache
folder when the data folder is read-only. The key hashes the dataset's structure (features,
split sizes; not its path), a content fingerprint of every data file (`file_fingerprint`: size,
modification time and SHA-256 of the whole file up to FULL_HASH_BYTES, of SAMPLE_BLOCKS evenly
spaced blocks beyond; not for remote objects, see `file_fingerprint`; cost in BENCHMARKS.md,
"Integrity checks") and the source of the standardize transform, so it changes when any of them
changes. A copy that keeps modification
times (cp -p, rsync -t) shares the cache entry; a plain copy computes the statistics again. A
change to a large file that keeps its size and modification time and misses every sampled block is
not seen (delete the cache file, named in the log, to recompute). A cache hit is logged as a
warning naming the file. Trajectories with NaN/inf actions are left out and counted; so are
trajectories that standardize to zero steps. The cache file also holds those counts under
"vla_jax_counts" and, under "vla_jax_episode_lengths", how many streamed (finite, labeled)
trajectories have each length ({"T": count}; the action-chunk check reads it); both are stripped
from the exported statistics. A cache file written before the lengths existed is recomputed when
they are needed (`cached_statistics(..., valid=...)`).

Normalization: `where(mask, clip(2 (a - q01) / (q99 - q01 + 1e-8) - 1, -1, 1), a)`, then every
dimension whose min == max becomes 0 (even an unmasked one). Inverse for inference:
`where(mask, 0.5 (a + 1) (q99 - q01) + q01, a)`.

Proprio (OpenVLA-OFT, OFT_REFERENCE.md §7): the same BOUNDS_Q99 on every dim (no mask), clipped,
and at training time every dim whose min == max becomes 0 (`normalize_proprio`). OFT's inference
(`normalize_proprio` in its robot utils) skips that last rule: a constant dim then maps to
2 (x - q01) / 1e-8 - 1 clipped, i.e. -1 at x == q01; `normalize_proprio(..., zero_constant_dims=False)`
gives that. Proprio statistics are computed (with the actions, same pass) only when a run asks for
proprio; the cache then holds PROPRIO_KEY naming the state key and dims they came from, and an older
cache without it is recomputed. A run with several cameras also records, per camera key, the
episodes with an empty (missing) image under MISSING_CAMERAS_KEY.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence

import numpy as np

from vla_jax import permissions

log = logging.getLogger(__name__)

STATS_FIELDS = ("mean", "std", "max", "min", "q01", "q99")
# Bump when the statistics computation itself changes (filters, dtype): invalidates every cache.
STATS_VERSION = "vla_jax-stats-v1"
COUNTS_KEY = "vla_jax_counts"
LENGTHS_KEY = "vla_jax_episode_lengths"
PROPRIO_KEY = "vla_jax_proprio_source"
MISSING_CAMERAS_KEY = "vla_jax_missing_cameras"
_PRIVATE_KEYS = (COUNTS_KEY, LENGTHS_KEY, PROPRIO_KEY, MISSING_CAMERAS_KEY)


def default_cache_dir() -> str:
    """`$VLA_JAX_CACHE_DIR/dataset_statistics`, default `~/.cache/vla_jax/dataset_statistics`."""
    root = os.environ.get("VLA_JAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "vla_jax"))
    return os.path.join(root, "dataset_statistics")


def compute_statistics(trajectories: Iterable[Mapping[str, np.ndarray]], mask: Sequence[bool],
                       proprio_source: Optional[str] = None, camera_keys: Sequence[str] = ()) -> dict:
    """trajectories: numpy dicts with 'action' [T, A] (standardized, unnormalized), and
    'proprio' [T, P] when `proprio_source` (a description of where it comes from, stored under
    PROPRIO_KEY) is given, and 'camera_empty' bool [N] (camera i has an empty image in some step)
    (and optionally 'episode_id') when `camera_keys` (the N camera keys) are given.

    Returns one statistics entry (format above) plus COUNTS_KEY: {"nonfinite": n, "empty": n,
    "unlabeled": n} (unlabeled: every instruction empty; counted here, filtered by the pipeline),
    LENGTHS_KEY: {str(T): number of finite, labeled trajectories with T steps} and, with cameras,
    MISSING_CAMERAS_KEY: {camera key: [episodes with an empty image: their 'episode_id' (str), else
    their position in the iteration]}.
    """
    actions, n_traj, counts = [], 0, {"nonfinite": 0, "empty": 0, "unlabeled": 0}
    proprios = []
    missing: Dict[str, list] = {k: [] for k in camera_keys}
    lengths: Dict[int, int] = {}
    for position, traj in enumerate(trajectories):
        if camera_keys:
            empty = np.asarray(traj["camera_empty"], bool).reshape(-1)
            episode = traj.get("episode_id", position)
            episode = episode.decode() if isinstance(episode, bytes) else episode
            for key, e in zip(camera_keys, empty):
                if e:
                    missing[key].append(episode)
        a = np.asarray(traj["action"], dtype=np.float32)
        if a.ndim != 2 or a.shape[0] == 0:
            counts["empty"] += 1
            continue
        if not np.all(np.isfinite(a)):
            counts["nonfinite"] += 1
            continue
        instr = traj.get("language_instruction")
        if instr is not None and all(len(s) == 0 for s in np.asarray(instr).reshape(-1)):
            counts["unlabeled"] += 1  # still in the statistics, as in OpenVLA (stats come before the filter)
        else:
            lengths[a.shape[0]] = lengths.get(a.shape[0], 0) + 1
        actions.append(a)
        if proprio_source is not None:
            p = np.asarray(traj["proprio"], dtype=np.float32)
            proprios.append(p.reshape(p.shape[0], -1))
        n_traj += 1
    if not actions:
        raise ValueError(f"no usable trajectories to compute statistics from (skipped: {counts})")
    a = np.concatenate(actions, axis=0)
    if len(mask) != a.shape[1]:
        raise ValueError(f"normalization mask has {len(mask)} entries but actions have {a.shape[1]} dims")
    stats = {
        "mean": a.mean(0), "std": a.std(0), "max": a.max(0), "min": a.min(0),
        "q01": np.quantile(a, 0.01, axis=0), "q99": np.quantile(a, 0.99, axis=0),
    }
    out = {
        "action": {**{k: np.asarray(v, np.float32).tolist() for k, v in stats.items()}, "mask": [bool(m) for m in mask]},
        "proprio": zero_proprio(a.shape[1]),
        "num_transitions": int(a.shape[0]),
        "num_trajectories": int(n_traj),
        COUNTS_KEY: counts,
        LENGTHS_KEY: {str(t): n for t, n in sorted(lengths.items())},
    }
    if proprio_source is not None:
        p = np.concatenate(proprios, axis=0)
        if not np.all(np.isfinite(p)):
            raise ValueError(f"proprio {proprio_source} holds NaN/inf values in trajectories with finite actions")
        out["proprio"] = _six(p)
        out[PROPRIO_KEY] = proprio_source
    if camera_keys:
        out[MISSING_CAMERAS_KEY] = missing
    return out


def _six(x: np.ndarray) -> dict:
    stats = {"mean": x.mean(0), "std": x.std(0), "max": x.max(0), "min": x.min(0),
             "q01": np.quantile(x, 0.01, axis=0), "q99": np.quantile(x, 0.99, axis=0)}
    return {k: np.asarray(v, np.float32).tolist() for k, v in stats.items()}


def zero_proprio(dim: int) -> dict:
    """OpenVLA's proprio entry when no proprio is loaded: the six fields, `dim` zeros each."""
    return {k: [0.0] * int(dim) for k in STATS_FIELDS}


def export_entry(entry: Mapping) -> dict:
    """The OpenVLA-format entry (drops vla_jax's extra counts, length histogram, proprio source and
    missing-camera record)."""
    return {k: v for k, v in entry.items() if k not in _PRIVATE_KEYS}


# --------------------------------------------------------------------------------------------
# Cache key and cache files.

def _module_source(module_name: str) -> str:
    mod = sys.modules.get(module_name)
    try:
        return inspect.getsource(mod) if mod is not None else ""
    except (OSError, TypeError):
        return ""


def transform_fingerprint(fn: Callable) -> str:
    """Source of `fn`, of its module, and of the project modules its globals reference (helpers such
    as the gripper conversions), so an edit to any of them changes the cache key."""
    parts = []
    try:
        parts.append(inspect.getsource(fn))
    except (OSError, TypeError):
        parts.append(repr(fn))
    mod = getattr(fn, "__module__", "") or ""
    top = mod.split(".")[0]
    names = {mod}
    for value in getattr(fn, "__globals__", {}).values():
        vmod = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
        if isinstance(vmod, str) and top and vmod.split(".")[0] == top:
            names.add(vmod)
    parts += [_module_source(n) for n in sorted(names)]
    return "\n".join(parts)


# Files up to FULL_HASH_BYTES are hashed whole; larger ones by SAMPLE_BLOCKS blocks of SAMPLE_BYTES
# spread evenly from the first byte to the last (plus size and modification time).
FULL_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 64 << 10


def file_fingerprint(path: str) -> str:
    """'size:mtime_ns:sha256' of a local data file; the hash covers the whole file up to
    FULL_HASH_BYTES, else SAMPLE_BLOCKS evenly spaced blocks (the first and the last included).
    'missing' when the file cannot be read. Remote objects (gs://, s3://) give 'remote', as the old
    size-only key did: a request per shard (several, for sampled blocks) over the thousands of
    shards of an OXE mixture would slow every start, and bucket releases are not rewritten in
    place; delete the cache file (named in the log) after changing remote data."""
    if "://" in path:
        return "remote"
    try:
        st = os.stat(path)
        size, mtime = int(st.st_size), int(st.st_mtime_ns)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if size <= FULL_HASH_BYTES:
                while True:
                    block = f.read(8 << 20)
                    if not block:
                        break
                    h.update(block)
            else:
                last = size - SAMPLE_BYTES
                for i in range(SAMPLE_BLOCKS):
                    f.seek(last * i // (SAMPLE_BLOCKS - 1))
                    h.update(f.read(SAMPLE_BYTES))
        return f"{size}:{mtime}:{h.hexdigest()}"
    except OSError:
        return "missing"


def data_fingerprint(builder) -> str:
    """Structure and content of the stored data, independent of where it lives."""
    info = builder.info
    splits = []
    for name, s in sorted(info.splits.items()):
        files = [os.path.join(builder.data_dir, f) for f in s.filenames]
        splits.append((name, list(s.shard_lengths), int(s.num_bytes), [file_fingerprint(f) for f in files]))
    return json.dumps({"name": info.full_name, "features": str(info.features), "splits": splits})


def statistics_key(builder, standardize_fn: Callable, dataset_cfg) -> str:
    h = hashlib.sha256()
    for part in (STATS_VERSION, data_fingerprint(builder), transform_fingerprint(standardize_fn), repr(dataset_cfg)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _writable_dir(path: str) -> bool:
    if "://" in path:
        return True  # remote stores: try and fall back on failure
    try:
        st = os.stat(path)
    except OSError:
        return False
    # Honour the permission bits even for root, so a read-only shared data folder stays untouched.
    return bool(st.st_mode & 0o222) and os.access(path, os.W_OK)


def _read_json(path: str) -> Optional[dict]:
    import tensorflow as tf  # gfile handles local and gs:// paths alike

    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "r") as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    import tensorflow as tf

    folder = os.path.dirname(path)
    tf.io.gfile.makedirs(folder)
    if "://" in path:
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(obj, f)
        return
    # Atomic: processes computing the same statistics may race; each writes identical content.
    fd, tmp = permissions.mkstemp(dir=folder, prefix=".stats_", suffix=".json")  # not 0600
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def cached_statistics(builder, key: str, cache_dir: Optional[str], compute: Callable[[], dict],
                      valid: Optional[Callable[[Mapping], bool]] = None) -> dict:
    """Loads `dataset_statistics_{key}.json` from the data folder or the cache folder, or computes
    it with `compute()` and writes it next to the data (or to the cache folder when the data
    folder is read-only or the write fails). A cached entry for which `valid(entry)` is False (one
    written before a field the caller needs existed) is computed again and overwritten."""
    name = f"dataset_statistics_{key}.json"
    cache_dir = cache_dir or default_cache_dir()
    for folder in (builder.data_dir, cache_dir):
        entry = _read_json(os.path.join(folder, name))
        if entry is not None and valid is not None and not valid(entry):
            log.warning("dataset statistics cache %s lacks fields this run needs (written by an older "
                        "vla_jax); computing them again", os.path.join(folder, name))
            entry = None
        if entry is not None:
            log.warning("dataset statistics of %s from the cache: %s (keyed on the files' sizes, modification "
                        "times and content hashes; delete it to recompute)", builder.info.full_name,
                        os.path.join(folder, name))
            return entry
    entry = compute()
    targets = ([builder.data_dir] if _writable_dir(builder.data_dir) else []) + [cache_dir]
    for folder in targets:
        try:
            _write_json(os.path.join(folder, name), entry)
            log.info("wrote dataset statistics of %s to %s", builder.info.full_name, folder)
            break
        except Exception as e:  # noqa: BLE001 - any write failure falls through to the cache dir
            log.warning("could not write dataset statistics to %s (%s)", folder, e)
    return entry


def save_dataset_statistics(statistics: Mapping[str, Mapping], path: str) -> None:
    """Writes {dataset_name: entry} as OpenVLA's dataset_statistics.json."""
    _write_json(path, {k: export_entry(v) for k, v in statistics.items()})


def load_dataset_statistics(path: str) -> Dict[str, dict]:
    stats = _read_json(path)
    if stats is None:
        raise ValueError(f"no dataset statistics file at {path!r}")
    return stats


# --------------------------------------------------------------------------------------------
# Normalization (numpy for inference and tests; TF for the pipeline).

def _arrays(entry: Mapping, dim: int):
    a = entry["action"]
    q01, q99 = np.asarray(a["q01"], np.float32), np.asarray(a["q99"], np.float32)
    mask = np.asarray(a.get("mask", [True] * len(q01)), bool)
    zero = np.asarray(a["min"], np.float32) == np.asarray(a["max"], np.float32)
    if q01.shape != (dim,):
        raise ValueError(f"statistics have {q01.shape[0]} action dims but actions have {dim}")
    return q01, q99, mask, zero


def normalize_actions(actions, entry: Mapping) -> np.ndarray:
    """BOUNDS_Q99: actions [..., A] float -> float32 [..., A] in [-1, 1] (masked dims)."""
    x = np.asarray(actions, np.float32)
    q01, q99, mask, zero = _arrays(entry, x.shape[-1])
    y = np.where(mask, np.clip(2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1, 1), x)
    return np.where(zero, np.float32(0), y).astype(np.float32)


def normalize_actions_tf(actions, entry: Mapping):
    """TF version of `normalize_actions` for tf.data maps: actions [T, A] float32."""
    import tensorflow as tf

    q01, q99, mask, zero = _arrays(entry, int(actions.shape[-1]))
    x = tf.cast(actions, tf.float32)
    y = tf.where(mask, tf.clip_by_value(2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1.0, 1.0), x)
    return tf.where(zero, tf.zeros_like(y), y)


def _proprio_arrays(entry: Mapping, dim: int):
    p = entry["proprio"]
    q01, q99 = np.asarray(p["q01"], np.float32), np.asarray(p["q99"], np.float32)
    zero = np.asarray(p["min"], np.float32) == np.asarray(p["max"], np.float32)
    if q01.shape != (dim,):
        raise ValueError(f"statistics have {q01.shape[0]} proprio dims but the proprio vector has {dim}")
    return q01, q99, zero


def normalize_proprio(proprio, entry: Mapping, zero_constant_dims: bool = True) -> np.ndarray:
    """BOUNDS_Q99 on every dim (no mask): proprio [..., P] float -> float32 [..., P] in [-1, 1].

    zero_constant_dims: True is the training rule (dims with min == max become 0); False is
    OpenVLA-OFT's inference-time `normalize_proprio`, which does not apply it."""
    x = np.asarray(proprio, np.float32)
    q01, q99, zero = _proprio_arrays(entry, x.shape[-1])
    y = np.clip(2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1, 1).astype(np.float32)
    return np.where(zero, np.float32(0), y).astype(np.float32) if zero_constant_dims else y


def normalize_proprio_tf(proprio, entry: Mapping):
    """TF version of `normalize_proprio` (training rule) for tf.data maps: proprio [T, P] float32."""
    import tensorflow as tf

    q01, q99, zero = _proprio_arrays(entry, int(proprio.shape[-1]))
    x = tf.cast(proprio, tf.float32)
    y = tf.clip_by_value(2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1.0, 1.0)
    return tf.where(zero, tf.zeros_like(y), y)
