"""Temporary files and folders that become user-visible output, with the permissions a normal write gets.

Atomic writes create a temporary file or folder next to the target and rename it into place.
`tempfile.mkstemp` / `mkdtemp` create them private (0600 / 0700) by design, and the rename keeps
those bits: an exported HF folder, a dataset_statistics.json written next to a user's data or a
cached tokenizer would end up unreadable to the rest of the group. `mkstemp` / `mkdtemp` here are the
same calls followed by a chmod to what `open()` / `os.makedirs` would have made under the process's
umask (0644 / 0755 with the usual 022).
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Tuple


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic with respect to other threads)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def mkstemp(dir: str, prefix: Optional[str] = None, suffix: Optional[str] = None) -> Tuple[int, str]:
    """`tempfile.mkstemp` whose file has a normal file's permissions. -> (fd, path)."""
    fd, path = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    os.fchmod(fd, file_mode())
    return fd, path


def mkdtemp(dir: str, prefix: Optional[str] = None) -> str:
    """`tempfile.mkdtemp` whose folder has a normal folder's permissions."""
    path = tempfile.mkdtemp(dir=dir, prefix=prefix)
    os.chmod(path, dir_mode())
    return path
