"""BatchSpec: every key of a training batch with its dtype and shape — the one batch layout.

Read by the pipeline (what it must produce), the train step (which keys it takes and the host-side
check), `plan` and the benchmarks (abstract shapes), the synthetic batches, and the policy (image
size, cameras, the test-time crop). Built from the model config and the data config, stored as a
checkpoint asset (`batch_spec`) so a checkpoint says what it was trained on.

Keys (B = batch, S = image size, L = text length incl. BOS, N = cameras, K x D = chunk x action dim):
  pixel_values   uint8 [B, S, S, 3] with one camera; [B, N, S, S, 3] with several (primary first)
  input_ids      int32 [B, L]   `[BOS] prompt 29871 actions </s> PAD...`
  labels         int32 [B, L]   -100 except the action tokens and `</s>`
  dataset_index  int32 [B]      position of the row's dataset in the mixture (per-dataset metrics)
  actions        float32 [B, K, D]  normalized chunk, only for the continuous (l1) head
  proprio        float32 [B, P]     normalized proprioception, only when proprio_dim is set
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from vla_jax.spec.actions import ActionCodec, known_fields

IGNORE_INDEX = -100


def camera_names(n: int) -> Tuple[str, ...]:
    """The camera names of a run with N cameras (the data's image_keys in order, primary first):
    'primary', then 'wrist' (OFT's LIBERO `wrist_image`, the Meta-World demo's gripper camera), then
    'wrist_2', ... (ALOHA's second wrist). A policy's observation dict names images by these."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the number of cameras must be an integer >= 1, got {n!r}")
    return ("primary", "wrist", *(f"wrist_{i}" for i in range(2, int(n))))[:int(n)]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    image_size: int
    text_len: int
    codec: ActionCodec = ActionCodec()
    cameras: Tuple[str, ...] = ("primary",)
    proprio_dim: Optional[int] = None
    num_datasets: int = 1
    # The test-time 0.9-area centre crop: True when training used the random-resized-crop augmentation
    # (OpenVLA's eval scripts crop exactly then); the policy reads it from here.
    test_center_crop: bool = False

    def __post_init__(self):
        if self.image_size < 1 or self.text_len < 1 or self.num_datasets < 1:
            raise ValueError(f"BatchSpec: image_size={self.image_size}, text_len={self.text_len} and "
                             f"num_datasets={self.num_datasets} must be positive")
        if not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"BatchSpec.cameras={self.cameras!r} must be distinct names, at least one")
        if self.proprio_dim is not None and self.proprio_dim < 1:
            raise ValueError(f"BatchSpec.proprio_dim={self.proprio_dim} must be None or >= 1")
        if self.text_len < self.codec.num_supervised + 3:
            raise ValueError(f"BatchSpec.text_len={self.text_len} leaves no room for BOS, a prompt, 29871 and the "
                             f"{self.codec.num_supervised} supervised tokens")

    # -- layout -----------------------------------------------------------------------------------

    def image_shape(self) -> Tuple[int, ...]:
        s = self.image_size
        return (s, s, 3) if len(self.cameras) == 1 else (len(self.cameras), s, s, 3)

    def layout(self) -> Dict[str, Tuple[Tuple[int, ...], np.dtype]]:
        """{key: (shape without the batch axis, dtype)} of every key the train step reads, in order."""
        out = {"pixel_values": (self.image_shape(), np.dtype(np.uint8)),
               "input_ids": ((self.text_len,), np.dtype(np.int32)),
               "labels": ((self.text_len,), np.dtype(np.int32)),
               "dataset_index": ((), np.dtype(np.int32))}
        if self.codec.decoding == "parallel":  # OFT's bidirectional pass masks pads as keys
            out["attention_mask"] = ((self.text_len,), np.dtype(np.int32))
        if self.codec.head == "l1":
            out["actions"] = (self.codec.chunk_shape, np.dtype(np.float32))
        if self.proprio_dim is not None:
            out["proprio"] = ((self.proprio_dim,), np.dtype(np.float32))
        return out

    @property
    def keys(self) -> Tuple[str, ...]:
        return tuple(self.layout())

    def shapes(self, batch: int, leading: Tuple[int, ...] = ()) -> Dict[str, Tuple[int, ...]]:
        """{key: shape} for a batch of `batch` rows (with optional leading axes, e.g. steps per call)."""
        return {k: tuple(leading) + (int(batch),) + s for k, (s, _) in self.layout().items()}

    def abstract(self, batch: int, leading: Tuple[int, ...] = (), sharding=None) -> Dict[str, Any]:
        """{key: jax.ShapeDtypeStruct} for compiling a step ahead of time (`plan`, benchmarks)."""
        import jax

        return {k: jax.ShapeDtypeStruct(tuple(leading) + (int(batch),) + s, d, sharding=sharding)
                for k, (s, d) in self.layout().items()}

    def zeros(self, batch: int) -> Dict[str, np.ndarray]:
        """A batch of the right layout filled with zeros (labels -100): shapes for init and tracing."""
        out = {k: np.zeros((int(batch),) + s, d) for k, (s, d) in self.layout().items()}
        out["labels"][:] = IGNORE_INDEX
        return out

    def select(self, batch: Mapping[str, Any]) -> Dict[str, Any]:
        """The keys the step reads, in layout order (other keys, e.g. attention_mask, dropped)."""
        return {k: batch[k] for k in self.layout()}

    # -- host-side check --------------------------------------------------------------------------

    def check(self, batch: Mapping[str, Any]) -> None:
        """ValueError naming the key, dtype, shape or value when a host batch breaks the layout."""
        layout = self.layout()
        missing = [k for k in layout if k not in batch]
        if missing:
            raise ValueError(f"batch is missing keys {missing}; got {sorted(batch)} (BatchSpec keys {list(layout)})")
        b = np.shape(batch["input_ids"])[0] if np.ndim(batch["input_ids"]) else 0
        for key, (shape, dtype) in layout.items():
            x = np.asarray(batch[key])
            want = (b,) + shape
            ok_dtype = x.dtype == dtype or (dtype.kind == "i" and x.dtype.kind == "i" and key != "pixel_values")
            if x.shape != want or not ok_dtype:
                dims = ", ".join(str(d) for d in want)
                raise ValueError(f"batch[{key!r}] must be {dtype.name} [{dims}], got {x.dtype} {x.shape}")
        n_sup = (np.asarray(batch["labels"]) != IGNORE_INDEX).sum(axis=1)
        if n_sup.max(initial=0) > self.codec.num_supervised:
            row = int(np.argmax(n_sup))
            raise ValueError(f"batch row {row} has {int(n_sup[row])} supervised labels; the loss expects at most "
                             f"{self.codec.num_supervised} (chunk_size x action_dim + EOS)")
        di = np.asarray(batch["dataset_index"])
        if di.min(initial=0) < 0 or di.max(initial=0) >= self.num_datasets:
            raise ValueError(f"batch['dataset_index'] must be int [{b}] in [0, {self.num_datasets}), "
                             f"got range [{di.min(initial=0)}, {di.max(initial=0)}]")

    # -- asset ------------------------------------------------------------------------------------

    def to_json(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cameras"] = list(self.cameras)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any], where: str = "batch_spec") -> "BatchSpec":
        d = known_fields(cls, d, where)
        d["codec"] = ActionCodec.from_json(d.get("codec", {}), f"{where}.codec")
        d["cameras"] = tuple(d.get("cameras", ("primary",)))
        return cls(**d)

    @classmethod
    def for_model(cls, model_config, text_len: int, *, num_datasets: int = 1, action_dim: Optional[int] = None,
                  test_center_crop: bool = False, cameras: Optional[Tuple[str, ...]] = None,
                  proprio_dim: Optional[int] = None) -> "BatchSpec":
        """The layout a model config and a data config (text length, datasets, augmentation) imply.

        cameras: the camera names, one per model image (default `camera_names(model num_images)`);
        proprio_dim: must be the model's (default: the model's). A disagreement is a ValueError."""
        n = int(getattr(model_config, "num_images", 1))
        model_p = getattr(model_config, "proprio_dim", None)
        cameras = camera_names(n) if cameras is None else tuple(cameras)
        if len(cameras) != n:
            raise ValueError(f"BatchSpec.for_model: cameras={list(cameras)} ({len(cameras)}) but the model takes "
                             f"num_images={n}")
        if proprio_dim is not None and proprio_dim != model_p:
            raise ValueError(f"BatchSpec.for_model: proprio_dim={proprio_dim} but the model has proprio_dim={model_p}")
        return cls(image_size=int(model_config.image_size), text_len=int(text_len),
                   codec=ActionCodec.for_model(model_config, action_dim), cameras=cameras,
                   proprio_dim=model_p, num_datasets=int(num_datasets), test_center_crop=bool(test_center_crop))
