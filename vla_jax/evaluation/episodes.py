"""Held-out episodes for offline evaluation, read as training reads them (same standardization).

Each episode of each dataset in a mixture comes back standardized (e.g. Bridge relabelled from
state deltas, gripper binarized) but neither normalized nor resized: raw actions in the dataset's
units and decoded uint8 frames at their stored size. The policy resizes (and normalizes its own
predictions), so the comparison uses exactly the inference path.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Optional

import numpy as np


@dataclasses.dataclass
class Episode:
    """dataset: registry name; index: position in the split's file order; images uint8 [T, H, W, 3];
    actions float32 [T, A] (standardized, raw units); instructions: T strings."""

    dataset: str
    index: int
    images: np.ndarray
    actions: np.ndarray
    instructions: List[str]

    def __len__(self) -> int:
        return int(self.actions.shape[0])


def mixture_datasets(mixture: str, dataset_configs: Optional[str] = None) -> List[str]:
    """Dataset names of a registered mixture (or [name] for a single dataset)."""
    from vla_jax.data import oxe

    if dataset_configs:
        oxe.load_dataset_configs(dataset_configs)
    return [name for name, _ in oxe.get_mixture(mixture)]


def iter_episodes(data_dir: str, mixture: str, split: str = "val", max_episodes: Optional[int] = None,
                  dataset_configs: Optional[str] = None) -> Iterator[Episode]:
    """Episodes of every dataset in `mixture`, dataset by dataset, in file order.

    max_episodes: per dataset (None or 0: all). Episodes without any instruction or with non-finite
    actions are skipped, as training skips them. Images are decoded with the pipeline's decoder.
    """
    import tensorflow as tf

    from vla_jax.data import pipeline, transforms

    names = mixture_datasets(mixture, dataset_configs)
    data_cfg = pipeline.DataConfig(data_dir=str(data_dir), mixture=mixture, split=split,
                                   dataset_configs=dataset_configs)
    for name in names:
        ds = pipeline.standardized_trajectories(data_cfg, dataset=name, split=split)
        ds = ds.filter(transforms.is_usable).filter(transforms.is_labeled)
        ds = ds.map(lambda t: {**t, "image": tf.map_fn(lambda e: transforms.decode_image(e, 1), t["image"],
                                                       fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))})
        taken = 0
        for i, traj in enumerate(ds.as_numpy_iterator()):
            if max_episodes and taken >= max_episodes:
                break
            instr = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in traj["language_instruction"]]
            yield Episode(name, i, np.asarray(traj["image"]), np.asarray(traj["action"], np.float32), instr)
            taken += 1
