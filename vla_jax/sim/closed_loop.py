"""Closed-loop evaluation in Meta-World: success rate and episode length on held-out configurations.

The policy is any callable

    policy(images: uint8 [B, S, S, 3], instructions: list[str] of length B) -> actions [B, 7]

returning OpenVLA-layout actions in the dataset's units (un-normalized): `[dx, dy, dz, *, *, *, gripper]`
with dx, dy, dz in [-1, 1] and gripper 1 = open, 0 = closed (the rotation dims are ignored). S is the
rendered image side; give the same size the demo dataset stores, and let the policy resize the
images exactly as the training pipeline did. B is fixed for a whole evaluation (`batch_size`):
slots whose episode is over are padded with stale images and their actions ignored, so a jitted
policy compiles once.

Action chunks (OpenVLA-OFT): a policy may return [B, K, 7] instead; each slot then executes the first
`execute` actions of its chunk open-loop (default all K, as OFT's LIBERO evaluation does with its
`num_open_loop_steps` = K) and asks for a new chunk only when they are used up. The policy still runs
on the whole fixed batch (its other slots' chunks are ignored), so it compiles once. Upstream's LIBERO
script, when told to execute n < K actions, would execute the *last* n of the chunk; we execute the
first n (the actions meant for now and the next steps), on purpose.

Several cameras and proprio: a policy with the attribute `observation = ("image", "wrist_image", "state")`
(any of them; default ("image",)) is called as `policy(obs, instructions)` with a dict of batched arrays:
'image' uint8 [B, S, S, 3], 'wrist_image' uint8 [B, S, S, 3] (the simulator's second camera: the
workers need `wrist_camera`), 'state' float32 [B, 4] (`vla_jax.sim.observation`: the same keys and
proprio definition the demo dataset is written with). `SimPolicy` wraps a `vla_jax.policy.Policy` so,
from its checkpoint's spec.

Optional policy attributes: `needs_images = False` (nothing is rendered for it, zeros are passed),
`sim_expert = True` (the actions come from Meta-World's scripted experts inside the simulator
workers: `ExpertPolicy`).

`run_evaluation` evaluates a policy beside two reference lines (the scripted expert and a random
policy) on the same configurations, writes `report.json` and a few GIF rollouts, and returns the report.
Episodes end at the first success or after `max_steps` steps.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vla_jax import permissions
from vla_jax.sim.instructions import instruction_for, resolve_task
from vla_jax.sim.metaworld_env import CONFIGS_PER_SEED as HELDOUT_CONFIGS
from vla_jax.sim.observation import PRIMARY_KEY, PROPRIO_DIM, PROPRIO_KEY, WRIST_KEY, policy_observation
from vla_jax.sim.video import write_gif
from vla_jax.sim.worker import SimWorkers


class ExpertPolicy:
    """Reference line: Meta-World's scripted experts (they read the simulator state, not images)."""

    name = "expert"
    sim_expert = True
    needs_images = False

    def __call__(self, images, instructions):
        raise ValueError("ExpertPolicy acts inside the simulator workers; evaluate it with closed_loop.evaluate")


class RandomPolicy:
    """Reference line: xyz uniform in [-1, 1], gripper uniform in [0, 1], rotation 0 (seeded)."""

    name = "random"
    needs_images = False

    def __init__(self, seed: int = 0):
        self._rng = np.random.default_rng(seed)

    def __call__(self, images, instructions) -> np.ndarray:
        b = len(instructions)
        out = np.zeros((b, 7), np.float32)
        out[:, :3] = self._rng.uniform(-1.0, 1.0, (b, 3))
        out[:, 6] = self._rng.uniform(0.0, 1.0, b)
        return out


