"""Atomic file writes: readers see the old file or the new one, never a partial one.

Every file sciddiff writes (checkpoints, SDF / XYZ, NetCDF, JSON and Markdown reports, PNG plots,
data caches) goes through ``atomic_write``: the data go to a fresh temporary name in the target's
directory (the same file system, so the rename is atomic), are flushed to disk (``fsync``), then
``os.replace`` puts them in place and the directory is fsync'ed so the rename itself survives a
crash. Standard library only (the engine may use it).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, mkdir: bool = False) -> Path:
    """Call ``write(tmp)`` on a fresh temporary path beside ``path``, fsync it, then ``os.replace`` it
    onto ``path``; returns ``Path(path)``.

    On any exception (``KeyboardInterrupt`` included) the temporary file is removed and ``path`` is
    left as it was. The file gets the usual permissions (``0o666`` less the umask), also when
    ``write`` makes 0600 files (as ``mkstemp`` does). ``mkdir=True`` first creates missing parent
    folders; otherwise a missing folder raises ``FileNotFoundError``.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, mkdir: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see ``atomic_write``); returns ``Path(path)``."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), mkdir=mkdir)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only be read
    by setting it, which would briefly change it for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
