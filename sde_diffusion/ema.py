"""Exponential moving average of a model's weights (Polyak averaging), kept as a full copy of the module.

decay_k = min(decay, (1 + k) / (10 + k)) at update k (score_sde's warm-up), so short runs are not dominated by the
random initialisation.  ``ema.model`` is an ordinary module: sample and evaluate with it.

``foreach=True`` (the default) updates every parameter in one ``torch._foreach_lerp_`` call (fewer kernel launches,
~1.2x faster on CPU); it computes the same ``p_ema + (1 - d) (p - p_ema)`` per element as the per-tensor loop
(``foreach=False``), which tests check.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ExponentialMovingAverage:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, foreach: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.foreach = bool(foreach) and hasattr(torch, "_foreach_lerp_")
        self.num_updates = 0
        self.model = copy.deepcopy(model)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(f"the EMA holds {len(ema_params)} parameters, the model {len(params)}")
        if self.foreach and ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:
            for p_ema, p in zip(ema_params, params):
                p_ema.lerp_(p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self):
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.model.load_state_dict(state["model"])
