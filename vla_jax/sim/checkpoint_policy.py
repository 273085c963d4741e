"""A loaded `vla_jax.policy.Policy` as a closed-loop policy: what it sees is decided by its checkpoint.

`SimPolicy(policy)` reads the checkpoint's contract (`BatchSpec.cameras`, `proprio_dim`):
  one camera                -> called with the rendered images, as before
  two cameras               -> also the simulator's second camera ('wrist_image'), given to the
                               checkpoint's second camera (training paired the demo data's image_keys
                               ('image', 'wrist_image') with the cameras by position)
  proprio_dim = 4           -> also 'state' [hand x, y, z, gripper opening] (vla_jax.sim.observation,
                               the definition the demo dataset is written with); the policy normalizes
                               it with the checkpoint's statistics
`wrist_camera` is the Meta-World camera the workers must render for it ('' for one camera): the one
the training data was made with when the checkpoint records a demo dataset (its generation.json),
else the demo's default (`vla_jax.sim.observation.WRIST_CAMERA`). Anything else (three cameras, another
proprio size) is refused with the reason.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from vla_jax.sim.observation import PRIMARY_KEY, PROPRIO_DIM, PROPRIO_KEY, WRIST_CAMERA, WRIST_KEY


def recorded_wrist_camera(data_dir: Optional[str]) -> Optional[str]:
    """The second camera of a demo dataset folder (its generation.json's spec.wrist_camera), or None
    when the folder is unknown or not a demo dataset."""
    path = os.path.join(data_dir, "generation.json") if data_dir else None
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        spec = json.load(f).get("spec") or {}
    return spec.get("wrist_camera") or None


class SimPolicy:
    """Closed-loop callable around a Policy: `(observation, instructions) -> float64 actions [B, 7]` (or chunks
    [B, K, 7]); `observation` attribute and `wrist_camera` from the checkpoint (module docstring)."""

    def __init__(self, policy, unnorm_key: Optional[str] = None, data_dir: Optional[str] = None):
        cams, p_dim = tuple(policy.cameras), policy.spec.proprio_dim
        if len(cams) > 2:
            raise ValueError(f"the checkpoint takes {len(cams)} cameras {list(cams)}; the Meta-World evaluation "
                             f"renders at most two (the primary and {WRIST_KEY!r})")
        if p_dim and p_dim != PROPRIO_DIM:
            raise ValueError(f"the checkpoint takes a {p_dim}-D proprio state; Meta-World's is {PROPRIO_DIM}-D "
                             f"[hand x, y, z, gripper opening] (vla_jax.sim.observation)")
        self.policy, self.unnorm_key = policy, unnorm_key
        self.name = "model"
        self.observation = (PRIMARY_KEY,) + ((WRIST_KEY,) if len(cams) == 2 else ()) + ((PROPRIO_KEY,) if p_dim else ())
        self.wrist_camera = (recorded_wrist_camera(data_dir) or WRIST_CAMERA) if len(cams) == 2 else ""

    def inputs(self, obs) -> Any:
        """The closed loop's batch (images [B, S, S, 3], or a dict of the keys in `observation`) -> the
        policy's: bare images, or {camera name: images, 'state': raw state} by the checkpoint's names."""
        if not isinstance(obs, Mapping):
            return obs
        out = {cam: obs[key] for cam, key in zip(self.policy.cameras, (PRIMARY_KEY, WRIST_KEY))}
        if PROPRIO_KEY in self.observation:
            out["state"] = obs[PROPRIO_KEY]
        return out

    def __call__(self, obs, instructions):
        return self.policy.predict(self.inputs(obs), instructions, self.unnorm_key).actions
