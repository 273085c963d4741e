"""Simulator worker processes: Meta-World environments (and their rendering) outside the caller's process.

Why processes: rendering with Mesa's llvmpipe segfaults in a process that has imported TensorFlow
(see rendering.py), and the caller (data writer, policy) needs TensorFlow/JAX; workers also step
environments in parallel. A worker is a fresh `python -m vla_jax.sim.worker` (not a multiprocessing
child, which would re-import the caller's __main__ and whatever it imports), speaking pickled
request/response pairs over its stdin/stdout.

Client: `SimWorkers(n, image_size=..., ...)`, then `request(i, method, **kwargs)`, or `map(method,
jobs)` to spread independent jobs over the workers (results in job order). Worker methods:
  expert_rollouts(task, split, indices, encode)  -> [episode dict]  (see metaworld_env.expert_episode)
  reset(assignments=[(slot, task, split, index, render)])  -> {slot: observation}
  step(actions={slot: float32 [7]}, render={slot: bool})   -> {slot: observation}
  expert_actions(slots=[slot])                            -> {slot: float32 [7]}
  check_rendering()                                       -> MUJOCO_GL (done at start by default)
With `wrist_camera` set, observations also carry 'wrist_image' and expert episodes 'wrist_images'
(vla_jax.sim.observation.policy_observation makes the policy's dict from an observation).
Errors raised in a worker are raised again in the caller (ValueError subclasses keep their type).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import select
import subprocess
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

# The folder that holds the vla_jax package, so `-m vla_jax.sim.worker` resolves from any cwd.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerError(RuntimeError):
    """A simulator worker failed in an unexpected way (its traceback is in the message)."""


# ---------------------------------------------------------------------------------------------
# Worker side.

def encode_image(image: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> JPEG or PNG bytes (PIL; no TensorFlow in the workers)."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    elif fmt == "png":
        Image.fromarray(image).save(buf, format="PNG")
    else:
        raise ValueError(f"image encoding must be 'jpeg' or 'png', got {fmt!r}")
    return buf.getvalue()


class _Server:
    """The environments of one worker: per task one shared renderer, and env instances per slot."""

    def __init__(self, image_size: int, camera: str, goal_marker_scale: float, max_steps: int,
                 wrist_camera: str = ""):
        from vla_jax.sim import metaworld_env, rendering

        self._mw, self._rendering = metaworld_env, rendering
        self.image_size, self.camera = int(image_size), camera
        self.goal_marker_scale, self.max_steps = float(goal_marker_scale), int(max_steps)
        self.wrist_camera = str(wrist_camera or "")
        self.renderers: Dict[str, Any] = {}
        self.wrist_renderers: Dict[str, Any] = {}
        self.free: Dict[str, List[Any]] = {}   # task -> idle env instances
        self.slots: Dict[int, Any] = {}        # slot -> env instance in use

    def _env(self, task: str):
        task = self._mw.resolve_task(task)
        if self.free.get(task):
            return self.free[task].pop()
        return self._mw.MetaWorldEnv(task, max_steps=self.max_steps, render=False, wrist_camera=self.wrist_camera)

    def _with_renderer(self, env, render: bool):
        """Attach the task's shared renderer (made on first use: ~1 s on llvmpipe) when rendering."""
        if render and env.renderer is None:
            if env.task not in self.renderers:
                self.renderers[env.task] = self._rendering.SceneRenderer(
                    env.unwrapped.model, self.image_size, self.camera, site_scale={"goal": self.goal_marker_scale})
            if self.wrist_camera and env.task not in self.wrist_renderers:
                self.wrist_renderers[env.task] = self._rendering.SceneRenderer(
                    env.unwrapped.model, self.image_size, self.wrist_camera,
                    site_scale={"goal": self.goal_marker_scale})
            env.attach_renderer(self.renderers[env.task], self.wrist_renderers.get(env.task))
        return env

    def _release(self, env) -> None:
        self.free.setdefault(env.task, []).append(env)

    def ping(self) -> int:
        return os.getpid()

    def check_rendering(self) -> str:
        """Render one frame of a tiny scene: fails fast (RenderContextError) when MUJOCO_GL cannot work."""
        mujoco = self._rendering.import_mujoco()
        model = mujoco.MjModel.from_xml_string(
            "<mujoco><worldbody><camera name='probe' pos='0 -1 0' xyaxes='1 0 0 0 0 1'/>"
            "<geom type='sphere' size='0.1'/></worldbody></mujoco>")
        renderer = self._rendering.SceneRenderer(model, 8, "probe")
        try:
            renderer.render(mujoco.MjData(model))
        finally:
            renderer.close()
        return os.environ.get("MUJOCO_GL", "")

    def expert_rollouts(self, task: str, split: str, indices: Sequence[int], encode: Optional[str] = "jpeg",
                        quality: int = 95, render: bool = True) -> List[dict]:
        env = self._with_renderer(self._env(task), render)
        try:
            out = []
            for i in indices:
                ep = self._mw.expert_episode(env, split, int(i), render=render)
                if render and encode:
                    ep["images"] = [encode_image(im, encode, quality) for im in ep["images"]]
                    if "wrist_images" in ep:
                        ep["wrist_images"] = [encode_image(im, encode, quality) for im in ep["wrist_images"]]
                    del ep["final_image"]  # only videos use it
                out.append(ep)
            return out
        finally:
            self._release(env)

    def reset(self, assignments: Sequence[tuple]) -> Dict[int, dict]:
        out = {}
        for slot, task, split, index, render in assignments:
            if slot in self.slots:
                self._release(self.slots.pop(slot))
            env = self._with_renderer(self._env(task), render)
            self.slots[slot] = env
            out[slot] = env.reset(split, index, render=render)
        return out

    def step(self, actions: Dict[int, np.ndarray], render: Dict[int, bool]) -> Dict[int, dict]:
        out = {}
        for slot, a in actions.items():
            r = bool(render.get(slot, True))
            out[slot] = self._with_renderer(self.slots[slot], r).step(a, render=r)
        return out

    def expert_actions(self, slots: Sequence[int]) -> Dict[int, np.ndarray]:
        return {slot: self.slots[slot].expert_action() for slot in slots}

    def close(self) -> None:
        envs = list(self.slots.values()) + [e for lst in self.free.values() for e in lst]
        for env in envs:
            env.close()
        for r in list(self.renderers.values()) + list(self.wrist_renderers.values()):
            r.close()
        self.slots, self.free, self.renderers, self.wrist_renderers = {}, {}, {}, {}


