"""Held-out episodes for offline evaluation, read as training reads them (same standardization).

Each episode of each dataset in a mixture comes back standardized (e.g. Bridge relabelled from
state deltas, gripper binarized) but neither normalized nor resized: raw actions in the dataset's
units and decoded uint8 frames at their stored size. The policy resizes (and normalizes its own
predictions), so the comparison uses exactly the inference path. For a policy with several cameras
and/or proprio, the other cameras (the datasets' image_keys after the primary) and the raw proprio
state come too, read with the same code training reads them with.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


@dataclasses.dataclass
class Episode:
    """dataset: registry name; index: position in the split's file order; images uint8 [T, H, W, 3] (the
    primary camera); actions float32 [T, A] (standardized, raw units); instructions: T strings;
    more_images: the other cameras' frames, uint8 [T, H_i, W_i, 3] each, in image_keys order (empty with
    one camera); proprio: the raw proprio state float32 [T, P] (None unless asked for)."""

    dataset: str
    index: int
    images: np.ndarray
    actions: np.ndarray
    instructions: List[str]
    more_images: Tuple[np.ndarray, ...] = ()
    proprio: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.actions.shape[0])

    def observations(self, cameras: Sequence[str], rows, with_state: bool) -> Dict[str, np.ndarray]:
        """A batched observation dict for `Policy.predict` of the frames `rows` (index array or mask):
        {camera name: uint8 [B, H, W, 3]} in `cameras` order (the policy's spec), plus 'state' [B, P]."""
        frames = (self.images,) + tuple(self.more_images)
        if len(frames) != len(cameras):
            raise ValueError(f"episode {self.index} of {self.dataset!r} has {len(frames)} camera(s) but the policy "
                             f"takes {len(cameras)}: {list(cameras)}")
        obs = {cam: f[rows] for cam, f in zip(cameras, frames)}
        if with_state:
            if self.proprio is None:
                raise ValueError(f"episode {self.index} of {self.dataset!r} was read without its proprio state")
            obs["state"] = self.proprio[rows]
        return obs


def mixture_datasets(mixture: str, dataset_configs: Optional[str] = None) -> List[str]:
    """Dataset names of a registered mixture (or [name] for a single dataset)."""
    from vla_jax.data import oxe

    if dataset_configs:
        oxe.load_dataset_configs(dataset_configs)
    return [name for name, _ in oxe.get_mixture(mixture)]


def iter_episodes(data_dir: str, mixture: str, split: str = "val", max_episodes: Optional[int] = None,
                  dataset_configs: Optional[str] = None, cameras: int = 1, proprio: bool = False) -> Iterator[Episode]:
    """Episodes of every dataset in `mixture`, dataset by dataset, in file order.

    max_episodes: per dataset (None or 0: all). Episodes without any instruction or with non-finite
    actions are skipped, as training skips them. Images are decoded with the pipeline's decoder.
    cameras: how many of each dataset's image_keys to read (as training's `data.cameras`); proprio: also
    read the raw proprio state (as `data.use_proprio`, without the normalization).
    """
    import tensorflow as tf

    from vla_jax.data import pipeline, transforms

    names = mixture_datasets(mixture, dataset_configs)
    data_cfg = pipeline.DataConfig(data_dir=str(data_dir), mixture=mixture, split=split,
                                   dataset_configs=dataset_configs, cameras=int(cameras), use_proprio=bool(proprio))

    def decode(encoded):  # tf.string [T] -> uint8 [T, H, W, 3]
        return tf.map_fn(lambda e: transforms.decode_image(e, 1), encoded,
                         fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))

    def decode_all(t):
        if cameras > 1:  # [T, N] -> one [T, H_i, W_i, 3] per camera (cameras may differ in size)
            return {**t, "image": tuple(decode(t["image"][:, i]) for i in range(cameras))}
        return {**t, "image": (decode(t["image"]),)}

    for name in names:
        ds = pipeline.standardized_trajectories(data_cfg, dataset=name, split=split)
        ds = ds.filter(transforms.is_usable).filter(transforms.is_labeled).map(decode_all)
        taken = 0
        for i, traj in enumerate(ds.as_numpy_iterator()):
            if max_episodes and taken >= max_episodes:
                break
            instr = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in traj["language_instruction"]]
            images = tuple(np.asarray(x) for x in traj["image"])
            state = np.asarray(traj["proprio"], np.float32) if proprio else None
            yield Episode(name, i, images[0], np.asarray(traj["action"], np.float32), instr, images[1:], state)
            taken += 1
