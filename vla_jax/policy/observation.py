"""The policy's observation: camera images by name and the raw proprio state -> checked model inputs.

A checkpoint's contract (`BatchSpec.cameras`, `BatchSpec.proprio_dim`) says what one observation holds:
one uint8 RGB image [H, W, 3] per camera (any size: the policy resizes like training did) and, with
proprio, the robot state [P] in the dataset's raw units. The keys an observation may use:

  a camera's own name          e.g. 'primary', 'wrist' (the spec's names, primary first)
  'image', 'full_image'        the primary camera (OpenVLA's payload field; OpenVLA-OFT's name)
  'wrist_image'                OpenVLA-OFT's name for the wrist camera: the one camera whose name
                               contains 'wrist', else the second camera of a two-camera spec
  'state', 'proprio'           the raw proprio vector (OpenVLA-OFT's name is 'state')

Every camera exactly once, the state exactly when the spec has proprio. Anything else is a ValueError
naming the key and what is expected (a wrist image sent to a one-camera model is refused, not ignored:
it would mean the client and the checkpoint disagree about the robot).

Proprio normalization (OFT_REFERENCE.md §7): the dataset's `proprio` statistics (q01/q99), every dim,
`clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)`. This is upstream's *inference-time* rule: unlike
training (`vla_jax.data.normalization.normalize_proprio`, which sets dims with min == max to 0), a
constant dim is not zeroed; it maps to -1 at x == q01 (clip of -1 + 0/1e-8) and to +1 above it. We follow
upstream so released OpenVLA-OFT checkpoints see what they saw under upstream's evaluation; the two
rules agree on every dim that varied in the training data.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

PRIMARY_ALIASES = ("image", "full_image")
WRIST_ALIAS = "wrist_image"
STATE_KEYS = ("state", "proprio")


def camera_keys(cameras: Sequence[str]) -> Dict[str, int]:
    """{observation key: camera index} of every name an observation may use for these cameras."""
    cameras = tuple(cameras)
    keys = {name: i for i, name in enumerate(cameras)}
    for alias in PRIMARY_ALIASES:
        keys.setdefault(alias, 0)
    wrist = [i for i, name in enumerate(cameras) if "wrist" in name]
    if len(wrist) == 1:
        keys.setdefault(WRIST_ALIAS, wrist[0])
    elif not wrist and len(cameras) == 2:
        keys.setdefault(WRIST_ALIAS, 1)
    return keys


def describe_keys(cameras: Sequence[str], proprio_dim: Optional[int]) -> str:
    """The accepted observation keys, for error messages."""
    by_cam: Dict[int, List[str]] = {}
    for key, i in camera_keys(cameras).items():
        by_cam.setdefault(i, []).append(key)
    parts = [f"camera {cameras[i]!r} as " + " / ".join(repr(k) for k in by_cam[i]) for i in range(len(cameras))]
    parts.append(f"the raw {proprio_dim}-D proprio state as 'state' / 'proprio'" if proprio_dim
                 else "no proprio state (proprio_dim=None)")
    return "; ".join(parts)


def _split_keys(obs: Mapping[str, Any], cameras: Sequence[str], proprio_dim: Optional[int],
                where: str) -> Tuple[List[str], Optional[str]]:
    """Observation keys -> (the key used for each camera, in camera order; the state key or None)."""
    keys = camera_keys(cameras)
    bad = [k for k in obs if not isinstance(k, str) or (k not in keys and k not in STATE_KEYS)]
    if bad:
        raise ValueError(f"{where}: unknown key(s) {bad}: not a camera of this checkpoint; it takes "
                         f"{describe_keys(cameras, proprio_dim)}")
    used: Dict[int, List[str]] = {}
    for k in obs:
        if k in keys:
            used.setdefault(keys[k], []).append(k)
    twice = {cameras[i]: ks for i, ks in used.items() if len(ks) > 1}
    if twice:
        raise ValueError(f"{where}: camera(s) given twice: " + ", ".join(f"{c!r} as {ks}" for c, ks in twice.items()))
    missing = [i for i in range(len(cameras)) if i not in used]
    if missing:
        names = [cameras[i] for i in missing]
        raise ValueError(f"{where}: missing camera(s) {names}; this checkpoint takes "
                         f"{describe_keys(cameras, proprio_dim)}")
    state = [k for k in STATE_KEYS if k in obs]
    if len(state) > 1:
        raise ValueError(f"{where}: the proprio state is given twice (as {state})")
    if state and not proprio_dim:
        raise ValueError(f"{where}: {state[0]!r} given, but this checkpoint takes no proprio state (its BatchSpec "
                         f"has proprio_dim=None); drop the field or use a checkpoint trained with proprio")
    if proprio_dim and not state:
        raise ValueError(f"{where}: missing 'state': this checkpoint takes a raw {proprio_dim}-D proprio state "
                         f"(key 'state' or 'proprio', in the dataset's units)")
    return [used[i][0] for i in range(len(cameras))], (state[0] if state else None)


def check_state(value: Any, proprio_dim: int, rows: Optional[int], where: str) -> np.ndarray:
    """A raw proprio vector [P] (rows None) or batch [rows, P] -> float64; ValueError naming the field,
    the expected length and what came."""
    try:
        x = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where} (the proprio state) must be numbers, got {type(value).__name__}") from None
    want = (proprio_dim,) if rows is None else (rows, proprio_dim)
    if x.shape != want:
        raise ValueError(f"{where} (the proprio state) must have shape {list(want)} ({proprio_dim} values = the "
                         f"checkpoint's proprio_dim" + ("" if rows is None else " per row") + f"), got {list(x.shape)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where} (the proprio state) holds non-finite values: {x.tolist()}")
    return x


def gather(observations, cameras: Sequence[str], proprio_dim: Optional[int]
           ) -> Tuple[List[List[Any]], Optional[np.ndarray]]:
    """Observations -> (per camera in spec order, the B images of that camera; raw state float64 [B, P] or None).

    observations: a sequence of B observation dicts (one per row: images [H, W, 3], state [P]), or one
    batched dict (each camera a uint8 [B, H, W, 3] array or a list of B images; state [B, P])."""
    cameras = tuple(cameras)
    if isinstance(observations, Mapping):
        cam_keys, state_key = _split_keys(observations, cameras, proprio_dim, "observation")
        per_cam = []
        for cam, key in zip(cameras, cam_keys):
            v = observations[key]
            if isinstance(v, np.ndarray) and v.ndim != 4:
                raise ValueError(f"observation[{key!r}] (camera {cam!r}): a batched observation takes images "
                                 f"[B, H, W, 3], got shape {list(v.shape)} (one observation: pass it in a list, "
                                 f"or call predict_action)")
            per_cam.append(list(v))
        b = len(per_cam[0])
        sizes = {cameras[i]: len(p) for i, p in enumerate(per_cam)}
        if b == 0 or len(set(sizes.values())) != 1:
            raise ValueError(f"observation: every camera needs the same number of images (>= 1), got {sizes}")
        state = None if state_key is None else check_state(observations[state_key], proprio_dim, b,
                                                            f"observation[{state_key!r}]")
        return per_cam, state
    rows = list(observations)
    if not rows:
        raise ValueError("no observations given")
    per_cam: List[List[Any]] = [[] for _ in cameras]
    states = []
    for r, obs in enumerate(rows):
        images, state = single(obs, cameras, proprio_dim, f"observation {r}")
        for i, im in enumerate(images):
            per_cam[i].append(im)
        if state is not None:
            states.append(state)
    return per_cam, (np.stack(states) if states else None)


def single(obs: Mapping[str, Any], cameras: Sequence[str], proprio_dim: Optional[int], where: str = "observation"
           ) -> Tuple[List[Any], Optional[np.ndarray]]:
    """One observation dict -> (its image per camera in spec order, raw state float64 [P] or None)."""
    if not isinstance(obs, Mapping):
        raise ValueError(f"{where}: expected a dict of camera images (and 'state'), got {type(obs).__name__}")
    cam_keys, state_key = _split_keys(obs, cameras, proprio_dim, where)
    state = None if state_key is None else check_state(obs[state_key], proprio_dim, None, f"{where}[{state_key!r}]")
    return [obs[k] for k in cam_keys], state


def normalize_state(state: np.ndarray, entry: Mapping[str, Any], where: str) -> np.ndarray:
    """Raw proprio [..., P] -> float32 [..., P] with the statistics entry's `proprio` q01/q99 and upstream's
    inference-time rule (module docstring): no zeroing of constant dims."""
    from vla_jax.data.normalization import normalize_proprio

    p = entry.get("proprio") if isinstance(entry, Mapping) else None
    if not isinstance(p, Mapping) or "q01" not in p or "q99" not in p:
        raise ValueError(f"{where} have no 'proprio' q01/q99, so the state cannot be normalized (dataset_statistics "
                         f"entry keys: {sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__})")
    dim = np.shape(state)[-1]
    if len(p["q01"]) != dim or len(p["q99"]) != dim:
        raise ValueError(f"{where}: the proprio statistics have {len(p['q01'])} dims but the checkpoint's "
                         f"proprio_dim is {dim}")
    return normalize_proprio(state, entry, zero_constant_dims=False)


def is_observation(inputs) -> bool:
    """Whether `Policy.predict`'s first argument holds observation dicts (else: images of a one-camera model)."""
    if isinstance(inputs, Mapping):
        return True
    return isinstance(inputs, (list, tuple)) and len(inputs) > 0 and isinstance(inputs[0], Mapping)