def _serve() -> None:
    settings = json.loads(sys.argv[1])
    # Replies go to the original stdout; anything else printed (MuJoCo, Mesa) goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    server = _Server(**settings)
    try:
        while True:
            try:
                method, kwargs = pickle.load(inp)
            except EOFError:
                return
            if method == "close":
                break
            try:
                reply = ("ok", getattr(server, method)(**kwargs))
            except Exception as e:  # noqa: BLE001 - sent back to the caller
                reply = ("error", e, traceback.format_exc())
            try:
                pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 - an exception that does not pickle
                pickle.dump(("error", None, traceback.format_exc()), out, protocol=pickle.HIGHEST_PROTOCOL)
            out.flush()
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# Client side.

class SimWorkers:
    """`num_workers` simulator processes sharing one set of settings.

    image_size: side of rendered images; camera: Meta-World camera; wrist_camera: a second camera
    rendered too (observations then carry 'wrist_image'; '' = none); goal_marker_scale: goal site
    enlargement; max_steps: episode limit; lp_num_threads: llvmpipe threads per worker (LP_NUM_THREADS,
    unless set in the environment; 1 keeps two workers from oversubscribing two cores).
    check_rendering: render a tiny scene in each worker now, so that an unusable MUJOCO_GL fails here
    (RenderContextError) rather than in the middle of a run.
    """

    def __init__(self, num_workers: int = 1, *, image_size: int = 128, camera: str = "corner",
                 goal_marker_scale: float = 2.5, max_steps: int = 200, lp_num_threads: int = 1,
                 check_rendering: bool = True, wrist_camera: str = ""):
        if int(num_workers) < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        settings = dict(image_size=int(image_size), camera=str(camera), goal_marker_scale=float(goal_marker_scale),
                        max_steps=int(max_steps))
        if wrist_camera:
            settings["wrist_camera"] = str(wrist_camera)
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        env.setdefault("LP_NUM_THREADS", str(int(lp_num_threads)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        self.settings = settings
        self._procs: List[subprocess.Popen] = []
        try:
            for _ in range(int(num_workers)):
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "vla_jax.sim.worker", json.dumps(settings)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
            if check_rendering:
                self.broadcast({i: ("check_rendering", {}) for i in range(len(self._procs))})
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._procs)

    def send(self, i: int, method: str, **kwargs) -> None:
        proc = self._procs[i]
        try:
            pickle.dump((method, kwargs), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self._dead(i)) from None

    def recv(self, i: int) -> Any:
        try:
            reply = pickle.load(self._procs[i].stdout)
        except EOFError:
            raise WorkerError(self._dead(i)) from None
        if reply[0] == "ok":
            return reply[1]
        _, exc, tb = reply
        if isinstance(exc, ValueError):  # bad input (task names, MUJOCO_GL, ...): keep the type and message
            raise exc
        raise WorkerError(f"simulator worker {i} failed:\n{tb}")

    def request(self, i: int, method: str, **kwargs) -> Any:
        """Run `method(**kwargs)` in worker i and return its result."""
        self.send(i, method, **kwargs)
        return self.recv(i)

    def broadcast(self, calls: Dict[int, tuple]) -> Dict[int, Any]:
        """{worker: (method, kwargs)} run concurrently -> {worker: result}."""
        for i, (method, kwargs) in calls.items():
            self.send(i, method, **kwargs)
        return {i: self.recv(i) for i in calls}

    def map(self, method: str, jobs: Sequence[dict], on_result: Optional[Callable[[int, Any], None]] = None,
            affinity: Optional[Sequence[Optional[int]]] = None) -> List[Any]:
        """Run `method(**job)` for every job, spread over the workers as they free up; results in job
        order. affinity[j]: the worker that must run job j (None: any), e.g. to keep each task on
        one worker (a task costs a worker ~2 s to set up). `on_result(job_index, result)` is called
        as each job finishes (progress reports)."""
        if affinity is not None and len(affinity) != len(jobs):
            raise ValueError(f"affinity has {len(affinity)} entries for {len(jobs)} jobs")
        results: List[Any] = [None] * len(jobs)
        todo = list(range(len(jobs)))
        busy: Dict[int, int] = {}  # worker -> job
        while todo or busy:
            for i in range(len(self._procs)):
                if i in busy:
                    continue
                j = next((j for j in todo if affinity is None or affinity[j] is None
                          or affinity[j] % len(self._procs) == i), None)
                if j is not None:
                    todo.remove(j)
                    self.send(i, method, **jobs[j])
                    busy[i] = j
            ready, _, _ = select.select([self._procs[i].stdout for i in busy], [], [])
            for i in list(busy):
                if self._procs[i].stdout in ready:
                    j = busy.pop(i)
                    results[j] = self.recv(i)
                    if on_result is not None:
                        on_result(j, results[j])
        return results

    def _dead(self, i: int) -> str:
        proc = self._procs[i]
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        return (f"simulator worker {i} (pid {proc.pid}) stopped unexpectedly (exit code {code}); "
                "its error output is above")

    def close(self) -> None:
        """Ask every worker to close its environments, then wait for it (killing it after 30 s)."""
        for proc in self._procs:
            try:
                if proc.poll() is None:
                    pickle.dump(("close", {}), proc.stdin)
                    proc.stdin.flush()
                proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout:
                proc.stdout.close()
        self._procs = []

    def __enter__(self) -> "SimWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close()


if __name__ == "__main__":
    _serve()
