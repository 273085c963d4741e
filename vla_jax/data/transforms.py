"""Trajectory and frame transforms of the data pipeline (graph-mode TF).

Trajectory level (every value [T, ...]):
  `restructure`   standardized RLDS trajectory -> {'image' (encoded) [T], 'action' [T, A] float32,
                  'language_instruction' [T], 'dataset_index' [T] int32}
  `is_usable` / `is_labeled`   filters (finite actions and T > 0 / some non-empty instruction)
  `has_full_chunk` / `chunk_actions`   action chunks of K future actions (OpenVLA-OFT), K > 1 only
Frame level:
  `decode_image`, `resize_image` (lanczos3 + antialias, rounded uint8: what OpenVLA trained on),
  `augment_image` (OpenVLA's order and parameters, independent random draws),
  `center_crop` (the deterministic 0.9-area crop used at test time for checkpoints trained with
  augmentation). `resize_image` and `center_crop` accept numpy too: inference reuses them.

Not implemented, on purpose: goal relabeling (OpenVLA computes a goal image per frame but the model
never reads it). Action chunking with K = 1 (OpenVLA: window 1, no future actions) is a no-op on
values, so the pipeline applies `chunk_actions` only for K > 1.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

# OpenVLA's fine-tuning augmentation (prismatic/vla/datasets/datasets.py), applied in this order,
# each followed by a clip to [0, 1].
AUGMENT_ORDER = ("random_resized_crop", "random_brightness", "random_contrast", "random_saturation", "random_hue")
OPENVLA_AUGMENT = {
    "random_resized_crop": {"scale": (0.9, 0.9), "ratio": (1.0, 1.0)},
    "random_brightness": (0.2,),
    "random_contrast": (0.8, 1.2),
    "random_saturation": (0.8, 1.2),
    "random_hue": (0.05,),
}
TEST_TIME_CROP_AREA = 0.9


# ----------------------------------------------------------------------------------------------
# Trajectory level.

def restructure(traj: Mapping, dataset_cfg, dataset_index: int, action_dim: int, cameras: int = 1,
                proprio: bool = False) -> dict:
    """Standardized trajectory -> the flat structure the pipeline carries.

    cameras: N, how many of `dataset_cfg.image_keys` to carry. N = 1: 'image' is the primary
      camera's encoded bytes [T] (the one-camera layout); N > 1: 'image' is tf.string [T, N], the
      first N cameras in image_keys order (primary first).
    proprio: also carry 'proprio' float32 [T, P]: observation[proprio_key], cut to proprio_indices.
    Raises ValueError at trace time if a key the config names is missing, listing what is there.
    """
    obs = traj.get("observation")
    if not isinstance(obs, Mapping) or dataset_cfg.image_key not in obs:
        have = sorted(obs) if isinstance(obs, Mapping) else sorted(traj)
        raise ValueError(f"dataset {dataset_cfg.name!r}: image key 'observation/{dataset_cfg.image_key}' missing "
                         f"after standardization; observation keys are {have}")
    for key in ("action", dataset_cfg.language_key):
        if key not in traj:
            raise ValueError(f"dataset {dataset_cfg.name!r}: key {key!r} missing after standardization; "
                             f"trajectory keys are {sorted(traj)}")
    action = tf.cast(traj["action"], tf.float32)
    if action.shape.rank != 2 or action.shape[-1] != action_dim:
        raise ValueError(f"dataset {dataset_cfg.name!r}: standardized action must be [T, {action_dim}], "
                         f"got {action.shape}")
    image = traj["observation"][dataset_cfg.image_key]
    if image.dtype != tf.string:
        raise ValueError(f"dataset {dataset_cfg.name!r}: image 'observation/{dataset_cfg.image_key}' must stay "
                         f"encoded (tf.string) until after the shuffle, got {image.dtype}")
    t = tf.shape(action)[0]
    if cameras > 1:
        image = tf.stack([_camera(traj, dataset_cfg, key) for key in camera_keys(dataset_cfg, cameras)], axis=1)
    out = {
        "image": image,
        "action": action,
        "language_instruction": tf.reshape(tf.cast(traj[dataset_cfg.language_key], tf.string), [-1]),
        "dataset_index": tf.fill([t], tf.constant(dataset_index, tf.int32)),
    }
    if proprio:
        out["proprio"] = proprio_of(traj, dataset_cfg)
    return out


def camera_keys(dataset_cfg, cameras: int) -> Tuple[str, ...]:
    """The first `cameras` of the dataset's image_keys; ValueError naming the dataset when it has fewer."""
    keys = tuple(dataset_cfg.image_keys)
    if cameras > len(keys):
        raise ValueError(f"dataset {dataset_cfg.name!r}: {cameras} cameras asked (DataConfig.cameras) but its "
                         f"config names {len(keys)} in image_keys {list(keys)}; add the other cameras' keys to "
                         "image_keys (primary first) or lower cameras")
    return keys[:cameras]


