"""Process life cycle of the loops: one exclusive lock per workdir and graceful stops on SIGTERM / SIGINT.

Workdir lock.  ``WorkdirLock(workdir, "train")`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.lock-train``
and writes its PID into it; a second process asking for the same lock gets ``WorkdirLockedError`` naming the PID that
holds it.  The kernel releases the lock when the holder exits, however it exits (SIGKILL included), so a stale lock
file never blocks anyone: only a live holder does.  On release the file is emptied (left in place: deleting it would
let two processes lock two different files of the same name).  ``train`` and ``eval`` take separate locks, so an
evaluation may read the checkpoints of a running training.

Signals.  Inside ``handle_signals("graceful")`` the first SIGTERM or SIGINT only sets a flag: the loop finishes its
current unit of work (a training update, an evaluation batch), writes its state and raises ``Stopped`` from
``check_stop()``; a second signal raises ``Aborted`` at once (at the next Python instruction: temporary files are
removed on the way out, nothing half-written is left).  Inside ``handle_signals("abort")`` the first signal already
raises ``Aborted`` (work that cannot be resumed: sampling).  Both exceptions derive from ``BaseException`` (like
``KeyboardInterrupt``), so ``except Exception`` clauses do not swallow them; ``exit_code`` is 128 + the signal number
(143 for SIGTERM, 130 for SIGINT), what shells and schedulers expect.

For a loop outside this package (e.g. the sampler loop in ``run/sampling.py``), calling ``check_stop(what)`` after
each finished unit turns a first signal into a ``Stopped`` there.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
from typing import Optional

from ..atomic import WriteError

__all__ = ["WorkdirLock", "WorkdirLockedError", "Interrupted", "Stopped", "Aborted", "handle_signals",
           "check_stop", "stop_requested", "signal_name", "HANDLED_SIGNALS"]

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive, non-blocking OS lock on ``<workdir>/.lock-<purpose>``; use as a context manager."""

    def __init__(self, workdir: str, purpose: str = "train"):
        self.workdir = workdir
        self.purpose = purpose
        self.path = os.path.join(workdir, f".lock-{purpose}")
        self._fd: Optional[int] = None

    def acquire(self) -> "WorkdirLock":
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WriteError(self.path, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"process {holder}" if holder.isdigit() else "another process"
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use: {who} holds its {self.purpose} lock ({self.path}); wait for "
                    f"it to finish or stop it (kill {holder or '<pid>'}), or use another --workdir") from None
            raise WriteError(self.path, e) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError as e:
            os.close(fd)
            raise WriteError(self.path, e) from e
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


# ------------------------------------------------------------------------------------------------ signals
def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(BaseException):
    """A stop caused by a signal; ``exit_code`` = 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + int(signum)

    def __str__(self) -> str:
        return str(self.args[0])


class Stopped(Interrupted):
    """The first signal, honoured at a unit boundary after the state was saved."""


class Aborted(Interrupted):
    """A signal that stopped the process at once (the second one, or the first where nothing can be resumed)."""


class _State:
    mode: Optional[str] = None
    requested: Optional[int] = None
    context: str = ""


_state = _State()


def _handler(signum, frame):   # noqa: ARG001 — signal handler signature
    first = _state.requested
    if _state.mode == "graceful" and first is None:
        _state.requested = signum           # honoured by check_stop() at the next unit boundary
        return
    what = _state.context or "running"
    if first is not None:
        msg = (f"aborted by a second signal ({signal_name(signum)} after {signal_name(first)}) while {what}: "
               f"stopped at once; the files written before it are intact")
    else:
        msg = f"interrupted by {signal_name(signum)} while {what}: stopped at once (no file is left half-written)"
    raise Aborted(signum, msg)


@contextlib.contextmanager
def handle_signals(mode: str = "graceful", context: str = ""):
    """Install the SIGTERM / SIGINT handlers for the block (``graceful`` or ``abort``); the previous handlers, mode
    and context come back afterwards (a pending request is forgotten when the outermost block ends).  Only the main
    thread can install handlers; elsewhere the block runs unchanged."""
    if mode not in ("graceful", "abort"):
        raise ValueError(f"mode must be 'graceful' or 'abort', got {mode!r}")
    try:
        previous = {s: signal.getsignal(s) for s in HANDLED_SIGNALS}
        for s in HANDLED_SIGNALS:
            signal.signal(s, _handler)
    except ValueError:          # not the main thread
        yield _state
        return
    saved_mode, saved_context = _state.mode, _state.context
    _state.mode, _state.context = mode, context or saved_context
    try:
        yield _state
    finally:
        _state.mode, _state.context = saved_mode, saved_context
        if saved_mode is None:
            _state.requested = None
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def stop_requested() -> Optional[int]:
    """The signal number of a pending graceful-stop request, or None."""
    return _state.requested


def check_stop(message: str) -> None:
    """Raise ``Stopped`` with ``message`` (``{signal}`` is replaced by the signal's name) if a stop was requested."""
    if _state.requested is not None:
        signum = _state.requested
        raise Stopped(signum, message.replace("{signal}", signal_name(signum)))