def rows(inputs, instructions, cameras: Sequence[str], proprio_dim: Optional[int]
         ) -> Tuple[List[List[Any]], Optional[np.ndarray], List[Any]]:
    """`Policy.predict`'s inputs -> (per camera, its B images; raw state float64 [B, P] or None; B instructions).

    inputs: observation dicts (see `gather`), or for a one-camera model without proprio also plain images:
    a list of B images, uint8 [B, H, W, 3], or one [H, W, 3]. instructions: B strings or one for all."""
    label = "observations"
    if is_observation(inputs):
        per_cam, state = gather(inputs, cameras, proprio_dim)
    else:
        label = "images"
        if len(cameras) != 1 or proprio_dim:
            raise ValueError(f"this checkpoint takes an observation dict per row ({describe_keys(cameras, proprio_dim)}), "
                             f"not bare images")
        images = list(inputs) if not isinstance(inputs, np.ndarray) or inputs.ndim == 4 else [inputs]
        per_cam, state = [images], None
    b = len(per_cam[0])
    if isinstance(instructions, (str, bytes)):
        instructions = [instructions] * b
    instructions = list(instructions)
    if len(instructions) != b:
        raise ValueError(f"{b} {label} but {len(instructions)} instructions")
    if not b:
        raise ValueError("no images given")
    return per_cam, state, instructions
