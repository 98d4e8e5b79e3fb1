"""Atomic file writes: write to a temporary file in the target's folder, then ``os.replace`` it onto the target, so a
crash or an error never leaves a half-written checkpoint, cache or sample file behind (the old file, if any, stays).

Temporary files are named ``.tmp-<target name>-<random>[suffix]`` (``TEMP_PREFIX``): a process killed mid-write
leaves one behind, and ``remove_stale_temp_files`` (called at start-up by the process that holds the workdir's lock)
removes them.  An ``OSError`` while writing (disk full, permission denied, read-only file system, file too large) is
re-raised as ``WriteError``, an ``OSError`` whose message names the target path and the cause, after the temporary
file has been removed.
"""
from __future__ import annotations

import contextlib
import errno as errno_lib
import glob
import os
import tempfile
from typing import Iterable, List

__all__ = ["atomic_path", "atomic_write_text", "atomic_write_bytes", "WriteError", "remove_stale_temp_files",
           "TEMP_PREFIX"]

TEMP_PREFIX = ".tmp-"


class WriteError(OSError):
    """Writing ``path`` failed; ``str(e)`` is one line: the path and the cause (e.g. 'No space left on device')."""

    def __init__(self, path: str, cause: BaseException):
        code = getattr(cause, "errno", None)
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        name = errno_lib.errorcode.get(code) if isinstance(code, int) else None
        super().__init__(code, reason)
        self.path = path
        self.cause = reason
        self.errno_name = name
        self._message = f"cannot write {path}: {reason}" + (f" ({name})" if name else "")

    def __str__(self) -> str:
        return self._message


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "", durable: bool = False):
    """Yield a temporary path next to ``path`` (ending in ``suffix``, e.g. ``.npz`` or ``.png`` for writers that look
    at the extension); when the block finishes it replaces ``path``; when it raises, the temporary file is removed.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600.  ``durable``: also fsync the
    folder after the rename (the new name survives a power cut).  Any ``OSError`` becomes a ``WriteError`` naming
    ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX + os.path.basename(path) + "-", suffix=suffix)
            os.close(fd)
        except OSError as e:
            raise WriteError(path, e) from e
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except WriteError:
            raise
        except OSError as e:
            raise WriteError(path, e) from e
        if durable:
            _fsync_dir(folder)
    finally:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass


def atomic_write_bytes(data: bytes, path: str, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, fsynced before the rename (and the folder after it when ``durable``)."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(text: str, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def remove_stale_temp_files(folders: Iterable[str], recursive: bool = False) -> List[str]:
    """Delete the ``.tmp-*`` files left in ``folders`` (and below them when ``recursive``) by killed processes; returns
    the paths removed.  Call it only while holding the lock of the workdir they belong to, or another process's file
    in the making could be deleted."""
    removed = []
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        pattern = os.path.join(folder, "**", TEMP_PREFIX + "*") if recursive else os.path.join(folder, TEMP_PREFIX + "*")
        for path in glob.glob(pattern, recursive=recursive):
            if os.path.isfile(path) or os.path.islink(path):
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed
