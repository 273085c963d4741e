"""Write episodes as an RLDS dataset: a real TFDS builder folder that needs no builder code.

    {data_dir}/{name}/{version}/
        dataset_info.json  features.json
        {name}-{split}.tfrecord-{shard:05d}-of-{num_shards:05d}

`tfds.builder_from_directory` (and so the vla_jax data pipeline) reads it like any Open X-Embodiment
dataset. Works for any robot data: build the features with `rlds_features` (or pass your own
`tfds.features.FeaturesDict` with a `steps` Dataset), turn each episode's arrays into a nested dict
with `make_episode`, and `add` it to a split. The metadata (split sizes, shard lengths) is written
by `close()`; until then the folder holds only partial shard files.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")  # what TFDS accepts as a dataset name in file names


def image_feature(size: int | Sequence[int], encoding: str = "jpeg") -> tfds.features.Image:
    """uint8 [H, W, 3] image stored as JPEG or PNG bytes (`size`: side, or (H, W))."""
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if encoding not in ("jpeg", "png"):
        raise ValueError(f"image encoding must be 'jpeg' or 'png', got {encoding!r}")
    return tfds.features.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format=encoding)


def rlds_features(observation: Mapping[str, Any], action_dim: int,
                  episode_metadata: Optional[Mapping[str, Any]] = None) -> tfds.features.FeaturesDict:
    """The usual RLDS layout (as in the OXE datasets):

    steps: observation {your features}, action float32 [action_dim], reward float32, discount float32,
           is_first / is_last / is_terminal bool, language_instruction text
    episode_metadata: {your features} (optional)
    observation / episode_metadata values: tfds FeatureConnectors (e.g. `image_feature(128)`,
    `tfds.features.Tensor(shape=(39,), dtype=np.float32)`, `tfds.features.Text()`).
    """
    if not observation:
        raise ValueError("observation must name at least one feature (e.g. {'image': image_feature(128)})")
    steps = tfds.features.Dataset({
        "observation": tfds.features.FeaturesDict(dict(observation)),
        "action": tfds.features.Tensor(shape=(int(action_dim),), dtype=np.float32),
        "reward": tfds.features.Scalar(dtype=np.float32),
        "discount": tfds.features.Scalar(dtype=np.float32),
        "is_first": tfds.features.Scalar(dtype=np.bool_),
        "is_last": tfds.features.Scalar(dtype=np.bool_),
        "is_terminal": tfds.features.Scalar(dtype=np.bool_),
        "language_instruction": tfds.features.Text(),
    })
    top: Dict[str, Any] = {"steps": steps}
    if episode_metadata:
        top["episode_metadata"] = tfds.features.FeaturesDict(dict(episode_metadata))
    return tfds.features.FeaturesDict(top)


def make_episode(observation: Mapping[str, Any], action, instruction: str, *, terminal: bool = True,
                 reward=None, metadata: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Arrays of one episode -> the nested dict `rlds_features` describes.

    observation: {key: [T, ...] array or a length-T list (e.g. encoded image bytes)};
    action: [T, A]; instruction: one string for every step; terminal: the last step ends the task
    (is_terminal; False for a time-out); reward: [T] (default 1 on a terminal last step, else 0).
    """
    action = np.asarray(action, np.float32)
    if action.ndim != 2 or action.shape[0] == 0:
        raise ValueError(f"action must be [T, A] with T > 0, got shape {action.shape}")
    t = action.shape[0]
    for k, v in observation.items():
        if len(v) != t:
            raise ValueError(f"observation[{k!r}] has {len(v)} steps but action has {t}")
    if reward is None:
        reward = np.zeros(t, np.float32)
        reward[-1] = 1.0 if terminal else 0.0
    reward = np.asarray(reward, np.float32)
    if reward.shape != (t,):
        raise ValueError(f"reward must have shape [{t}], got {reward.shape}")
    index = np.arange(t)
    steps = {
        "observation": dict(observation),
        "action": action,
        "reward": reward,
        "discount": np.ones(t, np.float32),
        "is_first": index == 0,
        "is_last": index == t - 1,
        "is_terminal": (index == t - 1) & bool(terminal),
        "language_instruction": [instruction] * t,
    }
    out: Dict[str, Any] = {"steps": steps}
    if metadata is not None:
        out["episode_metadata"] = dict(metadata)
    return out


