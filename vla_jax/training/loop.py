"""The step loop: feed batches, log, checkpoint on schedule, stop on preemption or a non-finite loss.

Kept free of model code (everything arrives as callables) so its control flow is tested directly.
Conventions: step k is the k-th update; the checkpoint of step k holds the state after k updates and
the data position after k batches. A step whose loss or gradient norm is not finite is neither
logged as a record nor saved: the run stops and the latest checkpoint stays the last good one.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import jax

DONE, PREEMPTED, NONFINITE = "done", "preempted", "nonfinite"


def train_loop(state: Any, train_step: Callable, data: Iterator, *, start: int, num_steps: int, save_every: int,
               log_every: int, to_global: Callable[[Dict], Any], record: Callable[[int, Dict, float], Dict],
               save: Callable[[int, Any, Any], None], writer, preempted: Callable[[], bool],
               latest_saved: Callable[[], Optional[int]], check_batch: Callable[[Dict], None] = lambda b: None,
               ) -> Tuple[Any, str]:
    """Runs steps start+1 .. num_steps. Returns (state, DONE | PREEMPTED | NONFINITE).

    train_step(state, global_batch) -> (state, metrics); data: iterator with get_state();
    record(step, host metrics, seconds) -> flat dict with 'loss' and 'grad_norm';
    save(step, state, data_state); writer: MetricWriter; preempted(): all processes agree to stop.
    """
    t_last = time.perf_counter()
    batch = next(data)
    check_batch(batch)
    for step in range(start + 1, num_steps + 1):
        data_state = data.get_state()  # position after this step's batch
        state, metrics = train_step(state, to_global(batch))
        if step < num_steps:
            batch = next(data)  # prepared while the devices work on this step
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rec = record(step, metrics, now - t_last)
        t_last = now
        if not (math.isfinite(rec["loss"]) and math.isfinite(rec["grad_norm"])):
            writer.message(f"step {step}: loss {rec['loss']}, grad_norm {rec['grad_norm']}: not finite. Stopping "
                           f"without saving; the latest good checkpoint is step {latest_saved()}.")
            return state, NONFINITE
        writer.progress(rec)
        if step % log_every == 0 or step == start + 1:
            writer.write(rec)
        stop = preempted()
        if step % save_every == 0 or step == num_steps or stop:
            save(step, state, data_state)
        if stop:
            writer.message(f"preempted: saved step {step}; rerun the same command to continue")
            return state, PREEMPTED
    return state, DONE
