"""Atomic file writes: write to a temporary file in the target's folder, then ``os.replace`` it onto the target, so a
crash or an error never leaves a half-written checkpoint, cache or sample file behind (the old file, if any, stays)."""
from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_path", "atomic_write_text"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
    """Yield a temporary path next to ``path`` (ending in ``suffix``, e.g. ``.npz`` or ``.png`` for writers that look
    at the extension); when the block finishes it replaces ``path``; when it raises, the temporary file is removed.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path) + "-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(text: str, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
