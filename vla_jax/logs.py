"""What the entry points print: our progress lines by default, third-party chatter only with --verbose.

`train.py`, `eval.py`, `python -m vla_jax.serve` and `python -m vla_jax.hf` call `setup(verbose)` once,
right after parsing their flags and before TensorFlow is imported. By default it keeps:
- every `vla_jax.*` logger at INFO (loading, "compiling ...", serving lines);
- third-party loggers (absl — which orbax and tensorflow_datasets log through —, tensorflow, jax,
  etils) at WARNING and above, minus the known-harmless warnings in `HARMLESS`;
- TensorFlow's C++ logs at ERROR and above (TF_CPP_MIN_LOG_LEVEL=2, unless the environment sets it).
`setup(verbose=True)` shows all of it at INFO, as before this module existed.

`compile_on_first_call` wraps a jitted step so that the first call says "compiling ..." and how long
the compile took: jit would otherwise compile silently inside the first step.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import Any, Callable, Optional

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
THIRD_PARTY = ("absl", "tensorflow", "jax", "etils", "orbax", "tensorflow_datasets")
# Warnings that say nothing a user can act on. Each pattern names its source and why it is harmless.
HARMLESS = (
    # orbax: vla_jax checkpoints keep `_CHECKPOINT_METADATA` in the step folder, not in the `state`
    # item folder that loading restores from directly; orbax restores fully without it and warns.
    re.compile(r"Metadata file does not exist: .*_CHECKPOINT_METADATA"),
    # AutoGraph cannot convert a Python for/else (vla_jax.data.oxe.transforms.get_path walks feature
    # names, plain Python strings): it runs the function as written, which is what is meant.
    re.compile(r"AutoGraph could not transform .*", re.DOTALL),
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed third-party record: let the handler report it
            return True
        return not any(p.search(msg) for p in HARMLESS)


_FILTER = _DropHarmless()


def setup(verbose: bool = False) -> None:
    """Configures logging for an entry point (idempotent; a later call with another `verbose` wins)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    root = logging.getLogger()
    if not root.handlers:  # absl's app.run installs its own handler on the root logger; keep it
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        # Ours, or the bare one that absl.logging's first call adds through logging.basicConfig().
        if type(handler) is logging.StreamHandler and getattr(handler.formatter, "_fmt", None) in (
                None, logging.BASIC_FORMAT):
            handler.setFormatter(logging.Formatter(FORMAT))
    root.setLevel(logging.INFO)
    logging.getLogger("vla_jax").setLevel(logging.INFO)
    for name in THIRD_PARTY:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        if verbose:
            logger.removeFilter(_FILTER)
        else:
            logger.addFilter(_FILTER)


class compile_on_first_call:
    """`fn` (a jitted callable with `.lower`) compiled ahead of time on its first call, with
    "compiling WHAT ..." / "compiled WHAT in S s" sent to `say`; later calls run the executable.

    The executable accepts exactly the first call's shapes, dtypes and shardings (a training step's
    are fixed); a call that differs falls back to `fn`, which compiles again as jit always does.
    """

    def __init__(self, fn: Any, what: str, say: Callable[[str], None]):
        self.fn, self.what, self.say = fn, what, say
        self.compiled: Optional[Any] = None
        self.seconds: Optional[float] = None

    def __call__(self, *args):
        if self.compiled is None:
            self.say(f"compiling {self.what} ...")
            t0 = time.perf_counter()
            self.compiled = self.fn.lower(*args).compile()
            self.seconds = time.perf_counter() - t0
            self.say(f"compiled {self.what} in {self.seconds:.1f} s")
        try:
            return self.compiled(*args)
        except TypeError:  # other shapes/dtypes/shardings than the first call: checked before running
            return self.fn(*args)
