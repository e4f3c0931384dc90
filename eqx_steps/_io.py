"""Atomic file writes: a crash mid-write leaves the previous version intact."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO


class WriteError(OSError):
    """A file that could not be written: its message names the file and the cause
    on one line (`cannot write '<path>': <cause>`); `errno` is the cause's. The
    command line reports it on one line with exit status 2."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_above(path: str) -> str | None:
    """The nearest folder of `path` that exists as a file, if any."""
    parent = os.path.dirname(path)
    while parent and parent != os.path.dirname(parent):
        if os.path.exists(parent):
            return None if os.path.isdir(parent) else parent
        parent = os.path.dirname(parent)
    return None


def _write_error(path: str, error: OSError) -> WriteError:
    cause = error.strerror or str(error) or type(error).__name__
    above = _file_above(path)
    if error.errno == errno.EISDIR or os.path.isdir(path):
        cause = "it is a folder; give a file name"
    elif above is not None:
        cause = f"{above!r} is a file, not a folder"
    elif error.errno == errno.ENOSPC:
        cause = "no space left on the device; free some space and run again"
    return WriteError(error.errno, f"cannot write {path!r}: {cause}")


def atomic_write(
    path: str | os.PathLike, data: bytes | Callable[[BinaryIO], object]
) -> None:
    """Write `path` through a temporary file in its folder, then `os.replace`.

    **Arguments:**

    - `path`: the file to write; its folder is created if needed.
    - `data`: the bytes to write, or a function that writes to a binary file.

    **Raises:**

    `WriteError` (an `OSError`) naming `path` and the cause when the file cannot
    be written (`path` is a folder, the disk is full, no permission); the
    temporary file is removed and a previous `path` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise WriteError(
            errno.EISDIR, f"cannot write {path!r}: it is a folder; give a file name"
        )
    directory = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_error(path, e) from e
        raise
