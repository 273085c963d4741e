"""my_robot_dataset: an RLDS dataset built the way robotics teams build them, a plain tfds
`GeneratorBasedBuilder` (the layout of the Open X-Embodiment datasets).

Each example is one episode: `steps` is a sequence of
    observation/image  uint8 [64, 64, 3] (JPEG)    observation/state  float32 [7]
    action  float32 [7]   language_instruction  string   is_first / is_last / is_terminal  bool
    reward, discount  float32
plus `episode_metadata/file_path`. The raw recordings (one .npz per episode under
MANUAL_DIR/train and MANUAL_DIR/val, see ../make_recordings.py) are read from tfds' manual folder.

Build (examples/own_dataset/build.py does this): with apache-beam installed, `tfds build
examples/own_dataset/my_robot_dataset --manual_dir=RAW --data_dir=DATA` works as well.
"""

from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 64


class Builder(tfds.core.GeneratorBasedBuilder):
    """DatasetBuilder for my_robot_dataset (name taken from the folder: `my_robot_dataset`)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the recordings (train/*.npz, val/*.npz) in the manual folder."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Fake pick-up episodes of a one-camera arm (vla_jax example).",
            features=tfds.features.FeaturesDict({
                "steps": tfds.features.Dataset({
                    "observation": tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8,
                                                     encoding_format="jpeg", doc="Top-down camera, RGB."),
                        "state": tfds.features.Tensor(shape=(7,), dtype=np.float32,
                                                      doc="EEF x, y, z, roll, pitch, yaw, gripper opening."),
                    }),
                    "action": tfds.features.Tensor(shape=(7,), dtype=np.float32,
                                                   doc="EEF deltas (6) + gripper command: 1 = close, 0 = open."),
                    "discount": tfds.features.Scalar(dtype=np.float32),
                    "reward": tfds.features.Scalar(dtype=np.float32),
                    "is_first": tfds.features.Scalar(dtype=np.bool_),
                    "is_last": tfds.features.Scalar(dtype=np.bool_),
                    "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                    "language_instruction": tfds.features.Text(),
                }),
                "episode_metadata": tfds.features.FeaturesDict({"file_path": tfds.features.Text()}),
            }))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        raw = dl_manager.manual_dir
        return {split: self._generate_examples(os.path.join(raw, split)) for split in ("train", "val")}

    def _generate_examples(self, folder: str):
        files = sorted(glob.glob(os.path.join(folder, "*.npz")))
        if not files:
            raise ValueError(f"no episode files (*.npz) in {folder}")
        for path in files:
            ep = np.load(path)
            n = len(ep["action"])
            steps = [{"observation": {"image": ep["image"][t], "state": ep["state"][t]},
                      "action": ep["action"][t], "discount": 1.0, "reward": float(t == n - 1),
                      "is_first": t == 0, "is_last": t == n - 1, "is_terminal": t == n - 1,
                      "language_instruction": str(ep["instruction"])} for t in range(n)]
            yield path, {"steps": steps, "episode_metadata": {"file_path": path}}
