"""Content checksums of checkpoint step folders: written once a save has completed, verified before
a checkpoint is restored or called good.

`WORKDIR/checkpoints/<step>/vla_jax_checksums.json` holds the size and SHA-256 of every file of the
step folder (orbax's own files included) and whether the saved state was finite. A step folder
without it was never completed by vla_jax (the run stopped between orbax's commit and the checksum)
or was written by an older version: it cannot be verified. `verify` returns why a folder fails in
one line naming the file (missing, truncated, changed) so callers can say which checkpoint they
skip and why. The hash costs one read of the folder (BENCHMARKS.md, "checkpoint checksums").
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Optional

CHECKSUM_FILE = "vla_jax_checksums.json"
ALGORITHM = "sha256"
_BLOCK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the step folder and the file."""


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _files(step_dir: str) -> Dict[str, str]:
    """{relative path with '/': absolute path} of every regular file under `step_dir` but the checksum file."""
    out = {}
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, step_dir).replace(os.sep, "/")
            if rel != CHECKSUM_FILE:
                out[rel] = full
    return out


def write_checksums(step_dir: str, finite: Optional[bool]) -> dict:
    """Hashes every file of the completed step folder and writes CHECKSUM_FILE atomically.
    finite: whether every floating-point value of the saved state was finite (None: not known)."""
    step_dir = os.fspath(step_dir)
    record = {"algorithm": ALGORITHM, "finite": finite,
              "files": {rel: {"size": os.path.getsize(full), ALGORITHM: file_digest(full)}
                        for rel, full in _files(step_dir).items()}}
    fd, tmp = tempfile.mkstemp(dir=step_dir, prefix=".checksums-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=0)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return record


def read_checksums(step_dir: str) -> dict:
    """The checksum record of `step_dir`; CheckpointError when it is absent or unreadable."""
    path = os.path.join(os.fspath(step_dir), CHECKSUM_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"{CHECKSUM_FILE} is missing: the save did not complete (or an older vla_jax "
                              f"wrote it), so its content cannot be verified")
    try:
        with open(path) as f:
            record = json.load(f)
        files = record["files"]
        if record.get("algorithm") != ALGORITHM or not isinstance(files, dict):
            raise ValueError(f"algorithm {record.get('algorithm')!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{CHECKSUM_FILE} is unreadable ({type(e).__name__}: {e})") from None
    return record


def verify(step_dir: str) -> Optional[str]:
    """None when every file of `step_dir` matches its checksum record and the state was finite; else
    one line saying what is wrong (naming the file). Reads the whole folder."""
    step_dir = os.fspath(step_dir)
    try:
        record = read_checksums(step_dir)
    except CheckpointError as e:
        return str(e)
    present = _files(step_dir)
    for rel, want in sorted(record["files"].items()):
        full = present.get(rel)
        if full is None:
            return f"{rel} is missing (deleted after the save)"
        size = os.path.getsize(full)
        if size != want["size"]:
            how = "truncated" if size < want["size"] else "longer than written"
            return f"{rel} is {size} bytes, {want['size']} were written ({how})"
        try:
            digest = file_digest(full)
        except OSError as e:
            return f"{rel} cannot be read ({e})"
        if digest != want[ALGORITHM]:
            return f"{rel} differs from what was written (same size, {ALGORITHM} mismatch: corrupted)"
    if record.get("finite") is False:
        return "the saved state holds NaN/inf values"
    return None
