"""`DataConfig`: the options of the input pipeline (vla_jax/data/pipeline.py)."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import numpy as np

from vla_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Options of the input pipeline.

    data_dir: folder holding `{builder_name}/{version}/` TFDS builder folders.
    mixture: a named mixture or a single registered dataset name.
    split: 'train' / 'val' (without a val split: the last 5% of train) / 'all'.
    batch_size: frames per batch *on this host*.
    resize_size: side of the square uint8 images (224 for OpenVLA; smaller for demo models).
    image_aug: OpenVLA's augmentation (random crop, brightness, contrast, saturation, hue).
    image_aug_ops: which of those ops image_aug applies (default all, in OpenVLA's order).
    shuffle_buffer: frames (still encoded) in the shuffle buffer (OpenVLA: 256,000).
    seed: makes the stream reproducible (file order, mixture draws, shuffle, augmentation).
    max_seq_len: fixed text length of input_ids/labels (BOS included, image patches not).
    threads: tf.data private thread pool size (None: TF's default pool).
    ram_budget_gb: tf.data autotune RAM budget (OpenVLA: 1).
    dataset_configs: optional .json/.py file registering extra datasets/mixtures.
    stats_cache_dir: where statistics go when the data folder is read-only
      (None: $VLA_JAX_CACHE_DIR or ~/.cache/vla_jax).
    repeat: infinite stream (training); False gives one pass (evaluation).
    deterministic: keep element order a function of the seed (needed for skip-based resume).
    balance_weights: multiply mixture weights by each dataset's num_transitions (OpenVLA: True).
    action_chunk: K, the actions each frame carries (1: OpenVLA, one action per frame; K > 1:
      OpenVLA-OFT's chunks, frame t carries actions t..t+K-1 of its episode, chunks start only at
      t <= T - K, trajectories shorter than K are dropped; see `transforms.chunk_actions`). The
      mixture weights still use the statistics' num_transitions, as upstream. max_seq_len must
      hold the prompt plus K * action_dim + 3 tokens.
    cameras: N, the cameras per frame: the first N of each dataset's `image_keys` (primary first).
      1: the primary camera only, pixel_values [B, S, S, 3]; N > 1: [B, N, S, S, 3], each camera
      decoded and resized alike and augmented with its own seed. A dataset naming fewer cameras,
      lacking one, or with an episode whose image is empty in some step is an error naming the
      dataset, the key (and the episode).
    use_proprio: add 'proprio' float32 [B, P] from each dataset's `proprio_key` (every dataset of
      the mixture needs one, all of the same P), normalized with its proprio statistics.
    """

    data_dir: str = ""
    mixture: str = "bridge_orig"
    split: str = "train"
    batch_size: int = 8
    resize_size: int = 224
    image_aug: bool = False
    image_aug_ops: Tuple[str, ...] = transforms.AUGMENT_ORDER
    shuffle_buffer: int = 256_000
    seed: int = 0
    max_seq_len: int = 64
    threads: Optional[int] = None
    ram_budget_gb: Optional[float] = 1.0
    dataset_configs: Optional[str] = None
    stats_cache_dir: Optional[str] = None
    repeat: bool = True
    deterministic: bool = True
    balance_weights: bool = True
    action_chunk: int = 1
    cameras: int = 1
    use_proprio: bool = False

    @classmethod
    def from_config(cls, section: Any) -> "DataConfig":
        """From a dict or an ml_collections ConfigDict; unknown keys are an error naming them."""
        d = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def __post_init__(self):
        for f in ("batch_size", "resize_size", "max_seq_len"):
            if int(getattr(self, f)) <= 0:
                raise ValueError(f"DataConfig.{f} must be > 0, got {getattr(self, f)!r}")
        k = self.action_chunk
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"DataConfig.action_chunk must be an integer >= 1 (1: one action per frame, "
                             f"OpenVLA; 8: OpenVLA-OFT's LIBERO chunks), got {k!r}")
        object.__setattr__(self, "action_chunk", int(k))
        n = self.cameras
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"DataConfig.cameras must be an integer >= 1 (the first N of each dataset's "
                             f"image_keys; 2 for OpenVLA-OFT's LIBERO image + wrist_image), got {n!r}")
        object.__setattr__(self, "cameras", int(n))
        if not isinstance(self.use_proprio, (bool, np.bool_)):
            raise ValueError(f"DataConfig.use_proprio must be True or False, got {self.use_proprio!r}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"DataConfig.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        # A list from a config file becomes a tuple: the config stays hashable.
        object.__setattr__(self, "image_aug_ops", transforms.check_augment_ops(self.image_aug_ops))