def _policy_actions(policy, images: np.ndarray, instructions: List[str], name: str) -> np.ndarray:
    """-> float32 [B, K, 7] (K = 1 for a policy returning [B, 7])."""
    actions = np.asarray(policy(images, instructions), np.float32)
    b, shape = len(instructions), actions.shape
    if actions.ndim == 2:
        actions = actions[:, None]
    if actions.ndim != 3 or actions.shape[0] != b or actions.shape[2] != 7 or actions.shape[1] < 1:
        raise ValueError(f"policy {name!r} returned actions of shape {shape}, expected [{b}, 7] "
                         f"or chunks [{b}, K, 7] (OpenVLA layout [dx, dy, dz, droll, dpitch, dyaw, gripper])")
    if not np.all(np.isfinite(actions)):
        raise ValueError(f"policy {name!r} returned non-finite actions: {actions[~np.isfinite(actions).all(-1)]}")
    return actions


def _observation_keys(policy, name: str, sim) -> Tuple[bool, bool]:
    """(wrist camera, proprio) from the policy's `observation` attribute; ValueError naming what is wrong."""
    keys = tuple(getattr(policy, "observation", (PRIMARY_KEY,)))
    allowed = (PRIMARY_KEY, WRIST_KEY, PROPRIO_KEY)
    bad = [k for k in keys if k not in allowed]
    if bad or PRIMARY_KEY not in keys:
        raise ValueError(f"policy {name!r} asks for observation keys {list(keys)}; Meta-World gives {list(allowed)} "
                         f"and every policy takes {PRIMARY_KEY!r}")
    wrist = WRIST_KEY in keys
    if wrist and not sim.settings.get("wrist_camera"):
        raise ValueError(f"policy {name!r} takes {WRIST_KEY!r} but the simulator workers render no second camera: "
                         f"start them with SimWorkers(wrist_camera=...) (run_evaluation(wrist_camera=...))")
    return wrist, PROPRIO_KEY in keys


def _gif_path(video_dir: str, name: str, task: str, index: int, success: bool) -> str:
    return os.path.join(video_dir, name, f"{task}_{index:02d}_{'success' if success else 'failure'}.gif")


def _expert_episodes(sim: SimWorkers, tasks: Sequence[str], first: int, n: int, videos_per_task: int,
                     video_dir: Optional[str], name: str, results: dict, videos: List[str]) -> int:
    """The scripted experts run whole episodes inside the workers (no per-step round trips; each
    task stays on one worker). Fills results[task][index] = (success, length); returns env steps."""
    jobs, affinity = [], []
    v = min(int(videos_per_task), n)
    for k, task in enumerate(tasks):
        if v:
            jobs.append(dict(task=task, split="heldout", indices=list(range(first, first + v)), encode=None,
                             render=True))
        if v < n:
            jobs.append(dict(task=task, split="heldout", indices=list(range(first + v, first + n)), render=False))
        affinity += [k] * (len(jobs) - len(affinity))
    steps = 0
    for episodes in sim.map("expert_rollouts", jobs, affinity=affinity):
        for ep in episodes:
            results[ep["task"]][ep["index"]] = (ep["success"], ep["length"])
            steps += ep["length"]
            if "images" in ep:
                path = _gif_path(video_dir, name, ep["task"], ep["index"], ep["success"])
                videos.append(write_gif(path, list(ep["images"]) + [ep["final_image"]]))
    return steps


