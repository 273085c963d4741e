"""Meta-World as an OpenVLA environment: task by name, camera images, 7-D actions, scripted experts.

Configurations: `MT1(task, seed=s)` draws 50 object/goal configurations per seed. Seed 0 holds the
training configurations and seed 1 the held-out ones (the two sets are disjoint); more than 50
training episodes per task take seeds 2, 3, ... (never 1). `config_ref(split, i)` names them.

Actions: Meta-World takes `[dx, dy, dz, grip]` in [-1, 1] with grip +1 = close. OpenVLA's layout
is `[dx, dy, dz, droll, dpitch, dyaw, gripper]` with gripper 1 = open, 0 = closed; the mapping is
gripper = (1 - grip) / 2 (continuous, so the experts' partial grip efforts survive the round trip),
and the rotation dims are 0 (Meta-World's end effector does not rotate; they are ignored when acting).

Episodes never end on success in Meta-World; here an episode is done at its first success or after
`max_steps` steps (Meta-World raises past 500).

This module imports MuJoCo: use it inside a simulator worker process (see rendering.py for why).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np

from vla_jax.sim.instructions import instruction_for, resolve_task
from vla_jax.sim.rendering import SceneRenderer, import_mujoco

CONFIGS_PER_SEED = 50
HELDOUT_SEED = 1
MAX_PATH_LENGTH = 500  # Meta-World raises when stepped past this
SPLITS = ("train", "heldout")
STATE_DIM = 39  # Meta-World observation: hand xyz, gripper opening, 2 objects (pos + quat), previous frame, goal


def config_ref(split: str, index: int) -> Tuple[int, int]:
    """(MT1 seed, configuration index) of the `index`-th configuration of `split`.

    'train': seed 0 for indices 0-49, then seeds 2, 3, ... (seed 1 is held out);
    'heldout': seed 1, indices 0-49 only.
    """
    index = int(index)
    if index < 0:
        raise ValueError(f"configuration index must be >= 0, got {index}")
    if split == "heldout":
        if index >= CONFIGS_PER_SEED:
            raise ValueError(f"held-out configuration index {index} out of range: Meta-World has "
                             f"{CONFIGS_PER_SEED} held-out configurations per task (MT1 seed {HELDOUT_SEED})")
        return HELDOUT_SEED, index
    if split == "train":
        block, i = divmod(index, CONFIGS_PER_SEED)
        return (0 if block == 0 else block + 1), i
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def metaworld_to_openvla(action4) -> np.ndarray:
    """[..., 4] Meta-World action -> [..., 7] float32 `[dx, dy, dz, 0, 0, 0, gripper]` (clipped to the
    action space first; gripper = (1 - grip) / 2, 1 = open)."""
    a = np.clip(np.asarray(action4, np.float64), -1.0, 1.0)
    if a.shape[-1:] != (4,):
        raise ValueError(f"Meta-World action must have shape [..., 4], got {a.shape}")
    out = np.zeros(a.shape[:-1] + (7,), np.float32)
    out[..., :3] = a[..., :3]
    out[..., 6] = (1.0 - a[..., 3]) / 2.0
    return out


def openvla_to_metaworld(action7) -> np.ndarray:
    """[..., 7] OpenVLA action -> [..., 4] float32 Meta-World action `[dx, dy, dz, 1 - 2 * gripper]`,
    clipped to [-1, 1]; the rotation dims are dropped."""
    a = np.asarray(action7, np.float64)
    if a.shape[-1:] != (7,):
        raise ValueError(f"action must have shape [..., 7] (OpenVLA layout), got {a.shape}")
    out = np.empty(a.shape[:-1] + (4,), np.float32)
    out[..., :3] = np.clip(a[..., :3], -1.0, 1.0)
    out[..., 3] = np.clip(1.0 - 2.0 * a[..., 6], -1.0, 1.0)
    return out


@functools.lru_cache(maxsize=None)
def _benchmark(task: str, seed: int):
    import metaworld

    return metaworld.MT1(task, seed=seed)  # ~1 s: it resets an env 50 times


def configuration(task: str, split: str, index: int):
    """The metaworld Task (configuration) `index` of `split` for `task`."""
    seed, i = config_ref(split, index)
    return _benchmark(resolve_task(task), seed).train_tasks[i]


def expert_policy(task: str):
    """Meta-World's scripted expert for `task`: `.get_action(raw_obs float64 [39]) -> [4]`."""
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[resolve_task(task)]()


