"""The step loop: feed batches, log, checkpoint on schedule, stop on preemption or a non-finite loss.

Kept free of model code (everything arrives as callables) so its control flow is tested directly.
Conventions: step k is the k-th update; the checkpoint of step k holds the state after k updates and
the data position after k batches. A step whose loss or gradient norm is not finite is neither
logged as a record nor saved: the run stops and the latest checkpoint stays the last good one.
With steps_per_call n > 1 a call runs n steps wherever no checkpoint falls inside it (`chunk_size`);
each of its steps is still recorded, and preemption is checked between calls.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import jax

DONE, PREEMPTED, NONFINITE = "done", "preempted", "nonfinite"


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
               ) -> Tuple[Any, str]:
    """Runs steps start+1 .. num_steps. Returns (state, DONE | PREEMPTED | NONFINITE).

    train_step(state, global_batch) -> (state, metrics); data: iterator with get_state();
    record(step, host metrics, seconds) -> flat dict with 'loss' and 'grad_norm';
    save(step, state, data_state); writer: MetricWriter; preempted(): all processes agree to stop.
    steps_per_call n > 1: train_steps(state, [n host batches]) -> (state, metrics stacked [n, ...])
    runs n steps in one call wherever `chunk_size` allows. Every step still gets its record; the
    run can stop or save only between calls.
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
            rec = record(s, metrics if n == 1 else jax.tree.map(lambda x: x[i], metrics), seconds)
            if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
                writer.message(f"step {s}: loss {rec['loss']}, grad_norm {rec['grad_norm']}: not finite. Stopping "
                               f"without saving; the latest good checkpoint is step {latest_saved()}.")
                return state, NONFINITE
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