def evaluate(policy: Callable, tasks: Sequence[str], episodes_per_task: int, sim: SimWorkers, *,
             name: Optional[str] = None, batch_size: Optional[int] = None, videos_per_task: int = 0,
             video_dir: Optional[str] = None, first_index: int = 0, say: Callable[[str], None] = print,
             execute: Optional[int] = None) -> dict:
    """Run `episodes_per_task` episodes per task on held-out configurations
    [first_index, first_index + episodes_per_task) with the simulators of `sim`.

    Returns {'policy', 'tasks': {task: {'episodes', 'success_rate', 'mean_length',
    'mean_success_length', 'successes', 'lengths'}}, 'mean_success_rate', 'mean_length', 'wall_s',
    'policy_s', 'env_steps', 'policy_calls', 'execute', 'videos'}; the GIFs of the first
    `videos_per_task` episodes of each task go to video_dir/{name}/.

    execute: for a policy returning chunks [B, K, 7], how many of each chunk's actions a slot runs
    open-loop before re-planning (None: all K; must be in [1, K]). Policies returning [B, 7] act every step.
    """
    if execute is not None and (isinstance(execute, bool) or int(execute) < 1):
        raise ValueError(f"execute={execute!r}: the number of chunk actions to run before re-planning must be >= 1")
    name = name or getattr(policy, "name", None) or "policy"
    tasks = [resolve_task(t) for t in tasks]
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be a non-empty list without repeats, got {tasks}")
    n = int(episodes_per_task)
    if n <= 0 or first_index < 0 or first_index + n > HELDOUT_CONFIGS:
        raise ValueError(f"episodes_per_task={episodes_per_task} from index {first_index}: Meta-World has "
                         f"{HELDOUT_CONFIGS} held-out configurations per task (indices 0-{HELDOUT_CONFIGS - 1})")
    if videos_per_task and not video_dir:
        raise ValueError("videos_per_task > 0 needs a video_dir")
    queue = collections.deque((task, first_index + i) for task in tasks for i in range(n))
    b = int(batch_size or min(len(queue), 16))
    if b <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    size = sim.settings["image_size"]
    needs_images = bool(getattr(policy, "needs_images", True))
    expert = bool(getattr(policy, "sim_expert", False))
    wrist, proprio = _observation_keys(policy, name, sim)
    images = np.zeros((b, size, size, 3), np.uint8)
    extra: Dict[str, np.ndarray] = {}  # the other observation keys' batched arrays, by key
    if wrist:
        extra[WRIST_KEY] = np.zeros((b, size, size, 3), np.uint8)
    if proprio:
        extra[PROPRIO_KEY] = np.zeros((b, PROPRIO_DIM), np.float32)
    instructions = [""] * b
    episode: Dict[int, dict] = {}  # slot -> {'task', 'index', 'frames'}
    results = {t: {} for t in tasks}
    videos: List[str] = []
    policy_s, steps, t_start = 0.0, 0, time.time()
    plans: Dict[int, collections.deque] = {}  # slot -> actions of its chunk still to execute
    policy_calls = 0

    def worker_of(slot: int) -> int:
        # Contiguous blocks of slots per worker: the queue is task-major, so a worker tends to keep
        # few tasks (each new task costs it a configuration set, an env and a renderer: ~2 s).
        return slot * len(sim) // b

    def take(slot: int, obs: dict) -> None:
        ep = episode[slot]
        if obs["image"] is not None:
            images[slot] = obs["image"]
            if ep["frames"] is not None:
                ep["frames"].append(obs["image"])
            if extra:  # the keys and proprio definition the demo data is written with
                for key, value in policy_observation(obs, wrist=wrist, proprio=proprio).items():
                    if key in extra:
                        extra[key][slot] = value

    def start(slots: Sequence[int]) -> None:
        calls: Dict[int, list] = {}
        for s in slots:
            task, index = queue.popleft()
            record = index - first_index < videos_per_task
            episode[s] = {"task": task, "index": index, "frames": [] if record else None,
                          "render": needs_images or record}
            instructions[s] = instruction_for(task)
            plans[s] = collections.deque()  # a new episode plans afresh
            calls.setdefault(worker_of(s), []).append((s, task, "heldout", index, episode[s]["render"]))
        replies = sim.broadcast({w: ("reset", {"assignments": a}) for w, a in calls.items()})
        for reply in replies.values():
            for s, obs in reply.items():
                take(s, obs)

    if expert:
        steps = _expert_episodes(sim, tasks, first_index, n, videos_per_task, video_dir, name, results, videos)
        queue.clear()

    active = list(range(min(b, len(queue))))
    if active:
        start(active)
    while active:
        need = [s for s in active if not plans[s]]
        if need:
            t0 = time.time()
            inputs = {PRIMARY_KEY: images, **extra} if extra else images
            out = _policy_actions(policy, inputs, list(instructions), name)
            policy_s += time.time() - t0
            policy_calls += 1
            k = out.shape[1]
            if execute is not None and int(execute) > k:
                raise ValueError(f"execute={execute} but policy {name!r} returns chunks of {k} actions")
            for s in need:
                plans[s].extend(out[s, :k if execute is None else int(execute)])
        acts = {s: plans[s].popleft() for s in active}
        calls = {}
        for s in active:
            w = worker_of(s)
            calls.setdefault(w, ({}, {}))
            calls[w][0][s], calls[w][1][s] = acts[s], episode[s]["render"]
        replies = sim.broadcast({w: ("step", {"actions": a, "render": r}) for w, (a, r) in calls.items()})
        steps += len(active)
        finished = []
        for reply in replies.values():
            for s, obs in reply.items():
                take(s, obs)
                if obs["done"]:
                    ep = episode[s]
                    results[ep["task"]][ep["index"]] = (bool(obs["success"]), int(obs["t"]))
                    if ep["frames"]:
                        videos.append(write_gif(_gif_path(video_dir, name, ep["task"], ep["index"], obs["success"]),
                                                ep["frames"]))
                    finished.append(s)
        refill = sorted(finished)[:len(queue)]
        active = sorted(set(active) - set(finished) | set(refill))
        if refill:
            start(refill)

    per_task = {}
    for task in tasks:
        succ = [results[task][i][0] for i in sorted(results[task])]
        lens = [results[task][i][1] for i in sorted(results[task])]
        ok_lens = [length for ok, length in zip(succ, lens) if ok]
        per_task[task] = {"episodes": len(succ), "success_rate": float(np.mean(succ)),
                          "mean_length": float(np.mean(lens)),
                          "mean_success_length": float(np.mean(ok_lens)) if ok_lens else None,
                          "successes": succ, "lengths": lens}
    report = {"policy": name, "tasks": per_task,
              "mean_success_rate": float(np.mean([r["success_rate"] for r in per_task.values()])),
              "mean_length": float(np.mean([r["mean_length"] for r in per_task.values()])),
              "wall_s": round(time.time() - t_start, 2), "policy_s": round(policy_s, 2), "env_steps": steps,
              "batch_size": b, "policy_calls": policy_calls, "execute": execute, "videos": videos}
    say(f"{name}: mean success {report['mean_success_rate']:.2f} over {len(tasks)} tasks x {n} episodes "
        f"({report['wall_s']} s, policy {report['policy_s']} s)")
    return report