class MetaWorldEnv:
    """One Meta-World task with camera images and OpenVLA actions.

    task: 'drawer-open' or 'drawer-open-v3'. image_size: side of the square images.
    camera: Meta-World camera ('corner' is mounted upside down; its images are turned 180 degrees).
    max_steps: episode limit (<= 500). goal_marker_scale: enlarges the goal site (visual only).
    render: False skips rendering (observations then carry no image).
    renderer: a SceneRenderer to share between environments of the same task (else one is made).
    wrist_camera: a second camera (e.g. 'gripperPOV'), rendered at the same size; '' (default): none.
    wrist_renderer: a shared SceneRenderer for it (else one is made when wrist_camera is set).

    Observations are dicts: 'image' uint8 [S, S, 3] (None when not rendered), 'state' float64 [39]
    (Meta-World's observation), 'success' bool, 'done' bool, 't' int (steps taken); with a second
    camera also 'wrist_image' uint8 [S, S, 3] (None when not rendered). The policy's view of it
    (image keys and the 4-D proprio state): vla_jax.sim.observation.policy_observation.
    """

    def __init__(self, task: str, *, image_size: int = 128, camera: str = "corner", max_steps: int = 200,
                 goal_marker_scale: float = 2.5, render: bool = True, renderer: Optional[SceneRenderer] = None,
                 wrist_camera: str = "", wrist_renderer: Optional[SceneRenderer] = None):
        self.task = resolve_task(task)
        self.instruction = instruction_for(self.task)
        if not 0 < int(max_steps) <= MAX_PATH_LENGTH:
            raise ValueError(f"max_steps must be in [1, {MAX_PATH_LENGTH}] (Meta-World's limit), got {max_steps}")
        self.max_steps = int(max_steps)
        import_mujoco()  # MUJOCO_GL before metaworld imports mujoco
        self._env = _benchmark(self.task, 0).train_classes[self.task]()
        self._owns_renderer = render and renderer is None
        if render and renderer is None:
            renderer = SceneRenderer(self._env.model, image_size, camera, site_scale={"goal": goal_marker_scale})
        self.renderer = renderer if render else None
        self.wrist_camera = str(wrist_camera or "")
        self._owns_wrist = render and bool(self.wrist_camera) and wrist_renderer is None
        if self._owns_wrist:
            wrist_renderer = SceneRenderer(self._env.model, image_size, self.wrist_camera,
                                           site_scale={"goal": goal_marker_scale})
        self.wrist_renderer = wrist_renderer if render and self.wrist_camera else None
        self._expert = None
        self._obs: Optional[np.ndarray] = None
        self.t, self.success = 0, False

    def attach_renderer(self, renderer: SceneRenderer, wrist_renderer: Optional[SceneRenderer] = None) -> None:
        """Render with `renderer` (and the second camera with `wrist_renderer`, if given), made for this
        task's model and shared; their owner closes them."""
        if self._owns_renderer and self.renderer is not None:
            self.renderer.close()
        self.renderer, self._owns_renderer = renderer, False
        if wrist_renderer is not None:
            if self._owns_wrist and self.wrist_renderer is not None:
                self.wrist_renderer.close()
            self.wrist_renderer, self._owns_wrist = wrist_renderer, False
            self.wrist_camera = wrist_renderer.camera

    # The underlying gymnasium env (model, data, ...), for advanced use.
    @property
    def unwrapped(self):
        return self._env

    def reset(self, split: str = "heldout", index: int = 0, render: bool = True) -> Dict[str, Any]:
        """Start an episode in configuration `index` of `split` ('train' or 'heldout')."""
        self._env.set_task(configuration(self.task, split, index))
        obs, _ = self._env.reset()
        self._obs, self.t, self.success = np.asarray(obs, np.float64), 0, False
        return self._observation(render)

    def step(self, action7, render: bool = True) -> Dict[str, Any]:
        """Apply one OpenVLA action [7] (see the module docstring); returns the next observation."""
        if self._obs is None:
            raise ValueError("call reset() before step()")
        if self.done:
            raise ValueError(f"the episode is over (success={self.success}, t={self.t}); call reset()")
        action = openvla_to_metaworld(np.asarray(action7, np.float64).reshape(7))
        obs, _, _, _, info = self._env.step(action)
        self._obs, self.t = np.asarray(obs, np.float64), self.t + 1
        self.success = self.success or bool(info["success"])
        return self._observation(render)

    @property
    def done(self) -> bool:
        return self.success or self.t >= self.max_steps

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state, as an OpenVLA action float32 [7]."""
        if self._expert is None:
            self._expert = expert_policy(self.task)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high": the env clips anyway
            return metaworld_to_openvla(self._expert.get_action(self._obs))

    def render(self) -> np.ndarray:
        """uint8 [S, S, 3] image of the current state."""
        if self.renderer is None:
            raise ValueError("this environment was made with render=False")
        return self.renderer.render(self._env.data)

    def render_wrist(self) -> np.ndarray:
        """uint8 [S, S, 3] image of the current state from the second camera."""
        if self.wrist_renderer is None:
            raise ValueError("this environment has no second camera (wrist_camera='') or was made with render=False")
        return self.wrist_renderer.render(self._env.data)

    def _observation(self, render: bool) -> Dict[str, Any]:
        image = self.render() if render and self.renderer is not None else None
        obs = {"image": image, "state": self._obs.copy(), "success": self.success, "done": self.done, "t": self.t}
        if self.wrist_camera:
            obs["wrist_image"] = self.render_wrist() if render and self.wrist_renderer is not None else None
        return obs

    def close(self) -> None:
        if self._owns_renderer and self.renderer is not None:
            self.renderer.close()
        if self._owns_wrist and self.wrist_renderer is not None:
            self.wrist_renderer.close()
        self.renderer = self.wrist_renderer = None
        self._env.close()


def expert_episode(env: MetaWorldEnv, split: str, index: int, render: bool = True) -> Dict[str, Any]:
    """Roll out the scripted expert in one configuration until success or `env.max_steps`.

    Returns 'images' uint8 [T, S, S, 3] and 'final_image' [S, S, 3] (the state after the last
    action; both absent without rendering), 'wrist_images' uint8 [T, S, S, 3] (with a second camera), 'states' float32 [T, 39] and 'actions' float32 [T, 7]
    (observation and action of each step, the action taken from that observation), 'success' bool,
    'length' T, 'task', 'instruction', 'split', 'index'.
    """
    obs = env.reset(split, index, render=render)
    images, wrist_images, states, actions = [], [], [], []
    while not obs["done"]:
        action = env.expert_action()
        images.append(obs["image"])
        wrist_images.append(obs.get("wrist_image"))
        states.append(obs["state"].astype(np.float32))
        actions.append(action)
        obs = env.step(action, render=render)
    out = {"states": np.stack(states), "actions": np.stack(actions), "success": bool(obs["success"]),
           "length": len(actions), "task": env.task, "instruction": env.instruction, "split": split,
           "index": int(index)}
    if render:
        out["images"], out["final_image"] = np.stack(images), obs["image"]
        if env.wrist_renderer is not None:
            out["wrist_images"] = np.stack(wrist_images)
    return out
