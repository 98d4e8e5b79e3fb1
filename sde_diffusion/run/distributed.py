"""Data-parallel training across processes with ``torch.distributed`` (gloo on CPU, NCCL on CUDA), started by torchrun.

``torchrun --nproc_per_node=K main.py --mode train ...`` starts K processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their environment; ``init_from_env`` joins them into one
process group.  Without those variables (or with ``WORLD_SIZE=1``) everything runs in one process and no collective
is ever called, so the single-process code path is unchanged.

Failures.  ``check(error, where)`` is a collective: every rank passes the exception it met (or None) and, when any
rank failed, every rank raises — the failing rank its own exception, the others a ``RankFailedError`` naming the rank
and its message — so the group stops together, at the same point, with one message (only rank 0 prints, see
``main.py``).  A failure outside these check points (a crash inside a collective) is torchrun's to tear down: the
remaining ranks see their collective fail (or time out after ``compute.dist_timeout`` seconds) and exit.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

__all__ = ["Context", "RankFailedError", "init_from_env", "current", "shutdown", "env_world", "run_sharded"]


class RankFailedError(RuntimeError):
    """Another rank of the process group failed; the message names it and says why."""


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------------------------- collectives
    def check(self, error: Optional[BaseException], where: str) -> None:
        """Collective: raise on every rank when any rank passes an exception (see the module docstring)."""
        if not self.enabled:
            if error is not None:
                raise error
            return
        import torch.distributed as dist
        message = None if error is None else (f"{type(error).__name__}: {str(error).splitlines()[0]}"
                                              if str(error) else type(error).__name__)
        messages: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(messages, message)
        failed = [r for r, m in enumerate(messages) if m is not None]
        if not failed:
            return
        if error is not None:
            error.reported_by_rank0 = self.rank != 0      # rank 0 prints the group's one message
            raise error
        first = failed[0]
        text = messages[first].split(": ", 1)[-1]
        e = RankFailedError(f"rank {first} of {self.world_size} failed during {where}: {text}")
        e.reported_by_rank0 = self.rank != 0
        raise e

    def any_flag(self, flag: bool) -> bool:
        """Collective: True on every rank when ``flag`` is set on any rank."""
        if not self.enabled:
            return bool(flag)
        import torch.distributed as dist
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def max_value(self, value: float) -> float:
        """Collective: the largest ``value`` over the ranks."""
        if not self.enabled:
            return float(value)
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sum_values(self, values: List[float]) -> List[float]:
        """Collective: the elementwise sum of ``values`` over the ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def gather(self, obj) -> Optional[list]:
        """Collective: the list of every rank's ``obj`` on every rank (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj=None):
        """Collective: rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, obj) -> Optional[list]:
        """Collective: the list of every rank's ``obj`` on rank 0 (None elsewhere; ``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


_CONTEXT = Context()


def env_world() -> Optional[tuple]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got RANK={os.environ.get('RANK')!r} "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} LOCAL_RANK={os.environ.get('LOCAL_RANK')!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK must lie in [0, WORLD_SIZE) with WORLD_SIZE >= 1, got RANK={rank}, "
                         f"WORLD_SIZE={world}")
    return rank, world, local


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> Context:
    """Join torchrun's process group (once per process) and return the context; one process: ``Context()``.

    ``device``: the config's / flag's device; ``auto`` or ``cuda`` picks NCCL and ``cuda:LOCAL_RANK`` when CUDA is
    available, otherwise gloo on the CPU."""
    global _CONTEXT
    world = env_world()
    if world is None or world[1] == 1:
        _CONTEXT = Context()
        return _CONTEXT
    import torch.distributed as dist
    rank, size, local = world
    if dist.is_initialized():           # joined earlier in this process (shutdown keeps the group)
        _CONTEXT = Context(rank=rank, world_size=size, local_rank=local, backend=dist.get_backend())
        return _CONTEXT
    use_cuda = torch.cuda.is_available() and str(device or "auto").split(":")[0] in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
    _CONTEXT = Context(rank=rank, world_size=size, local_rank=local, backend=backend)
    return _CONTEXT


def current() -> Context:
    return _CONTEXT


def synchronize() -> None:
    """A barrier across the ranks (no-op in one process): every rank reaches the end before any tears the group
    down.  Without it a rank that finishes early (e.g. "nothing to do") can destroy a gloo group while its peer is
    still connected, which aborts the peer ("terminate called without an active exception")."""
    if _CONTEXT.enabled:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()


_JOINED = False


def shutdown() -> None:
    """Leave the process group.  The group is not destroyed: destroying a gloo group while a peer that already
    passed the final barrier exits can abort this process ("terminate called without an active exception", from
    the group's threads); a process that was in a group ends with ``exit_process`` instead, which skips the C++
    destructors (``main.py`` does)."""
    global _CONTEXT, _JOINED
    if _CONTEXT.enabled:
        _JOINED = True
    _CONTEXT = Context()


def exit_process(code: int) -> None:
    """End a process that joined a process group at once with ``code`` (streams flushed, no C++ teardown: see
    ``shutdown``); a no-op for a process that never joined one."""
    if _JOINED:
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(code))


def rank_device(ctx: Context, device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run in a process group, else ``device``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def run_sharded(ctx: Context, indices, work, record, where: str, stop_message=None) -> None:
    """Run ``work(i)`` for every ``i`` of ``indices`` across the ranks and ``record(i, result)`` each result on rank 0,
    in the order of ``indices``.

    In one process: ``work``, ``record``, then ``lifecycle.check_stop(stop_message())`` for each index in turn.  In a
    process group (a collective: every rank passes the same ``indices``) the indices go in rounds of ``world_size``:
    in round r rank k works on ``indices[r * world_size + k]`` (the last round may leave ranks idle); the round's
    results are gathered on rank 0, which records them, then tells every rank how the round ended:

    * a failure on any rank (in ``work``, or in rank 0's ``record``) raises on every rank, the failing rank its own
      exception and the others a ``RankFailedError`` naming it: the group stops together with one message;
    * a graceful-stop request (SIGTERM / SIGINT, ``lifecycle``) on any rank raises ``lifecycle.Stopped`` on every
      rank with rank 0's ``stop_message()`` (``{signal}`` is replaced by the signal's name) once the round's results
      are recorded, so that a rerun resumes from them.

    ``work`` runs on the rank that drew the index, so its result must be picklable (NumPy arrays, numbers) and its
    randomness must depend on the index only (a seed per index): then the results do not depend on the world size.
    """
    from . import lifecycle
    indices = list(indices)
    message = stop_message or (lambda: f"stopped by {{signal}} during {where}")
    if not ctx.enabled:
        for i in indices:
            record(i, work(i))
            lifecycle.check_stop(message())
        return
    W = ctx.world_size
    for start in range(0, len(indices), W):
        chunk = indices[start:start + W]
        mine = chunk[ctx.rank] if ctx.rank < len(chunk) else None
        result, error = None, None
        if mine is not None:
            try:
                result = work(mine)
            except Exception as e:          # handed to every rank below; signals and aborts propagate as they are
                error = e
        gathered = ctx.gather_to_main((mine, result, None if error is None else _one_line(error),
                                       lifecycle.stop_requested()))
        status = None
        if ctx.is_main:
            failed = [(r, m) for r, (_, _, m, _) in enumerate(gathered) if m is not None]
            own = None
            if not failed:
                try:
                    for i, res, _, _ in gathered:
                        if i is not None:
                            record(i, res)
                except Exception as e:
                    own, failed = e, [(0, _one_line(e))]
            signals = [s for *_, s in gathered if s is not None]
            status = {"failed": failed[0] if failed else None,
                      "stop": signals[0] if signals and not failed else None,
                      "message": message() if signals and not failed else None}
            if own is not None:
                error = own
        status = ctx.broadcast(status)
        if status["failed"] is not None:
            rank, text = status["failed"]
            if rank == ctx.rank and error is not None:
                error.reported_by_rank0 = ctx.rank != 0
                raise error
            e = RankFailedError(f"rank {rank} of {W} failed during {where}: {text.split(': ', 1)[-1]}")
            e.reported_by_rank0 = ctx.rank != 0
            raise e
        if status["stop"] is not None:
            signum = int(status["stop"])
            raise lifecycle.Stopped(signum, status["message"].replace("{signal}", lifecycle.signal_name(signum)))