def format_table(results: Dict[str, dict]) -> str:
    """Success rate (mean episode length) per task and policy, one row per task."""
    names = list(results)
    tasks = list(next(iter(results.values()))["tasks"]) if results else []
    width = max([len(t) for t in tasks] + [len("mean")])
    head = f"{'task':<{width}}  " + "  ".join(f"{n:>16}" for n in names)
    rows = [head]
    for t in tasks:
        cells = [f"{results[n]['tasks'][t]['success_rate']:.2f} ({results[n]['tasks'][t]['mean_length']:5.1f})"
                 for n in names]
        rows.append(f"{t:<{width}}  " + "  ".join(f"{c:>16}" for c in cells))
    rows.append(f"{'mean':<{width}}  " + "  ".join(
        f"{results[n]['mean_success_rate']:.2f} ({results[n]['mean_length']:5.1f})".rjust(16) for n in names))
    return "\n".join(rows)


def _reference_dir(cache_dir: str, name: str, key: dict) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{name}-{digest}")


def _load_reference(folder: str, out_dir: str, name: str) -> Optional[dict]:
    """A cached reference report with its GIFs copied into out_dir/videos/{name}/, or None."""
    path = os.path.join(folder, "report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        report = json.load(f)
    video_dir = os.path.join(out_dir, "videos", name)
    os.makedirs(video_dir, exist_ok=True)
    report["videos"] = [shutil.copy2(os.path.join(folder, v), os.path.join(video_dir, v)) for v in report["videos"]]
    report["cached_from"] = folder
    return report


def _store_reference(folder: str, report: dict, key: dict) -> None:
    """Writes the report (GIF paths made relative) and its GIFs; a complete folder or nothing."""
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = permissions.mkdtemp(prefix=".tmp-", dir=parent)  # not 0700
    stored = dict(report, videos=[os.path.basename(v) for v in report["videos"]], key=key)
    for v in report["videos"]:
        shutil.copy2(v, tmp)
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(stored, f, indent=1)
    try:
        os.replace(tmp, folder)
    except OSError:  # another run stored it first
        shutil.rmtree(tmp, ignore_errors=True)


def run_evaluation(policy: Optional[Callable], tasks: Sequence[str], episodes_per_task: int, out_dir: str, *,
                   name: str = "model", image_size: int = 128, max_steps: int = 200, workers: int = 2,
                   batch_size: Optional[int] = None, videos_per_task: int = 2,
                   references: Sequence[str] = ("expert", "random"), seed: int = 0, camera: str = "corner",
                   goal_marker_scale: float = 2.5, sim: Optional[SimWorkers] = None,
                   reference_cache: Optional[str] = None, say: Callable[[str], None] = print,
                   execute: Optional[int] = None, wrist_camera: str = "") -> dict:
    """Evaluate `policy` (None: only the references) and the reference lines on the same held-out
    configurations; writes out_dir/report.json and GIFs under out_dir/videos/{policy}/. Returns the report:
    {'settings': {...}, 'results': {policy name: evaluate(...) report}, 'table': str}.

    image_size must be the demo dataset's stored image size (see its generation.json); the policy
    resizes like the training pipeline. `sim`: running SimWorkers to reuse (their image_size,
    max_steps, camera and goal_marker_scale then apply); else `workers` new ones are started.
    reference_cache: a folder where the reference lines' reports are kept, keyed by everything that
    determines them (tasks, episodes, simulator settings, seed, batch size, videos): they do not
    depend on the evaluated policy, so a re-evaluation (e.g. each `make demo`) reuses them.
    execute: chunk actions `policy` runs open-loop before re-planning (see `evaluate`; references act every step).
    wrist_camera: a second camera the new workers render (for a policy taking 'wrist_image'; see `evaluate`)."""
    unknown = sorted(set(references) - {"expert", "random"})
    if unknown:
        raise ValueError(f"unknown reference policies {unknown}; available: ['expert', 'random']")
    tasks = [resolve_task(t) for t in tasks]
    policies = ([(name, policy)] if policy is not None else [])
    policies += [(r, ExpertPolicy() if r == "expert" else RandomPolicy(seed)) for r in references]
    if not policies:
        raise ValueError("nothing to evaluate: policy is None and no references were asked for")
    os.makedirs(out_dir, exist_ok=True)
    own = sim is None
    if own:
        sim = SimWorkers(workers, image_size=image_size, camera=camera, goal_marker_scale=goal_marker_scale,
                         max_steps=max_steps, wrist_camera=wrist_camera)
    settings = {"tasks": tasks, "episodes_per_task": int(episodes_per_task), "split": "heldout (MT1 seed 1)",
                "config_indices": [0, int(episodes_per_task)], **sim.settings}
    results = {}
    try:
        for pname, pol in policies:
            is_ref = pname in references and (policy is None or pname != name)
            folder = None
            if reference_cache and is_ref:
                # the reference lines see no second camera: one cache serves one- and two-camera evaluations
                key = {"policy": pname, "seed": int(seed), "batch_size": batch_size, "videos": int(videos_per_task),
                       "version": 1, **{k: v for k, v in settings.items() if k != "wrist_camera"}}
                folder = _reference_dir(reference_cache, pname, key)
                cached = _load_reference(folder, out_dir, pname)
                if cached is not None:
                    results[pname] = cached
                    say(f"{pname}: mean success {cached['mean_success_rate']:.2f} (cached in {folder})")
                    continue
            results[pname] = evaluate(pol, tasks, episodes_per_task, sim, name=pname, batch_size=batch_size,
                                      videos_per_task=videos_per_task, video_dir=os.path.join(out_dir, "videos"),
                                      say=say, execute=None if is_ref else execute)
            if folder:
                _store_reference(folder, results[pname], key)
    finally:
        if own:
            sim.close()
    report = {"settings": settings, "results": results, "table": format_table(results)}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    say(report["table"])
    return report