class RLDSWriter:
    """Writes episodes into the builder folder `builder_dir` = {data_dir}/{name}/{version}.

    features: a FeaturesDict with a `steps` Dataset (see `rlds_features`).
    episodes_per_shard: a new TFRecord file after this many episodes of a split.
    description: free text stored in dataset_info.json.
    The folder must be new or empty. Use as a context manager, or call `close()` to finish.
    """

    def __init__(self, builder_dir: str, features: tfds.features.FeaturesDict, *, episodes_per_shard: int = 50,
                 description: str = ""):
        builder_dir = os.fspath(builder_dir)
        self.version = os.path.basename(os.path.normpath(builder_dir))
        self.name = os.path.basename(os.path.dirname(os.path.normpath(builder_dir)))
        if not _VERSION.match(self.version):
            raise ValueError(f"builder_dir must end in {{name}}/{{version}} with a version like 1.0.0, "
                             f"got {builder_dir!r} (version part {self.version!r})")
        if not _NAME.match(self.name):
            raise ValueError(f"dataset name {self.name!r} (from builder_dir {builder_dir!r}) must be lower-case "
                             "letters, digits and underscores, starting with a letter")
        if not isinstance(features, tfds.features.FeaturesDict) or "steps" not in features:
            raise ValueError("features must be a tfds.features.FeaturesDict with a 'steps' Dataset "
                             "(see rlds_features)")
        if int(episodes_per_shard) <= 0:
            raise ValueError(f"episodes_per_shard must be > 0, got {episodes_per_shard}")
        if tf.io.gfile.exists(builder_dir) and tf.io.gfile.listdir(builder_dir):
            raise ValueError(f"builder folder {builder_dir} already exists and is not empty; "
                             "write to a new folder")
        tf.io.gfile.makedirs(builder_dir)
        self.builder_dir, self.features = builder_dir, features
        self.episodes_per_shard, self.description = int(episodes_per_shard), description
        self._shards: Dict[str, List[List[Any]]] = {}   # split -> [[partial path, episodes, bytes]]
        self._writer: Dict[str, tf.io.TFRecordWriter] = {}
        self._closed = False

    def add(self, split: str, episode: Mapping[str, Any]) -> None:
        """Append one episode (nested dict matching the features) to `split`."""
        if self._closed:
            raise ValueError("the writer is closed")
        if not _NAME.match(split):
            raise ValueError(f"split name {split!r} must be lower-case letters, digits and underscores")
        try:
            record = self.features.serialize_example(episode)
        except Exception as e:  # noqa: BLE001 - name the split and the problem
            raise ValueError(f"episode for split {split!r} does not match the features: {e}") from e
        shards = self._shards.setdefault(split, [])
        if not shards or shards[-1][1] >= self.episodes_per_shard:
            if split in self._writer:
                self._writer.pop(split).close()
            path = os.path.join(self.builder_dir, f".{self.name}-{split}.tfrecord-{len(shards):05d}.partial")
            shards.append([path, 0, 0])
            self._writer[split] = tf.io.TFRecordWriter(path)
        self._writer[split].write(record)
        shards[-1][1] += 1
        shards[-1][2] += len(record)

    def num_episodes(self) -> Dict[str, int]:
        """{split: episodes added so far}."""
        return {s: sum(n for _, n, _ in shards) for s, shards in self._shards.items()}

    def close(self) -> Dict[str, int]:
        """Name the shards and write dataset_info.json / features.json; returns {split: episodes}."""
        if self._closed:
            return self.num_episodes()
        if not self._shards:
            raise ValueError(f"no episodes were added to {self.builder_dir}; an RLDS dataset needs at least one")
        for w in self._writer.values():
            w.close()
        self._writer = {}
        split_infos = []
        for split, shards in self._shards.items():
            for k, (path, _, _) in enumerate(shards):
                final = f"{self.name}-{split}.tfrecord-{k:05d}-of-{len(shards):05d}"
                tf.io.gfile.rename(path, os.path.join(self.builder_dir, final), overwrite=True)
            split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n for _, n, _ in shards],
                                                   num_bytes=sum(b for _, _, b in shards)))
        tfds.folder_dataset.write_metadata(data_dir=self.builder_dir, features=self.features,
                                           split_infos=split_infos, check_data=False,
                                           description=self.description)
        self._closed = True
        return self.num_episodes()

    def __enter__(self) -> "RLDSWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no half-written shard files behind an error
            for w in self._writer.values():
                w.close()
            for shards in self._shards.values():
                for path, _, _ in shards:
                    if tf.io.gfile.exists(path):
                        tf.io.gfile.remove(path)
