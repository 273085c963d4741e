"""Meta-World expert demonstrations -> an RLDS dataset the data pipeline reads like any OXE dataset.

`generate(out_dir, DemoSpec(...))` writes

    out_dir/
        {name}/{version}/           TFDS builder folder (dataset_info.json, features.json, TFRecords)
        dataset_config.json         the dataset's registry entry: pass it as the training config's
                                    `data.dataset_configs` with `data.data_dir=out_dir`, `data.mixture={name}`
        generation.json             settings, episode counts, expert success rates, timings
        COMPLETE                    written last; holds the settings fingerprint (the cache key)

Per step: observation/image (uint8 [S, S, 3], JPEG), observation/state (float32 [39], Meta-World's
observation), action (float32 [7] `[dx, dy, dz, 0, 0, 0, gripper]`, gripper 1 = open / 0 = closed),
language_instruction. With a second camera (`DemoSpec(wrist_camera="gripperPOV")`) also
observation/wrist_image (uint8 [S, S, 3]); with `proprio=True` observation/state is the 4-D proprio
`[hand x, hand y, hand z, gripper opening]` (vla_jax.sim.observation) and the 39-D observation moves
to observation/env_state. dataset_config.json then names them (`image_keys`, `proprio_key`).
Only successful expert episodes are kept; an episode ends at its first success.
Splits: 'train' from the training configurations (MT1 seed 0, then 2, 3, ...: configurations whose
expert episode fails are replaced by the next ones), 'val' from held-out configurations (MT1 seed 1)
taken from the last index down, so closed-loop evaluation (held-out indices from 0 up) stays
disjoint from them while the two together use at most 50.

Generation runs in simulator worker processes (vla_jax.sim.worker); this process only writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vla_jax.sim.instructions import resolve_task
from vla_jax.sim.metaworld_env import CONFIGS_PER_SEED as HELDOUT_CONFIGS
from vla_jax.sim.metaworld_env import STATE_DIM, config_ref
from vla_jax.sim.observation import PROPRIO_DIM, PROPRIO_KEY, WRIST_KEY, camera_keys, proprio_from_obs

log = logging.getLogger(__name__)

DEMO_TASKS = ("reach", "drawer-close", "button-press-topdown", "window-open", "drawer-open", "push")
MARKER = "COMPLETE"


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """What to generate. tasks: Meta-World task names; episodes_per_task: successful training
    episodes per task; val_episodes_per_task: successful held-out episodes per task (0: no val split);
    image_size: stored image side (the pipeline resizes to the model's size); max_steps: episode limit;
    name/version: the TFDS builder (and registry) name and version.
    wrist_camera: a second Meta-World camera stored as 'wrist_image' ('' = one camera, the default);
    proprio: store the 4-D proprio state as 'state' (the 39-D observation then is 'env_state').
    The two options enter the fingerprint only when set: the default spec keeps its cache key."""

    tasks: Tuple[str, ...] = DEMO_TASKS
    episodes_per_task: int = 50
    val_episodes_per_task: int = 5
    image_size: int = 128
    max_steps: int = 200
    name: str = "metaworld_demo"
    version: str = "1.0.0"
    camera: str = "corner"
    goal_marker_scale: float = 2.5
    image_encoding: str = "jpeg"
    jpeg_quality: int = 95
    wrist_camera: str = ""
    proprio: bool = False

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(resolve_task(t) for t in self.tasks))
        if not self.tasks:
            raise ValueError("DemoSpec.tasks is empty")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"DemoSpec.tasks lists a task twice: {list(self.tasks)}")
        if self.episodes_per_task <= 0:
            raise ValueError(f"DemoSpec.episodes_per_task must be > 0, got {self.episodes_per_task}")
        if not 0 <= self.val_episodes_per_task < HELDOUT_CONFIGS:
            raise ValueError(f"DemoSpec.val_episodes_per_task must be in [0, {HELDOUT_CONFIGS}), "
                             f"got {self.val_episodes_per_task}")
        if self.image_encoding not in ("jpeg", "png"):
            raise ValueError(f"DemoSpec.image_encoding must be 'jpeg' or 'png', got {self.image_encoding!r}")

        if self.wrist_camera == self.camera:
            raise ValueError(f"DemoSpec.wrist_camera must differ from the primary camera {self.camera!r}")

    def fingerprint(self) -> str:
        d = dataclasses.asdict(self)
        for k in _OPTIONAL_FIELDS:  # added later: absent at their defaults, so old caches stay valid
            if d[k] == _OPTIONAL_FIELDS[k]:
                del d[k]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_OPTIONAL_FIELDS = {"wrist_camera": "", "proprio": False}


def dataset_config(spec: DemoSpec) -> dict:
    """The registry entry (DatasetConfig fields) of the generated dataset: the generic standardize,
    gripper already absolute with 1 = open. With a second camera / proprio also `image_keys`
    (primary first) / `proprio_key`."""
    cfg = {"name": spec.name, "image_key": "image", "standardize": "generic_eef_pos", "version": spec.version,
           "action_encoding": "EEF_POS", "gripper": "absolute"}
    if spec.wrist_camera:
        cfg["image_keys"] = list(camera_keys(spec.wrist_camera))
    if spec.proprio:
        cfg["proprio_key"] = PROPRIO_KEY
    return cfg


def is_complete(out_dir: str, spec: Optional[DemoSpec] = None) -> bool:
    """True when `out_dir` holds a finished generation (of `spec`, if given)."""
    path = os.path.join(out_dir, MARKER)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        stamp = f.read().strip()
    return spec is None or stamp == spec.fingerprint()


def _features(spec: DemoSpec):
    import tensorflow_datasets as tfds

    from vla_jax.sim.rlds_writer import image_feature, rlds_features

    obs = {"image": image_feature(spec.image_size, spec.image_encoding),
           "state": tfds.features.Tensor(shape=(STATE_DIM,), dtype=np.float32)}
    if spec.wrist_camera:
        obs[WRIST_KEY] = image_feature(spec.image_size, spec.image_encoding)
    if spec.proprio:
        obs["env_state"] = obs["state"]
        obs[PROPRIO_KEY] = tfds.features.Tensor(shape=(PROPRIO_DIM,), dtype=np.float32)
    return rlds_features(
        obs,
        action_dim=7,
        episode_metadata={"task": tfds.features.Text(), "file_path": tfds.features.Text(),
                          "config_seed": tfds.features.Scalar(dtype=np.int32),
                          "config_index": tfds.features.Scalar(dtype=np.int32)})


def _to_rlds(ep: dict, spec: DemoSpec) -> dict:
    from vla_jax.sim.rlds_writer import make_episode

    seed, index = config_ref(ep["split"], ep["index"])
    meta = {"task": ep["task"], "file_path": f"metaworld/{ep['task']}/mt1_seed{seed}/config{index:02d}",
            "config_seed": seed, "config_index": index}
    obs = {"image": ep["images"], "state": ep["states"]}
    if spec.wrist_camera:
        if "wrist_images" not in ep:
            raise ValueError(f"episode {meta['file_path']} has no second-camera images "
                             f"(the workers were started without wrist_camera={spec.wrist_camera!r})")
        obs[WRIST_KEY] = ep["wrist_images"]
    if spec.proprio:
        obs["env_state"] = ep["states"]
        obs[PROPRIO_KEY] = proprio_from_obs(ep["states"])
    return make_episode(obs, ep["actions"], ep["instruction"], terminal=True, metadata=meta)


def _jobs(tasks: Sequence[str], split: str, indices_by_task: Dict[str, List[int]], chunk: int) -> List[dict]:
    jobs = []
    for task in tasks:
        idx = indices_by_task.get(task, [])
        for k in range(0, len(idx), chunk):
            jobs.append(dict(task=task, split=split, indices=idx[k:k + chunk]))
    return jobs


def _collect(workers, spec: DemoSpec, split: str, config_split: str, want: int,
             candidates: Callable[[int], List[int]], chunk: int, writer, stats: dict,
             say: Callable[[str], None]) -> None:
    """Roll out experts on configurations of `config_split` ('train'/'heldout') until each task has
    `want` successes (or runs out of candidates), adding the successful episodes to the RLDS split
    `split` in a deterministic order (independent of the number of workers)."""
    done = {t: 0 for t in spec.tasks}
    tried = {t: 0 for t in spec.tasks}
    lengths = {t: [] for t in spec.tasks}
    rollouts = {t: 0 for t in spec.tasks}
    successes = {t: 0 for t in spec.tasks}
    max_tries = 2 * want + 10  # a task whose expert keeps failing must not loop forever
    while True:
        todo = {}
        for t in spec.tasks:
            need = want - done[t]
            pool = candidates(min(tried[t] + need, max_tries))[tried[t]:]
            if need > 0 and pool:
                todo[t] = pool[:need]
                tried[t] += len(todo[t])
        if not todo:
            break
        t0 = time.time()
        jobs = [dict(j, encode=spec.image_encoding, quality=spec.jpeg_quality)
                for j in _jobs(spec.tasks, config_split, todo, chunk)]
        progress = {"episodes": 0, "total": sum(len(j["indices"]) for j in jobs)}

        def report(_, episodes):
            progress["episodes"] += len(episodes)
            say(f"{split}: {progress['episodes']}/{progress['total']} expert episodes "
                f"({time.time() - t0:.0f} s)")

        # Each task stays on one worker (its configurations, env and renderer are built once).
        affinity = [spec.tasks.index(j["task"]) for j in jobs]
        results = workers.map("expert_rollouts", jobs, on_result=report, affinity=affinity)
        for episodes in results:
            for ep in episodes:
                rollouts[ep["task"]] += 1
                if ep["success"]:
                    successes[ep["task"]] += 1
                    done[ep["task"]] += 1
                    lengths[ep["task"]].append(ep["length"])
                    writer.add(split, _to_rlds(ep, spec))
        say(f"{split}: {sum(len(v) for v in todo.values())} expert episodes in {time.time() - t0:.1f} s; "
            f"successful so far {dict(done)}")
    stats[split] = {t: {"episodes": done[t], "expert_rollouts": rollouts[t],
                        "expert_success_rate": successes[t] / max(rollouts[t], 1),
                        "mean_length": float(np.mean(lengths[t])) if lengths[t] else 0.0,
                        "steps": int(np.sum(lengths[t]))} for t in spec.tasks}
    short = {t: done[t] for t in spec.tasks if done[t] < want}
    if short:
        log.warning("%s split: fewer than %d successful expert episodes for %s", split, want, short)


def generate(out_dir: str, spec: DemoSpec = DemoSpec(), *, workers: int = 2, episodes_per_job: int = 10,
             episodes_per_shard: int = 50, say: Callable[[str], None] = log.info) -> dict:
    """Generate the dataset into `out_dir` (see the module docstring); returns generation.json's content.

    When `out_dir` already holds a complete generation of the same spec it is reused (nothing runs).
    A different or unfinished one is an error (nothing is deleted): choose another folder.
    The work happens in a temporary sibling folder renamed to `out_dir` at the end.
    """
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    if os.path.exists(out_dir):
        if is_complete(out_dir, spec):
            say(f"reusing the demo dataset in {out_dir} (complete, same settings)")
            with open(os.path.join(out_dir, "generation.json")) as f:
                return json.load(f)
        why = "was generated with other settings" if is_complete(out_dir) else "is not a complete demo dataset"
        raise ValueError(f"output folder {out_dir} exists and {why}; remove it or choose another output folder")
    from vla_jax.sim.rlds_writer import RLDSWriter
    from vla_jax.sim.worker import SimWorkers

    tmp = f"{out_dir}.partial-{os.getpid()}"
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    t_start = time.time()
    stats: dict = {}
    try:
        writer = RLDSWriter(os.path.join(tmp, spec.name, spec.version), _features(spec),
                            episodes_per_shard=episodes_per_shard,
                            description=f"Meta-World scripted-expert demonstrations ({', '.join(spec.tasks)})")
        with SimWorkers(workers, image_size=spec.image_size, camera=spec.camera,
                        goal_marker_scale=spec.goal_marker_scale, max_steps=spec.max_steps,
                        wrist_camera=spec.wrist_camera) as sim, writer:
            _collect(sim, spec, "train", "train", spec.episodes_per_task, lambda n: list(range(n)),
                     episodes_per_job, writer, stats, say)
            if spec.val_episodes_per_task:
                heldout_from_end = list(range(HELDOUT_CONFIGS - 1, -1, -1))
                _collect(sim, spec, "val", "heldout", spec.val_episodes_per_task,
                         lambda n: heldout_from_end[:n], episodes_per_job, writer, stats, say)
        summary = {"spec": dataclasses.asdict(spec), "fingerprint": spec.fingerprint(),
                   "episodes": writer.num_episodes(), "splits": stats, "workers": workers,
                   "seconds": round(time.time() - t_start, 1), "data_dir": out_dir,
                   "dataset_configs": os.path.join(out_dir, "dataset_config.json"), "mixture": spec.name}
        with open(os.path.join(tmp, "dataset_config.json"), "w") as f:
            json.dump([dataset_config(spec)], f, indent=1)
        with open(os.path.join(tmp, "generation.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(spec.fingerprint() + "\n")
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder only
        raise
    say(f"wrote {summary['episodes']} episodes to {out_dir} in {summary['seconds']} s")
    return json.loads(json.dumps(summary))  # the same value a cached run returns