def _camera(traj: Mapping, dataset_cfg, key: str) -> tf.Tensor:
    obs = traj["observation"]
    if key not in obs:
        raise ValueError(f"dataset {dataset_cfg.name!r}: camera 'observation/{key}' (image_keys) missing after "
                         f"standardization; observation keys are {sorted(obs)}")
    image = obs[key]
    if image.dtype != tf.string or image.shape.rank != 1:
        raise ValueError(f"dataset {dataset_cfg.name!r}: camera 'observation/{key}' must be encoded images "
                         f"(tf.string [T]) until after the shuffle, got {image.dtype} {image.shape}")
    return image


def proprio_of(traj: Mapping, dataset_cfg) -> tf.Tensor:
    """observation[proprio_key] float32 [T, D] -> [T, P] (the proprio_indices dims, in order)."""
    key = dataset_cfg.proprio_key
    if key is None:
        raise ValueError(f"dataset {dataset_cfg.name!r} has no proprio_key in its config; set it (e.g. 'state', "
                         "a key under steps/observation) or turn use_proprio off")
    obs = traj.get("observation", {})
    if key not in obs:
        raise ValueError(f"dataset {dataset_cfg.name!r}: proprio 'observation/{key}' missing after "
                         f"standardization; observation keys are {sorted(obs)}")
    state = tf.cast(obs[key], tf.float32)
    if state.shape.rank == 1:
        state = state[:, None]
    if state.shape.rank != 2 or state.shape[-1] is None:
        raise ValueError(f"dataset {dataset_cfg.name!r}: proprio 'observation/{key}' must be float [T, D] with a "
                         f"known D, got {obs[key].dtype} {obs[key].shape}")
    idx = dataset_cfg.proprio_indices
    if idx is None:
        return state
    d = int(state.shape[-1])
    bad = [i for i in idx if not -d <= i < d]
    if bad:
        raise ValueError(f"dataset {dataset_cfg.name!r}: proprio_indices {list(idx)} hold {bad}, outside the "
                         f"{d} dims of 'observation/{key}'")
    return tf.gather(state, [i % d for i in idx], axis=1)


def is_usable(traj: Mapping) -> tf.Tensor:
    """True if the trajectory has steps and every action value is finite."""
    a = traj["action"]
    return tf.logical_and(tf.shape(a)[0] > 0, tf.reduce_all(tf.math.is_finite(a)))


def is_labeled(traj: Mapping) -> tf.Tensor:
    """True if some step has a non-empty instruction (OpenVLA's skip_unlabeled)."""
    return tf.reduce_any(tf.strings.length(traj["language_instruction"]) > 0)


