"""RLDS mixture -> tokenized numpy batches, one share of the global batch per host.

Exported for the training and eval scripts:
  DataConfig                 pipeline options (dataclass; `DataConfig.from_config` takes a ConfigDict/dict).
  make_train_iterator(data_cfg, tokenizer, process_index=None, process_count=None) -> DataIterator
      `next(it)` gives a dict of numpy arrays for this host:
        pixel_values   uint8   [B, S, S, 3]   (S = resize_size, 224 for OpenVLA); with cameras N > 1:
                       uint8   [B, N, S, S, 3] (the datasets' image_keys order, primary first)
        input_ids      int32   [B, L]         (L = max_seq_len; `[BOS] prompt ▁ a1..a7 EOS PAD...`)
        attention_mask int32   [B, L]
        labels         int32   [B, L]         (-100 except the 7 action ids and EOS)
        actions        float32 [B, 7]         (BOUNDS_Q99-normalized; gripper raw {0, 1})
        With action_chunk K > 1 (OpenVLA-OFT chunks, see `DataConfig`): `actions` is float32
        [B, K, 7] (frame t's actions t..t+K-1) and input_ids/labels hold the K*7 action ids
        timestep-major, `[BOS] prompt ▁ a_0 .. a_{7K-1} EOS PAD...`, labels -100 except those and EOS.
        dataset_index  int32   [B]            (position of the frame's dataset in the mixture)
        proprio        float32 [B, P]         only with use_proprio: the robot state, BOUNDS_Q99 with
                                              the dataset's proprio statistics (every dim), clipped,
                                              constant dims 0 (OpenVLA-OFT's training rule)
      `it.dataset_statistics`: {dataset_name: entry}, OpenVLA's dataset_statistics.json content.
      Resume: `it.get_state()` -> small uint8 array, `it.set_state(arr)` rebuilds the stream from
      the seed and skips the frames already consumed, before image decoding (needs
      deterministic=True; measured ~4-11k frames/s replayed on 2 CPU cores, so minutes for
      millions of frames, less with more cores). `it.save(path)` / `it.restore(path)` checkpoint
      the tf.data iterator itself (one folder per process; exact, no replay, but it stores the whole
      shuffle buffer of encoded frames: measured ~(JPEG bytes + 0.2 KB) per buffered frame, i.e.
      ~1 GB at 256k frames of the 64x64 debug JPEGs (3.6 KB) and, by the same rate, several GB per
      host for 256x256 OXE JPEGs).
  dataset_statistics(data_cfg) -> {dataset_name: entry}   (computed once, cached; see normalization.py)
  make_dataset(data_cfg, process_index, process_count, skip_frames=0) -> (tf.data.Dataset, statistics)
      the untokenized batched tf.data stream ('image', 'action', 'language_instruction', 'dataset_index').

With action_chunk K > 1, trajectories shorter than K are dropped, counted from the cached
statistics and said (a DataWarning naming the dataset, the episodes and frames, over all splits); a
dataset with no trajectory of K steps or more is an error naming it, K and its longest trajectory.
A repeating stream that has no frame at all (e.g. a split or process share without a full chunk)
is a ValueError at `next(it)`, not a bare StopIteration.

Order of operations (OpenVLA's, OPENVLA_REFERENCE.md §5): read this host's share of each dataset's
episodes (images stay encoded) -> standardize -> drop trajectories with non-finite actions or no
steps -> normalize (BOUNDS_Q99; proprio too, with use_proprio) -> drop trajectories without instruction -> (K > 1: drop trajectories shorter than K, chunk the
actions) -> repeat -> frames ->
per-dataset frame filter -> weighted interleave (weights x num_transitions) -> shuffle buffer ->
decode + lanczos3 resize (+ augmentation) -> batch -> tokenize on the host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from vla_jax.data import normalization, rlds, transforms
from vla_jax.data.config import DataConfig
from vla_jax.data.stream_checks import DataWarning, check_cameras, check_chunk_lengths, warn_counts

__all__ = ["DataConfig", "DataWarning", "DataIterator", "check_cameras", "check_chunk_lengths", "dataset_statistics",
           "make_dataset", "make_train_iterator", "mixture_weights", "standardized_trajectories"]
from vla_jax.tokenizer import LlamaTokenizer, VLATokenizer

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Sources: one per dataset of the mixture.

@dataclasses.dataclass
class _Source:
    index: int
    cfg: Any  # vla_jax.data.oxe.DatasetConfig
    weight: float
    builder: Any
    standardize: Any


def _registry():
    from vla_jax.data import oxe  # the registry imports TF transforms; keep it out of module import

    return oxe


def _open_sources(data_cfg: DataConfig) -> List[_Source]:
    oxe = _registry()
    if data_cfg.dataset_configs:
        oxe.load_dataset_configs(data_cfg.dataset_configs)
    if not data_cfg.data_dir:
        raise ValueError("DataConfig.data_dir is empty; set it to the folder holding the TFDS builder folders")
    sources = []
    for i, (name, weight) in enumerate(oxe.get_mixture(data_cfg.mixture)):
        cfg = oxe.get_dataset_config(name)
        builder = rlds.open_builder(data_cfg.data_dir, cfg.builder_name, cfg.version)
        for key in ("action", "observation"):
            if key not in builder.info.features["steps"]:
                raise ValueError(f"dataset {name!r} ({builder.data_dir}) has no steps/{key}; "
                                 f"steps hold {sorted(builder.info.features['steps'].keys())}")
        obs_keys = sorted(builder.info.features["steps"]["observation"].keys())
        if cfg.image_key not in obs_keys:
            raise ValueError(f"dataset {name!r}: image_key {cfg.image_key!r} not in steps/observation of "
                             f"{builder.data_dir}, which holds {obs_keys}")
        for key in transforms.camera_keys(cfg, data_cfg.cameras):
            if key not in obs_keys:
                raise ValueError(f"dataset {name!r}: camera {key!r} (image_keys) not in steps/observation of "
                                 f"{builder.data_dir} (so in none of its episodes), which holds {obs_keys}")
        if data_cfg.use_proprio:
            if cfg.proprio_key is None:
                raise ValueError(f"dataset {name!r}: use_proprio is set but its config has no proprio_key (the "
                                 f"state under steps/observation, one of {obs_keys})")
            if cfg.proprio_key not in obs_keys:
                raise ValueError(f"dataset {name!r}: proprio_key {cfg.proprio_key!r} not in steps/observation of "
                                 f"{builder.data_dir} (so in none of its episodes), which holds {obs_keys}")
        sources.append(_Source(i, cfg, float(weight), builder, oxe.get_standardize(cfg.standardize)))
    if data_cfg.use_proprio:
        pdims = {}
        for s in sources:
            shape = s.builder.info.features["steps"]["observation"][s.cfg.proprio_key].shape
            pdims[s.cfg.name] = len(s.cfg.proprio_indices) if s.cfg.proprio_indices else int(np_prod(shape))
        if len(set(pdims.values())) != 1:
            raise ValueError(f"mixture {data_cfg.mixture!r} mixes proprio dims {pdims} (proprio_key, cut by "
                             "proprio_indices); one proprio projector takes one size")
    dims = {s.cfg.action_dim for s in sources}
    if len(dims) != 1:
        raise ValueError(f"mixture {data_cfg.mixture!r} mixes action dims "
                         f"{ {s.cfg.name: s.cfg.action_dim for s in sources} }; one model predicts one size")
    return sources


def np_prod(shape) -> int:
    """Number of values of a feature shape; a scalar state is one dim."""
    return int(np.prod(shape)) if len(shape) else 1


def _standardized(src: _Source, split: str, *, shuffle: bool, seed: Optional[int], threads: int,
                  deterministic: bool, process_index: int = 0, process_count: int = 1, cameras: int = 1,
                  proprio: bool = False, with_id: bool = False) -> tf.data.Dataset:
    part = rlds.process_split(src.builder, split, process_index, process_count)
    ds = rlds.read_trajectories(src.builder, part, shuffle_files=shuffle, seed=seed, num_parallel_reads=threads,
                                num_parallel_calls=threads, deterministic=deterministic, with_id=with_id)

    def fn(traj, episode_id=None):
        out = transforms.restructure(src.standardize(traj, src.cfg), src.cfg, src.index, src.cfg.action_dim,
                                     cameras=cameras, proprio=proprio)
        return out if episode_id is None else {**out, "episode_id": episode_id}

    return rlds.traj_map(ds, fn, num_parallel_calls=threads, deterministic=deterministic)


def _iterate_or_name_corrupt(ds: tf.data.Dataset, src: _Source, split: str):
    try:
        yield from ds.as_numpy_iterator()
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        raise rlds.corrupt_data_error(src.builder, split, e) from None


def _proprio_source(cfg) -> str:
    return f"observation/{cfg.proprio_key}" + (f" dims {list(cfg.proprio_indices)}" if cfg.proprio_indices else "")


def _entry(src: _Source, data_cfg: DataConfig) -> dict:
    proprio = data_cfg.use_proprio
    cams = transforms.camera_keys(src.cfg, data_cfg.cameras) if data_cfg.cameras > 1 else ()

    def compute():
        log.info("computing action%s statistics of %s (all splits)", " and proprio" if proprio else "", src.cfg.name)
        ds = _standardized(src, "all", shuffle=False, seed=None, threads=2, deterministic=True,
                           cameras=len(cams) if cams else 1, proprio=proprio, with_id=bool(cams))

        def keep(t):
            out = {"action": t["action"], "language_instruction": t["language_instruction"]}
            if proprio:
                out["proprio"] = t["proprio"]
            if cams:  # [T, N] encoded images -> [N]: some step of camera i has no image
                out["camera_empty"] = tf.reduce_any(tf.strings.length(t["image"]) == 0, axis=0)
                out["episode_id"] = t["episode_id"]
            return out

        return normalization.compute_statistics(_iterate_or_name_corrupt(ds.map(keep), src, "all"),
                                                src.cfg.normalization_mask,
                                                proprio_source=_proprio_source(src.cfg) if proprio else None,
                                                camera_keys=cams)

    key = normalization.statistics_key(src.builder, src.standardize, src.cfg)

    # The trajectory-length histogram is needed only to check action chunks, the proprio statistics
    # only with use_proprio, the missing-camera record only with several cameras; an older cache
    # file without what this run needs is recomputed then (same action statistics), not on every upgrade.
    def valid(e):
        return ((data_cfg.action_chunk == 1 or normalization.LENGTHS_KEY in e)
                and (not proprio or e.get(normalization.PROPRIO_KEY) == _proprio_source(src.cfg))
                and (not cams or set(cams) <= set(e.get(normalization.MISSING_CAMERAS_KEY, {}))))

    needs = data_cfg.action_chunk > 1 or proprio or cams
    entry = normalization.cached_statistics(src.builder, key, data_cfg.stats_cache_dir, compute,
                                            valid=valid if needs else None)
    # The mask is a property of the config, not of the data (OpenVLA adds it after the cache too).
    entry["action"]["mask"] = [bool(m) for m in src.cfg.normalization_mask]
    if not proprio:  # OpenVLA (no proprio loaded): zeros, whatever an earlier run cached
        entry["proprio"] = normalization.zero_proprio(len(entry["action"]["q01"]))
    return entry


def _statistics(sources: Sequence[_Source], data_cfg: DataConfig) -> Dict[str, dict]:
    out = {}
    for src in sources:
        entry = _entry(src, data_cfg)
        warn_counts(src.cfg.name, entry)
        if data_cfg.cameras > 1:
            check_cameras(src.cfg.name, src.builder, entry, transforms.camera_keys(src.cfg, data_cfg.cameras))
        if data_cfg.action_chunk > 1:
            check_chunk_lengths(src.cfg.name, entry, data_cfg.action_chunk)
        out[src.cfg.name] = entry
    return out


def dataset_statistics(data_cfg: DataConfig) -> Dict[str, dict]:
    """{dataset_name: OpenVLA statistics entry} for every dataset of the mixture (cached)."""
    return {k: normalization.export_entry(v) for k, v in _statistics(_open_sources(data_cfg), data_cfg).items()}


def standardized_trajectories(data_cfg: DataConfig, dataset: Optional[str] = None, split: str = "all",
                              process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
    """One dataset's standardized trajectories in file order, neither normalized nor filtered
    (for inspection, offline evaluation and tests): 'image' encoded tf.string [T] ([T, N] with
    data_cfg.cameras = N > 1, the image_keys order), 'action' float32 [T, A], 'language_instruction' [T],
    'dataset_index' int32 [T], and with data_cfg.use_proprio the raw 'proprio' float32 [T, P].
    `dataset` defaults to the first of the mixture."""
    sources = _open_sources(data_cfg)
    names = [s.cfg.name for s in sources]
    if dataset is not None and dataset not in names:
        raise ValueError(f"dataset {dataset!r} is not in mixture {data_cfg.mixture!r} ({names})")
    src = sources[names.index(dataset) if dataset else 0]
    return _standardized(src, split, shuffle=False, seed=None, threads=1, deterministic=True,
                         process_index=process_index, process_count=process_count, cameras=data_cfg.cameras,
                         proprio=data_cfg.use_proprio)


# ---------------------------------------------------------------------------------------------
# The stream.

def _seeds(seed: int, process_index: int) -> List[int]:
    """Independent op seeds (files, mixture draws, shuffle) for this process."""
    return [int(s) for s in np.random.SeedSequence([int(seed), int(process_index)]).generate_state(4) % (2**31 - 1)]


def mixture_weights(sources: Sequence[_Source], stats: Mapping[str, Mapping], balance: bool) -> List[float]:
    """Sampling probabilities: raw weight x num_transitions (balance=True), normalized to sum 1."""
    w = np.array([s.weight * (stats[s.cfg.name]["num_transitions"] if balance else 1.0) for s in sources], float)
    if not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {w.tolist()}")
    return (w / w.sum()).tolist()


def _encoded_frames(data_cfg: DataConfig, sources: Sequence[_Source], stats: Mapping[str, Mapping],
                    process_index: int, process_count: int) -> tf.data.Dataset:
    """Frames with encoded images after interleave and shuffle (the part a resume must replay)."""
    file_seed, mix_seed, shuffle_seed, _ = _seeds(data_cfg.seed, process_index)
    weights = mixture_weights(sources, stats, data_cfg.balance_weights)
    total = data_cfg.threads or max(len(sources), os.cpu_count() or 1)
    alloc = rlds.allocate_threads(total, weights)
    train = data_cfg.split == "train"
    det = data_cfg.deterministic
    per_dataset = []
    for src, threads in zip(sources, alloc):
        ds = _standardized(src, data_cfg.split, shuffle=train, seed=file_seed + src.index, threads=threads,
                           deterministic=det, process_index=process_index, process_count=process_count,
                           cameras=data_cfg.cameras, proprio=data_cfg.use_proprio)
        entry = stats[src.cfg.name]
        ds = ds.filter(transforms.is_usable)
        ds = rlds.traj_map(ds, lambda t, e=entry: {**t, "action": normalization.normalize_actions_tf(t["action"], e)},
                           num_parallel_calls=threads, deterministic=det)
        if data_cfg.use_proprio:
            ds = rlds.traj_map(ds, lambda t, e=entry: {**t, "proprio": normalization.normalize_proprio_tf(t["proprio"], e)},
                               num_parallel_calls=threads, deterministic=det)
        ds = ds.filter(transforms.is_labeled)
        k = data_cfg.action_chunk
        if k > 1:  # K = 1 is OpenVLA's window 1: nothing to do, and the graph stays as it was
            ds = ds.filter(lambda t, k=k: transforms.has_full_chunk(t, k))
            ds = rlds.traj_map(ds, lambda t, k=k: transforms.chunk_actions(t, k), num_parallel_calls=threads,
                               deterministic=det)
        if data_cfg.repeat:
            ds = ds.repeat()
        ds = rlds.flatten(ds, num_parallel_calls=threads, deterministic=det)
        if src.cfg.frame_filter:
            ds = ds.filter(_registry().get_frame_filter(src.cfg.frame_filter))
        per_dataset.append(ds)
    ds = rlds.sample_from_datasets(per_dataset, weights, seed=mix_seed)
    if data_cfg.shuffle_buffer > 1:
        ds = ds.shuffle(data_cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
    return ds


def make_dataset(data_cfg: DataConfig, process_index: int = 0, process_count: int = 1, skip_frames: int = 0,
                 sources: Optional[Sequence[_Source]] = None, stats: Optional[Mapping] = None):
    """Batched, untokenized stream for this host, and the statistics it was normalized with.

    Elements: 'image' uint8 [B, S, S, 3], 'action' float32 [B, A] ([B, K, A] with action_chunk K > 1),
    'language_instruction' tf.string [B], 'dataset_index' int32 [B]. `skip_frames` drops that many frames of the stream before decoding
    (cheap resume: the frames are still encoded there).
    """
    sources = sources if sources is not None else _open_sources(data_cfg)
    stats = stats if stats is not None else _statistics(sources, data_cfg)
    ds = _encoded_frames(data_cfg, sources, stats, process_index, process_count)
    ds = ds.enumerate()  # position in the stream: seeds the augmentation of that frame
    if skip_frames:
        ds = ds.skip(int(skip_frames))
    size, aug = int(data_cfg.resize_size), bool(data_cfg.image_aug)

    def frame(i, f):
        return transforms.decode_resize_augment(f, size, aug, data_cfg.seed, process_index, i, data_cfg.image_aug_ops)

    ds = rlds.frame_map(ds, frame, num_parallel_calls=tf.data.AUTOTUNE, deterministic=data_cfg.deterministic)
    ds = ds.batch(data_cfg.batch_size, drop_remainder=data_cfg.repeat,
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=data_cfg.deterministic)
    ds = rlds.apply_options(ds, data_cfg.threads, data_cfg.ram_budget_gb, data_cfg.deterministic)
    return ds.prefetch(2), stats


def _as_vla_tokenizer(tokenizer, max_len: int, action_chunk: int = 1) -> VLATokenizer:
    if isinstance(tokenizer, VLATokenizer):
        if tokenizer.max_len == max_len and tokenizer.action_chunk == action_chunk:
            return tokenizer
        return VLATokenizer(tokenizer.tokenizer, max_len=max_len, n_bins=tokenizer.codec.n_bins,
                            action_dim=tokenizer.action_dim, action_chunk=action_chunk)
    if isinstance(tokenizer, LlamaTokenizer):
        return VLATokenizer(tokenizer, max_len=max_len, action_chunk=action_chunk)
    if isinstance(tokenizer, (str, os.PathLike)):
        return VLATokenizer.from_file(tokenizer, max_len=max_len, action_chunk=action_chunk)
    raise ValueError(f"tokenizer must be a VLATokenizer, LlamaTokenizer or a tokenizer.model path, "
                     f"got {type(tokenizer).__name__}")


_STATE_FORMAT = "vla_jax-data-iterator-v1"
# Fields that do not change which frames come in which order (so a state survives changing them).
_STREAM_NEUTRAL = ("threads", "ram_budget_gb", "stats_cache_dir", "dataset_configs")


class DataIterator:
    """Iterator of tokenized numpy batches (see the module docstring), with resumable position."""

    def __init__(self, data_cfg: DataConfig, tokenizer, process_index: int, process_count: int):
        self.data_cfg = data_cfg
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.tokenizer = _as_vla_tokenizer(tokenizer, data_cfg.max_seq_len, data_cfg.action_chunk)
        self._sources = _open_sources(data_cfg)
        self._stats = _statistics(self._sources, data_cfg)
        self.dataset_statistics = {k: normalization.export_entry(v) for k, v in self._stats.items()}
        self.dataset_names = [s.cfg.name for s in self._sources]
        self.batches_consumed = 0
        self._build(skip_batches=0)

    def _build(self, skip_batches: int) -> None:
        self._base_batches = int(skip_batches)
        self._ds, _ = make_dataset(self.data_cfg, self.process_index, self.process_count,
                                   skip_frames=skip_batches * self.data_cfg.batch_size,
                                   sources=self._sources, stats=self._stats)
        self._it = iter(self._ds)
        self.batches_consumed = int(skip_batches)

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        try:
            b = next(self._it)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            for src in self._sources:
                if rlds.find_corrupt_files(rlds.split_files(src.builder, self.data_cfg.split)):
                    raise rlds.corrupt_data_error(src.builder, self.data_cfg.split, e) from None
            raise
        except StopIteration:
            if not self.data_cfg.repeat:
                raise
            # An endless stream that ends has nothing to repeat: say why instead of a bare StopIteration.
            k = self.data_cfg.action_chunk
            why = (f"; with action_chunk={k}, only trajectories of {k} steps or more are streamed (the "
                   f"length check before training counts all splits together)" if k > 1 else "")
            raise ValueError(f"the data stream of mixture {self.data_cfg.mixture!r} (split "
                             f"{self.data_cfg.split!r}, process {self.process_index} of {self.process_count}) "
                             f"has no usable frames although repeat=True{why}") from None
        self.batches_consumed += 1
        instructions = [s.decode("utf-8") for s in b["language_instruction"].numpy()]
        actions = b["action"].numpy()
        out = self.tokenizer.encode_batch(instructions, actions)
        out.update(pixel_values=b["image"].numpy(), actions=actions.astype(np.float32),
                   dataset_index=b["dataset_index"].numpy().astype(np.int32))
        if self.data_cfg.use_proprio:
            out["proprio"] = b["proprio"].numpy().astype(np.float32)
        return out

    # --- resume -----------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self.data_cfg).items() if k not in _STREAM_NEUTRAL}
        # States saved before these fields existed (their defaults) still resume.
        for field, default in (("action_chunk", 1), ("cameras", 1), ("use_proprio", False)):
            if d[field] == default:
                del d[field]
        d.update(process_index=self.process_index, process_count=self.process_count)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def get_state(self) -> np.ndarray:
        """Small uint8 array (JSON): the number of batches consumed and a fingerprint of the
        stream-defining config. Restoring it replays the stream from the seed."""
        s = {"format": _STATE_FORMAT, "batches": self.batches_consumed, "fingerprint": self._fingerprint()}
        return np.frombuffer(json.dumps(s).encode(), np.uint8).copy()

    def set_state(self, state) -> None:
        """Continue after the batches recorded in `state` (from `get_state`): rebuilds the stream
        and skips those frames before decoding them (cost: reading and shuffling them again)."""
        s = json.loads(bytes(np.asarray(state, np.uint8)).decode())
        if s.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a data iterator state (format {s.get('format')!r}, expected {_STATE_FORMAT!r})")
        if not self.data_cfg.deterministic:
            raise ValueError("replaying the stream needs DataConfig.deterministic=True (with False the order "
                             "of elements is not a function of the seed); use save/restore instead")
        if s["fingerprint"] != self._fingerprint():
            raise ValueError("the data iterator state was saved with a different data config or process layout "
                             f"(fingerprint {s['fingerprint']} vs {self._fingerprint()}); it cannot be replayed")
        self._build(skip_batches=int(s["batches"]))

    def save(self, path: str) -> None:
        """Exact checkpoint of the tf.data iterator (shuffle buffer included) under folder `path`."""
        tf.io.gfile.makedirs(path)
        tf.train.Checkpoint(iterator=self._it).write(os.path.join(path, "iterator"))
        meta = {"state": json.loads(bytes(self.get_state()).decode()), "base_batches": self._base_batches}
        with tf.io.gfile.GFile(os.path.join(path, "meta.json"), "w") as f:
            json.dump(meta, f)

    def restore(self, path: str) -> None:
        """Restores a `save`d iterator (same config and process layout)."""
        with tf.io.gfile.GFile(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        if meta["state"]["fingerprint"] != self._fingerprint():
            raise ValueError(f"iterator checkpoint {path} was saved with a different data config or process layout")
        self._build(skip_batches=int(meta["base_batches"]))  # same graph as the saver's
        tf.train.Checkpoint(iterator=self._it).read(os.path.join(path, "iterator")).assert_consumed()
        self.batches_consumed = int(meta["state"]["batches"])


def make_train_iterator(data_cfg: DataConfig, tokenizer, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> DataIterator:
    """The training input: this host's share of each global batch as numpy dicts.

    process_index/process_count default to jax.process_index()/jax.process_count() (JAX is imported
    only then, so the pipeline itself never initializes JAX devices).
    """
    if isinstance(data_cfg, Mapping) or hasattr(data_cfg, "to_dict"):
        data_cfg = DataConfig.from_config(data_cfg)
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return DataIterator(data_cfg, tokenizer, process_index, process_count)
