"""Atomic output folders: everything is written into `OUT.tmp-xxxx` beside OUT and renamed at the end,
so an interrupted or failed import/export never leaves a folder that looks complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def check_out_dir(out_dir: str, overwrite: bool) -> str:
    """Absolute OUT path; ValueError if it exists (and is not empty) without `overwrite`."""
    out = os.path.abspath(out_dir)
    if os.path.exists(out) and not overwrite and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"output folder {out} already exists; choose a new path or pass --overwrite")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise ValueError(f"the parent folder of {out} does not exist")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a fresh temporary folder next to `out_dir`; on success it replaces `out_dir`
    (renames are atomic on one filesystem), on any error it is deleted."""
    out = check_out_dir(out_dir, overwrite)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        yield tmp
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
