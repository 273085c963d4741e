"""RLDS reading and tf.data plumbing: the part of dlimp that OpenVLA uses (dlimp is not on PyPI).

- `open_builder`: a TFDS builder directory (no builder code needed), with errors that name the
  path and what is there.
- `read_trajectories`: one element per episode, every step feature batched over time
  (`traj['action']` [T, A], `traj['observation'][k]` [T, ...]), images kept as encoded bytes
  (tf.string [T]) so the shuffle buffer holds JPEG bytes, not pixels.
- `process_split`: each process's share of a split (multi-host input sharding).
- `traj_map` / `frame_map` / `flatten`: trajectory-level maps, then frames.
- `sample_from_datasets`: weighted, seeded interleave of frame streams.
- `apply_options`: threads, autotune RAM budget, determinism.
- `find_corrupt_files`: names the TFRecord file(s) behind a DataLossError.

Everything here is graph-mode tf.data; nothing touches JAX.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Callable, List, Optional, Sequence, Tuple

import tensorflow as tf
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)


def _listing(path: str, limit: int = 20) -> str:
    try:
        entries = sorted(tf.io.gfile.listdir(path))
    except (tf.errors.NotFoundError, OSError):
        return "(unreadable)"
    shown = ", ".join(entries[:limit]) + (f", ... ({len(entries)} entries)" if len(entries) > limit else "")
    return shown or "(empty)"


def _parent_with_listing(path: str) -> str:
    """`path` does not exist: say which ancestor exists and what it holds."""
    parent = os.path.dirname(path.rstrip("/"))
    while parent and not tf.io.gfile.exists(parent):
        nxt = os.path.dirname(parent.rstrip("/"))
        if nxt == parent:
            break
        parent = nxt
    if parent and tf.io.gfile.exists(parent):
        return f"{parent} exists and holds: {_listing(parent)}"
    return "none of its parent folders exist"


def _version_key(v: str):
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (-1,)


def open_builder(data_dir: str, builder_name: str, version: Optional[str] = None):
    """Opens `{data_dir}/{builder_name}/{version}` (the newest version folder if `version` is None).

    Raises ValueError naming the missing path and what its parent holds.
    """
    data_dir = os.fspath(data_dir)
    if not tf.io.gfile.isdir(data_dir):
        raise ValueError(f"data_dir {data_dir!r} does not exist or is not a folder; {_parent_with_listing(data_dir)}")
    root = os.path.join(data_dir, builder_name)
    if not tf.io.gfile.isdir(root):
        raise ValueError(f"no dataset folder {builder_name!r} in data_dir {data_dir!r} (expected {root}); "
                         f"{data_dir} holds: {_listing(data_dir)}")
    if version is None:
        versions = [v for v in tf.io.gfile.listdir(root)
                    if tf.io.gfile.exists(os.path.join(root, v.rstrip("/"), "dataset_info.json"))]
        if not versions:
            raise ValueError(f"{root} holds no version folder with a dataset_info.json; it holds: {_listing(root)}")
        version = max((v.rstrip("/") for v in versions), key=_version_key)
    path = os.path.join(root, version)
    if not tf.io.gfile.exists(os.path.join(path, "dataset_info.json")):
        raise ValueError(f"{path} is not a TFDS builder folder (no dataset_info.json); "
                         f"{root} holds: {_listing(root)}")
    return tfds.builder_from_directory(path)


def resolve_split(builder, split: str) -> str:
    """'train' / 'val' / 'all', with OpenVLA's fallback: without a 'val' split, train is
    'train[:95%]' and val is 'train[95%:]'. 'all' is every split (statistics use it)."""
    names = list(builder.info.splits.keys())
    if split == "all":
        return "+".join(names)
    if split in names:
        return split
    if split == "val" and "train" in names:
        return "train[95%:]"
    if "[" in split or "+" in split:
        return split
    raise ValueError(f"split {split!r} not in {builder.info.full_name} (it has {names})")


def process_split(builder, split: str, process_index: int = 0, process_count: int = 1):
    """This process's share of `split`: `tfds.even_splits` cuts it into `process_count` contiguous
    example ranges (whole files when there are many files; ranges inside a file when there are few),
    so processes read disjoint data and together read all of it."""
    split = resolve_split(builder, split)
    if split == "train" and "val" not in builder.info.splits:
        split = "train[:95%]"
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if process_count == 1:
        return split
    part = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    n = builder.info.splits[part].num_examples
    if n == 0:
        raise ValueError(f"process {process_index} of {process_count} gets no episodes of "
                         f"{builder.info.full_name} split {split!r}; use fewer processes or more data")
    return part


def image_keys(builder) -> List[str]:
    """Keys of `steps/observation` stored as encoded images."""
    obs = builder.info.features["steps"]["observation"]
    return [k for k, f in obs.items() if isinstance(f, tfds.features.Image)]


def read_trajectories(builder, split: str, *, shuffle_files: bool = True, seed: Optional[int] = None,
                      num_parallel_reads: int = 1, num_parallel_calls: int = 1,
                      deterministic: bool = True, with_id: bool = False) -> tf.data.Dataset:
    """One element per episode: the `steps` features batched over time, images still encoded.

    `split` is a TFDS split expression (use `process_split` for multi-host shares). Episode-level
    metadata is dropped: standardization works on steps only. with_id: elements are
    (steps, episode id) with the id TFDS's 'FILE__RECORD' (data file name and record index in it),
    which names an episode in error messages whatever the read order.
    """
    # SkipDecoding on the whole `steps` feature returns every step feature already batched over
    # time, with images as their encoded bytes and plain tensors parsed (what dlimp does). The
    # per-key form ({'steps': {'observation': {k: SkipDecoding()}}}) returns `steps` as a nested
    # tf.data.Dataset; turning that into tensors needs DatasetToSingleElement, a stateful op that
    # makes the iterator impossible to checkpoint (and costs a nested pipeline per episode).
    decoders = {"steps": tfds.decode.SkipDecoding()}
    read_config = tfds.ReadConfig(
        try_autocache=False, shuffle_seed=seed, skip_prefetch=True, add_tfds_id=with_id,
        interleave_cycle_length=num_parallel_reads, num_parallel_calls_for_interleave_files=num_parallel_reads,
        options=_options(deterministic=deterministic))
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders, read_config=read_config)

    def to_traj(episode):
        return (episode["steps"], episode["tfds_id"]) if with_id else episode["steps"]

    return ds.map(to_traj, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def traj_map(ds: tf.data.Dataset, fn: Callable, num_parallel_calls: int = tf.data.AUTOTUNE,
             deterministic: bool = True) -> tf.data.Dataset:
    """Maps whole trajectories (every value has a leading time axis)."""
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def frame_map(ds: tf.data.Dataset, fn: Callable, num_parallel_calls: int = tf.data.AUTOTUNE,
              deterministic: bool = True) -> tf.data.Dataset:
    """Maps single frames (after `flatten`)."""
    return ds.map(fn, num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def flatten(ds: tf.data.Dataset, num_parallel_calls: int = 1, deterministic: bool = True) -> tf.data.Dataset:
    """Trajectories -> frames, in time order within each trajectory (with num_parallel_calls > 1,
    that many trajectories are interleaved in blocks of 16 frames)."""
    if num_parallel_calls <= 1:
        return ds.flat_map(tf.data.Dataset.from_tensor_slices)
    return ds.interleave(tf.data.Dataset.from_tensor_slices, cycle_length=num_parallel_calls, block_length=16,
                         num_parallel_calls=num_parallel_calls, deterministic=deterministic)


def sample_from_datasets(datasets: Sequence[tf.data.Dataset], weights: Sequence[float],
                         seed: Optional[int] = None) -> tf.data.Dataset:
    """Weighted interleave at the frame level (each draw picks dataset i with probability weights[i])."""
    if len(datasets) != len(weights):
        raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
    if len(datasets) == 1:
        return datasets[0]
    return tf.data.Dataset.sample_from_datasets(list(datasets), weights=[float(w) for w in weights], seed=seed,
                                                stop_on_empty_dataset=False)


def _options(threads: Optional[int] = None, ram_budget_gb: Optional[float] = None,
             deterministic: bool = True) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = deterministic
    if threads:
        opts.threading.private_threadpool_size = int(threads)
    if ram_budget_gb:
        opts.autotune.enabled = True
        opts.autotune.ram_budget = int(ram_budget_gb * 1024**3)
    return opts


def apply_options(ds: tf.data.Dataset, threads: Optional[int] = None, ram_budget_gb: Optional[float] = None,
                  deterministic: bool = True) -> tf.data.Dataset:
    """Thread pool size (None: TF's default), autotune RAM budget in GB, and determinism
    (True: element order is a function of the seed, at some cost in throughput)."""
    return ds.with_options(_options(threads, ram_budget_gb, deterministic))


def allocate_threads(total: int, weights: Sequence[float]) -> List[int]:
    """Splits `total` threads over datasets: at least one each, the rest in proportion to weight."""
    n = len(weights)
    if total <= n:
        return [1] * n
    s = float(sum(weights))
    extra = [(total - n) * w / s for w in weights]
    alloc = [1 + int(e) for e in extra]
    # Hand out the remainder to the largest fractional parts.
    order = sorted(range(n), key=lambda i: extra[i] - int(extra[i]), reverse=True)
    for i in order[: total - sum(alloc)]:
        alloc[i] += 1
    return alloc


def split_files(builder, split: str) -> List[str]:
    """Full paths of the TFRecord files behind `split` (a plain split name or 'a+b')."""
    files = []
    for name in resolve_split(builder, split).split("+"):
        base = name.split("[")[0]
        files += [os.path.join(builder.data_dir, f) for f in builder.info.splits[base].filenames]
    return files


def find_corrupt_files(files: Sequence[str]) -> List[Tuple[str, str]]:
    """Reads every record of each file with CRC checks; returns [(file, error message)] for bad ones."""
    bad = []
    for f in files:
        try:
            for _ in tf.data.TFRecordDataset(f):
                pass
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
            bad.append((f, _clean(e.message) or type(e).__name__))
    return bad


def _clean(message: str) -> str:
    """TF error text without the function-node prefix and op suffix."""
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message or "")
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", message.splitlines()[0] if message else "").strip()


def corrupt_data_error(builder, split: str, err: Exception) -> ValueError:
    """A ValueError for a read failure that names the corrupt file(s) of `builder`/`split`."""
    bad = find_corrupt_files(split_files(builder, split))
    if bad:
        where = "; ".join(f"{f}: {m}" for f, m in bad)
        return ValueError(f"corrupt TFRecord data in {builder.info.full_name}: {where}")
    return ValueError(f"reading {builder.info.full_name} ({builder.data_dir}) split {split!r} failed: {err}")
