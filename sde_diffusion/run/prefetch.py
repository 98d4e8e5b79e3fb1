"""Training batches assembled ahead of the loop (``compute.dataloader_workers``, ``compute.pin_memory``).

The datasets are in memory and ``dataset.batch(step, batch_size, seed)`` is a pure function of its arguments (its
index permutation, flips and dequantisation noise come from generators seeded by ``(seed, step)``, never from the
global RNG), so the batches of the next steps can be built by background threads and the loop receives exactly the
batches it would have built itself.  That is what a ``DataLoader`` with workers would buy here: a ``DataLoader``
over these tensors adds process start-up and pickling for nothing, so threads it is (the work is torch indexing and
elementwise ops, which release the GIL).  ``pin`` puts each batch in page-locked memory, so that
``.to(cuda, non_blocking=True)`` overlaps the copy with compute; it applies on CUDA only.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Tuple

import torch

__all__ = ["BatchSource"]


class BatchSource:
    """``get(step) -> (x, y)`` = ``dataset.batch(step, batch_size, seed)``, built up to ``workers`` steps ahead by
    ``workers`` threads (``workers = 0``: built on call, in the caller's thread).  Steps are requested in increasing
    order (a resumed run starts at its checkpoint's step); ``close()`` (or ``with``) stops the threads."""

    def __init__(self, dataset, batch_size: int, seed: int, workers: int = 0, pin: bool = False):
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.workers = max(0, int(workers))
        self.pin = bool(pin) and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="batches") if self.workers else None
        self._pending: Dict[int, Future] = {}

    def _build(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dataset.batch(step, self.batch_size, self.seed)
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def get(self, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        step = int(step)
        if self._pool is None:
            return self._build(step)
        for s in [s for s in self._pending if s < step]:        # a skipped step (none in the loop): drop it
            self._pending.pop(s).cancel()
        for s in range(step, step + self.workers + 1):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self._build, s)
        return self._pending.pop(step).result()

    def close(self):
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
