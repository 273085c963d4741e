"""The step loop: feed batches, log, checkpoint on schedule, stop on preemption or a non-finite loss.

Kept free of model code (everything arrives as callables) so its control flow is tested directly.
Conventions: step k is the k-th update; the checkpoint of step k holds the state after k updates and
the data position after k batches. A step whose loss or gradient norm is not finite is neither
logged as a record nor saved: the run stops and the latest checkpoint stays the last good one. The
loss is computed before the update, so a step is also refused when its update exploded (a
non-finite update norm, or one above MAX_RELATIVE_UPDATE times the parameter norm) or left
non-finite parameters (metrics 'update_norm', 'param_norm', 'params_finite' of the train step).
With steps_per_call n > 1 a call runs n steps wherever no checkpoint falls inside it (`chunk_size`);
each of its steps is still recorded, and preemption is checked between calls.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax

DONE, PREEMPTED, NONFINITE = "done", "preempted", "nonfinite"
# An update larger than the trainable parameters themselves (|update| > 1 x max(|params|, 1)) is a
# divergence, not training (AdamW moves each parameter by about lr per step; at lr 1e9 the ratio is
# ~1e10). Measured ratios: BENCHMARKS.md, "update / parameter norm".
MAX_RELATIVE_UPDATE = 1.0


def diverged(metrics: Dict[str, Any], max_relative_update: float = MAX_RELATIVE_UPDATE) -> Optional[str]:
    """Why a step's update must not be saved (None when it may): host metrics of one step with
    'update_norm', 'param_norm' (before the update) and 'params_finite'; absent keys are not checked."""
    if "params_finite" in metrics and not float(metrics["params_finite"]):
        return "the updated parameters hold NaN/inf"
    if "update_norm" not in metrics:
        return None
    u = float(metrics["update_norm"])
    p = float(metrics.get("param_norm", 0.0))
    if not math.isfinite(u):
        return f"update norm {u}: not finite"
    if u > max_relative_update * max(p, 1.0):
        return (f"update norm {u:.4g} is {u / max(p, 1e-30):.3g}x the parameter norm {p:.4g} (limit "
                f"{max_relative_update:g}x): the run diverged (learning rate too high?)")
    return None


def chunk_size(step: int, num_steps: int, save_every: int, steps_per_call: int) -> int:
    """How many steps the next call runs, after `step` updates: steps_per_call when those steps end
    on or before the next save point and the last step, else 1 (so checkpoints land on schedule and a
    call of another length is never compiled)."""
    n = steps_per_call
    if n > 1 and step + n <= num_steps and step // save_every == (step + n - 1) // save_every:
        return n
    return 1


def train_loop(state: Any, train_step: Callable, data: Iterator, *, start: int, num_steps: int, save_every: int,
               log_every: int, to_global: Callable[[Dict], Any], record: Callable[[int, Dict, float], Dict],
               save: Callable[[int, Any, Any], None], writer, preempted: Callable[[], bool],
               latest_saved: Callable[[], Optional[int]], check_batch: Callable[[Dict], None] = lambda b: None,
               steps_per_call: int = 1, train_steps: Optional[Callable[[Any, List[Dict]], Tuple[Any, Dict]]] = None,
               max_relative_update: float = MAX_RELATIVE_UPDATE) -> Tuple[Any, str]:
    """Runs steps start+1 .. num_steps. Returns (state, DONE | PREEMPTED | NONFINITE).

    train_step(state, global_batch) -> (state, metrics); data: iterator with get_state();
    record(step, host metrics, seconds) -> flat dict with 'loss' and 'grad_norm';
    save(step, state, data_state); writer: MetricWriter; preempted(): all processes agree to stop.
    steps_per_call n > 1: train_steps(state, [n host batches]) -> (state, metrics stacked [n, ...])
    runs n steps in one call wherever `chunk_size` allows. Every step still gets its record; the
    run can stop or save only between calls. A step stops the run (NONFINITE, nothing saved) when its
    loss or gradient norm is not finite or `diverged` says its update exploded.
    latest_saved(): the latest good checkpoint (Checkpointer.latest_step: verified, finite).
    """
    if steps_per_call > 1 and train_steps is None:
        raise ValueError(f"steps_per_call={steps_per_call} needs train_steps")

    def take(n):  # n host batches, each with the data position after it
        out = []
        for _ in range(n):
            batch = next(data)
            out.append((batch, data.get_state()))
        return out

    t_last = time.perf_counter()
    step = start
    chunk = take(chunk_size(step, num_steps, save_every, steps_per_call))
    check_batch(chunk[0][0])
    while step < num_steps:
        n, first = len(chunk), step + 1
        if n == 1:
            state, metrics = train_step(state, to_global(chunk[0][0]))
        else:
            state, metrics = train_steps(state, [b for b, _ in chunk])
        data_state = chunk[-1][1]  # position after this call's last batch
        step += n
        if step < num_steps:
            chunk = take(chunk_size(step, num_steps, save_every, steps_per_call))  # while the devices work
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        seconds, t_last = (now - t_last) / n, now
        for i in range(n):
            s = first + i
            m = metrics if n == 1 else jax.tree.map(lambda x: x[i], metrics)
            rec = record(s, m, seconds)
            why = None if math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"]) else \
                f"loss {rec['loss']}, grad_norm {rec['grad_norm']}: not finite"
            why = why or diverged(m, max_relative_update)
            if why:
                writer.message(f"step {s}: {why}. Stopping without saving; the latest good checkpoint is step "
                               f"{latest_saved()}.")
                return state, NONFINITE
            if "update_norm" in m:
                rec.setdefault("update_norm", float(m["update_norm"]))
            writer.progress(rec)
            if s % log_every == 0 or s == start + 1:
                writer.write(rec)
        stop = preempted()
        if step % save_every == 0 or step == num_steps or stop:
            save(step, state, data_state)
        if stop:
            writer.message(f"preempted: saved step {step}; rerun the same command to continue")
            return state, PREEMPTED
    return state, DONE
