"""Request batching: concurrent requests share one accelerator call.

Request threads `submit` a validated example (observation, prompt ids, unnorm key) and wait
on its future. One worker thread takes the first waiting request, then keeps collecting for at
most `window_ms` (or until `max_batch` are in hand), and runs them as one batch. The queue is
bounded: when `max_queue` requests already wait, `submit` raises `QueueFull` at once (HTTP 503)
instead of letting latency grow without limit.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The server already holds `max_queue` waiting requests."""


@dataclasses.dataclass
class Example:
    """observation: validated {camera name: uint8 [H, W, 3], 'state': float64 [P] with proprio}
    (`Policy.check_observation`; resized by the worker, one call per batch, camera and image size);
    prompt: its token ids (checked by the handler); instruction: the text; unnorm_key: resolved dataset
    key; gripper: the output convention ('openvla' or 'dataset')."""

    observation: Dict[str, np.ndarray]
    prompt: List[int]
    unnorm_key: str
    instruction: str
    gripper: str = "openvla"
    future: Future = dataclasses.field(default_factory=Future)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)


# run_batch(examples) -> one float64 action per example, in order.
BatchFn = Callable[[Sequence[Example]], Sequence[np.ndarray]]


class Batcher:
    """Collects up to `max_batch` examples within `window_ms` of the first one and runs `run_batch`."""

    def __init__(self, run_batch: BatchFn, max_batch: int = 8, window_ms: float = 5.0, max_queue: int = 256):
        if max_batch < 1 or max_queue < 1 or window_ms < 0:
            raise ValueError(f"need max_batch >= 1, max_queue >= 1, window_ms >= 0; got {max_batch}, {max_queue}, "
                             f"{window_ms}")
        self.run_batch, self.max_batch, self.window = run_batch, int(max_batch), float(window_ms) / 1e3
        self._queue: "queue.Queue[Optional[Example]]" = queue.Queue(maxsize=int(max_queue))
        self.batches = 0
        self.examples = 0
        self._stop = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="vla-batcher", daemon=True)
        self._thread.start()

    def submit(self, ex: Example) -> Future:
        if self._closing or self._stop.is_set():
            raise RuntimeError("the server is shutting down")
        try:
            self._queue.put_nowait(ex)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting; retry later") from None
        return ex.future

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def _collect(self) -> List[Example]:
        first = self._queue.get()
        if first is None:
            return []
        batch, deadline = [first], time.perf_counter() + self.window
        while len(batch) < self.max_batch:
            left = deadline - time.perf_counter()
            try:
                ex = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if ex is None:
                self._stop.set()
                break
            batch.append(ex)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                break
            live = [ex for ex in batch if ex.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                actions = self.run_batch(live)
                for ex, a in zip(live, actions):
                    ex.future.set_result(a)
            except Exception as e:  # noqa: BLE001 - the error goes back to every waiting request
                log.exception("batch of %d failed", len(live))
                for ex in live:
                    if not ex.future.done():
                        ex.future.set_exception(e)
            self.batches += 1
            self.examples += len(live)

    def close(self, timeout: float = 10.0) -> None:
        """Stops after the requests already queued; later `submit`s raise."""
        self._closing = True
        if self._stop.is_set() and not self._thread.is_alive():
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            self._stop.set()
        self._thread.join(timeout)
        self._stop.set()