def _check_chunk(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or int(k) < 1:
        raise ValueError(f"action chunk length must be an integer >= 1, got {k!r}")
    return int(k)


def has_full_chunk(traj: Mapping, k: int) -> tf.Tensor:
    """True if the trajectory holds at least one full chunk of `k` actions (T >= k)."""
    return tf.shape(traj["action"])[0] >= _check_chunk(k)


def chunk_actions(traj: Mapping, k: int) -> dict:
    """Trajectory [T, ...] -> trajectory of T - k + 1 frames whose 'action' is [T - k + 1, k, A]:
    frame t carries its own action and the next k - 1, actions[t : t + k] (so chunk row 0 is the
    current action a_t), and every other key is cut to its first T - k + 1 steps.

    This is OpenVLA-OFT's chunking (OFT_REFERENCE.md §5: window_size 1, future_action_window_size
    k - 1, `effective_traj_len = T - (k - 1)`): a chunk starts only where a full chunk exists
    (t <= T - k), nothing is padded at the end of the episode, and the last k - 1 observations of
    an episode start no chunk. Needs T >= k (filter with `has_full_chunk` first: upstream drops
    shorter trajectories silently, the pipeline counts them).
    """
    k = _check_chunk(k)
    action = traj["action"]
    n = tf.shape(action)[0] - k + 1
    idx = tf.range(n)[:, None] + tf.range(k)[None, :]  # [n, k]: row t is t, t+1, ..., t+k-1
    out = {key: v[:n] for key, v in traj.items() if key != "action"}
    chunks = tf.gather(action, idx)
    chunks.set_shape([None, k, action.shape[-1]])
    out["action"] = chunks
    return out


# ----------------------------------------------------------------------------------------------
# Images.

def decode_image(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (scalar tf.string) -> uint8 [H, W, 3]; an empty string (a padding
    camera) becomes zeros [size, size, 3]."""
    def dec():
        img = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
        return img

    def pad():
        return tf.zeros([size, size, 3], tf.uint8)

    img = tf.cond(tf.strings.length(encoded) > 0, dec, pad)
    img.set_shape([None, None, 3])
    return img


def resize_image(image, size: int | Sequence[int]):
    """uint8 [..., H, W, 3] -> uint8 [..., size, size, 3]: lanczos3 with antialiasing, rounded and
    clipped (a squash: the aspect ratio is not kept). Returns a tf.Tensor; `np.asarray` it for numpy."""
    hw = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    x = tf.image.resize(tf.convert_to_tensor(image), hw, method="lanczos3", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)


def _crop_resize(image_f: tf.Tensor, top: tf.Tensor, left: tf.Tensor, height: tf.Tensor, width: tf.Tensor):
    """float [H, W, 3]; box in relative coords -> bilinear crop resized back to [H, W, 3]."""
    box = tf.stack([top, left, top + height, left + width])[None]
    hw = tf.shape(image_f)[:2]
    return tf.image.crop_and_resize(image_f[None], box, tf.zeros([1], tf.int32), hw)[0]


def center_crop(image, area: float = TEST_TIME_CROP_AREA):
    """Centered crop covering `area` of the image (side sqrt(area)), bilinearly resized back to the
    input size. uint8 [H, W, 3] or [B, H, W, 3] -> same shape uint8. This is OpenVLA's test-time
    crop for checkpoints trained with image augmentation."""
    x = tf.convert_to_tensor(image)
    batched = x.shape.rank == 4
    if not batched:
        x = x[None]
    f = tf.image.convert_image_dtype(x, tf.float32)
    side = tf.clip_by_value(tf.sqrt(tf.constant(area, tf.float32)), 0.0, 1.0)
    off = (1.0 - side) / 2.0
    n = tf.shape(f)[0]
    boxes = tf.tile(tf.stack([off, off, off + side, off + side])[None], [n, 1])
    out = tf.image.crop_and_resize(f, boxes, tf.range(n), tf.shape(f)[1:3])
    out = tf.image.convert_image_dtype(tf.clip_by_value(out, 0.0, 1.0), tf.uint8, saturate=True)
    return out if batched else out[0]


def random_resized_crop(image_f: tf.Tensor, seed: tf.Tensor, scale=(0.9, 0.9), ratio=(1.0, 1.0)) -> tf.Tensor:
    """Crop of random area fraction `scale` and aspect `ratio` at a random position, resized back.

    Scale, ratio, vertical and horizontal offsets each get their own random draw (dlimp reuses one
    draw for all four, which ties the offsets together along the diagonal)."""
    s = tf.random.experimental.stateless_split(seed, num=4)
    area = tf.random.stateless_uniform([], s[0], scale[0], scale[1]) if scale[0] != scale[1] else tf.constant(scale[0], tf.float32)
    log_r = (tf.random.stateless_uniform([], s[1], np.log(ratio[0]), np.log(ratio[1]))
             if ratio[0] != ratio[1] else tf.constant(np.log(ratio[0]), tf.float32))
    r = tf.exp(log_r)
    height = tf.clip_by_value(tf.sqrt(area / r), 0.0, 1.0)
    width = tf.clip_by_value(tf.sqrt(area * r), 0.0, 1.0)
    top = tf.random.stateless_uniform([], s[2], 0.0, 1.0) * (1.0 - height)
    left = tf.random.stateless_uniform([], s[3], 0.0, 1.0) * (1.0 - width)
    return _crop_resize(image_f, top, left, height, width)


def augment_image(image: tf.Tensor, seed: tf.Tensor, params: Optional[Mapping] = None,
                  order: Sequence[str] = AUGMENT_ORDER) -> tf.Tensor:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]; `seed` int32/int64 [2] (stateless: same seed, same result).

    Ops run in `order` on a float image in [0, 1], each with its own seed and followed by a clip.
    Ops missing from `params` are skipped."""
    params = OPENVLA_AUGMENT if params is None else params
    x = tf.image.convert_image_dtype(image, tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=len(order))
    for i, op in enumerate(order):
        if op not in params:
            continue
        p, sd = params[op], seeds[i]
        if op == "random_resized_crop":
            x = random_resized_crop(x, sd, **p)
        elif op == "random_brightness":
            x = tf.image.stateless_random_brightness(x, p[0], sd)
        elif op == "random_contrast":
            x = tf.image.stateless_random_contrast(x, p[0], p[1], sd)
        elif op == "random_saturation":
            x = tf.image.stateless_random_saturation(x, p[0], p[1], sd)
        elif op == "random_hue":
            x = tf.image.stateless_random_hue(x, p[0], sd)
        else:
            raise ValueError(f"unknown augmentation op {op!r}; known: {AUGMENT_ORDER}")
        x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)


def frame_seed(base_seed: int, process_index: int, frame_index: tf.Tensor) -> tf.Tensor:
    """Per-frame stateless seed [2]: a function of (seed, process, position in the stream), so a
    restored stream augments the same frames the same way."""
    base = tf.constant([base_seed, process_index], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(frame_index, tf.int64))


def check_augment_ops(ops: Sequence[str]) -> Tuple[str, ...]:
    """-> ops as a tuple; ValueError naming an op that is not one of OpenVLA's (AUGMENT_ORDER)."""
    ops = tuple(ops)
    unknown = [op for op in ops if op not in AUGMENT_ORDER]
    if unknown:
        raise ValueError(f"image augmentation ops {list(ops)}: unknown {unknown}; choose from {list(AUGMENT_ORDER)}")
    if not ops:
        raise ValueError(f"image augmentation ops are empty (set image_aug=False instead); "
                         f"choose from {list(AUGMENT_ORDER)}")
    return ops


def decode_resize_augment(frame: Mapping, size: int, augment: bool, base_seed: int, process_index: int,
                          frame_index: tf.Tensor, ops: Sequence[str] = AUGMENT_ORDER) -> dict:
    """Frame with encoded 'image' -> frame with uint8 'image' [size, size, 3]; with several
    cameras (encoded [N]) -> uint8 [N, size, size, 3], each camera decoded and resized alike.

    ops: the subset of OpenVLA's augmentation to apply (always in OpenVLA's order, each op with the
    seed it has in the full recipe). Camera i is augmented with the frame's seed + i (as upstream:
    the cameras get different crops and colour jitter; camera 0 gets exactly the one-camera draw)."""
    params = {op: OPENVLA_AUGMENT[op] for op in check_augment_ops(ops)} if augment else None
    seed = frame_seed(base_seed, process_index, frame_index) if augment else None

    def one(encoded, i):
        img = resize_image(decode_image(encoded, size), size)
        if augment:
            img = augment_image(img, seed + i, params)
        img.set_shape([size, size, 3])
        return img

    encoded = frame["image"]
    if encoded.shape.rank == 0:
        return {**frame, "image": one(encoded, 0)}
    n = int(encoded.shape[0])
    return {**frame, "image": tf.stack([one(encoded[i], i) for i in range(n)])}
