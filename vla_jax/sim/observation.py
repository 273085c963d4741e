"""What a policy sees of a Meta-World step: camera images and the proprio state, by RLDS key.

The demo dataset and closed-loop simulation use the same keys, so a policy trained on the demo data
gets the observation it was trained on:
  'image'        uint8 [S, S, 3]  primary camera (always)
  'wrist_image'  uint8 [S, S, 3]  second camera (when one is configured; `WRIST_CAMERA` by default)
  'state'        float32 [4]      proprio: hand position xyz (metres) and gripper opening in [0, 1]
                                  (when proprio is on)

Proprio comes from Meta-World's observation vector (metaworld 3.x `_get_curr_obs_combined_no_goal`):
obs[0:3] is the position of the 'hand' body, obs[3] the distance between the two finger bodies
divided by 0.1 and clipped to [0, 1] (1 = fully open). No MuJoCo import here: TensorFlow-side code
(the writer, the policy) uses it too.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np

PRIMARY_KEY = "image"
WRIST_KEY = "wrist_image"
PROPRIO_KEY = "state"
PROPRIO_DIM = 4
OBS_DIM = 39  # Meta-World's observation length
# The second camera chosen for the demo: Meta-World's camera on the gripper (its fingertips and the
# object in front of them fill the view at 64 px; see README, "Several cameras").
WRIST_CAMERA = "gripperPOV"


def proprio_from_obs(obs) -> np.ndarray:
    """Meta-World observation [..., 39] -> float32 [..., 4] `[hand x, hand y, hand z, gripper opening]`."""
    obs = np.asarray(obs)
    if obs.shape[-1:] != (OBS_DIM,):
        raise ValueError(f"Meta-World observation must have shape [..., {OBS_DIM}], got {obs.shape}")
    return obs[..., :PROPRIO_DIM].astype(np.float32)


def camera_keys(wrist_camera: str = "") -> Tuple[str, ...]:
    """The image keys (primary first) for a run with or without a second camera."""
    return (PRIMARY_KEY, WRIST_KEY) if wrist_camera else (PRIMARY_KEY,)


def policy_observation(env_obs: Mapping[str, Any], *, wrist: bool, proprio: bool) -> Dict[str, np.ndarray]:
    """An environment observation (MetaWorldEnv / worker dict) -> the policy's observation dict:
    'image', plus 'wrist_image' when `wrist`, plus 'state' [4] when `proprio` (keys as above).
    A missing camera image is an error naming the key (the env must render it)."""
    keys = camera_keys("on" if wrist else "")
    out = {}
    for k in keys:
        if env_obs.get(k) is None:
            raise ValueError(f"observation has no {k!r} image: the environment must render it "
                             f"(a second camera needs SimWorkers(wrist_camera=...))" if k == WRIST_KEY else
                             f"observation has no {k!r} image (render=False?)")
        out[k] = env_obs[k]
    if proprio:
        out[PROPRIO_KEY] = proprio_from_obs(env_obs["state"])
    return out
