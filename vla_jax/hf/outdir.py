"""Atomic output folders: everything is written into `OUT.tmp-xxxx` beside OUT and renamed at the end,
so an interrupted or failed import/export never leaves a folder that looks complete.

Missing parent folders of OUT are created (and removed again if the write fails); OUT and its
files get the permissions a plain `mkdir`/`open` would give them (vla_jax.permissions), not the
private 0700 of a temporary folder."""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Iterator, List

from vla_jax import permissions


def check_out_dir(out_dir: str, overwrite: bool) -> str:
    """Absolute OUT path; ValueError if it exists (and is not an empty folder) without `overwrite`,
    or if something on its path is a file."""
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output folder {out} already exists; choose a new path or pass --overwrite")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create output folder {out}: {parent} is a file, not a folder")
    return out


def _make_parents(path: str) -> List[str]:
    """Creates the missing ancestors of `path`; returns them, deepest first."""
    created, parent = [], os.path.dirname(path)
    while not os.path.isdir(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(created):
        os.mkdir(d)
    return created


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder next to `out_dir`; on success it replaces `out_dir`
    (renames are atomic on one filesystem), on any error it is deleted, with any parent folders
    this call created."""
    out = check_out_dir(out_dir, overwrite)
    created = _make_parents(out)
    tmp = None
    try:
        tmp = permissions.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
        yield tmp
        if os.path.exists(out):
            old = permissions.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # deepest first; only while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
