"""Adaptive SDE solver of Jolicoeur-Martineau et al. (2021), "Gotta Go Fast When Generating Data with Score-Based
Models", Algorithm 1: an Euler–Maruyama / improved-Euler pair on the reverse-time SDE with step-size control.

The reverse SDE dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dW_bar is written F(x, t) = f - g^2 s (forward-time form), so
a step of size h > 0 from t down to t - h with one Brownian increment dW (= sqrt(h) z in the paper) is

    x'  = x - h F(x, t)       + g(t)     dW          (Euler–Maruyama; Algorithm 1)
    x~  = x - h F(x', t - h)  + g(t - h) dW          (the same increment)
    x'' = (x' + x~) / 2                              (improved Euler)

with the mixed tolerance delta = max(eps_abs, eps_rel max(|x'|, |x'_prev|)) (elementwise) and the scaled error
E = ||(x' - x'') / delta||_2 / sqrt(n), n the number of entries.  The step is accepted when E <= 1 (x <- x'',
t <- t - h, x'_prev <- x': the higher-order estimate is kept), and in either case the next step is
h <- min(t - t1, theta h E^{-r}).  Two network calls per attempt, accepted or not.

Two choices differ from the paper, both measured:

* **One step size for the batch** (E = the largest per-sample error).  The paper controls each sample on its own; with
  a fresh draw after every rejection, the rejection of a step depends on that sample's own noise and biases it:
  sampling N(0.5, 0.3) in 1-D per sample gave a variance of 0.65.  A shared step keeps one contract (one step
  sequence, ``accepted + rejected`` attempts, 2 calls each).
* **Rejection with memory** (Rackauckas & Nie 2017, "Adaptive methods for stochastic differential equations via
  natural embeddings and rejection sampling with memory", RSwM): the Brownian increments already drawn are kept as a
  queue of future segments (length L, increment dW) and a rejected increment is never thrown away; a shorter retry
  takes the part of a segment it covers from the Brownian bridge, dW_a = (r/L) dW + sqrt(r (L - r) / L) xi (their
  eq. 8), and leaves dW - dW_a for later.  The path is then an exact Brownian path whatever the rejections, so the
  sampler's law does not depend on the batch size (without memory a batch of 1 is as biased as per-sample control).
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .base import NonFiniteError, register_adaptive

__all__ = ["adaptive_sde"]


def _reverse_drift(ctx, x, t: float):
    """F(x, t) = f(x, t) - g(t)^2 s(x, t): one network call (Song et al. 2021, eq. 6, in forward-time form)."""
    tt = torch.tensor(t, dtype=torch.float64)          # a float64 time (a Python float would pass as float32)
    g2 = torch.as_tensor(ctx.sde.diffusion(tt), dtype=x.dtype, device=x.device) ** 2
    return ctx.sde.drift(x, tt) - g2 * ctx.predict(x, tt).score


class _BrownianQueue:
    """Brownian increments already drawn ahead of the current time, as segments (length, increment), nearest first
    (Rackauckas & Nie 2017, RSwM): ``take(h)`` returns the increment over the next h, ``give_back`` returns a rejected
    one to the queue."""

    def __init__(self, ctx, like: torch.Tensor):
        self.ctx, self.like = ctx, like
        self.segments: List[Tuple[float, torch.Tensor]] = []

    def take(self, h: float):
        used, r = [], h
        while self.segments and r > 0:
            L, w = self.segments.pop(0)
            if L <= r * (1 + 1e-12):
                used.append((L, w))
                r -= L
            else:   # the part of the segment inside the step, from the Brownian bridge (RSwM, eq. 8)
                wa = (r / L) * w + math.sqrt(r * (L - r) / L) * self.ctx.noise(self.like)
                used.append((r, wa))
                self.segments.insert(0, (L - r, w - wa))
                r = 0.0
        if r > 1e-12 * h:
            used.append((r, math.sqrt(r) * self.ctx.noise(self.like)))      # fresh path: sqrt(h) z
        dW = used[0][1]
        for _, w in used[1:]:
            dW = dW + w
        return dW, used

    def give_back(self, used):
        self.segments = list(used) + self.segments


@register_adaptive("adaptive_sde", variants=[{"eps_rel": 0.1, "eps_abs": 0.01}, {"eps_rel": 0.05},
                                             {"eps_rel": 0.02, "eps_abs": 0.002}], stochastic=True)
def adaptive_sde(ctx, x, t0, t1, eps_abs: float = 0.0078, eps_rel: float = 0.05, theta: float = 0.9,
                 r: float = 0.9, h_init: float = 0.01, max_steps: int = 100_000):
    """Adaptive EM / improved-Euler pair on the reverse SDE (Gotta Go Fast, Algorithm 1; batch-level error)."""
    eps_abs, eps_rel, theta, r, h_init = (float(v) for v in (eps_abs, eps_rel, theta, r, h_init))
    if not (math.isfinite(eps_abs) and eps_abs >= 0 and math.isfinite(eps_rel) and eps_rel >= 0) \
            or eps_abs + eps_rel <= 0:
        raise ValueError(f"adaptive_sde needs eps_abs >= 0 and eps_rel >= 0, not both zero; got {eps_abs}, {eps_rel}")
    if not 0 < theta <= 1:
        raise ValueError(f"adaptive_sde's safety factor theta must lie in (0, 1], got {theta}")
    if not 0 < r <= 2:
        raise ValueError(f"adaptive_sde's exponent r must lie in (0, 2], got {r}")
    if not (math.isfinite(h_init) and h_init > 0):
        raise ValueError(f"adaptive_sde's h_init must be a positive number, got {h_init}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"adaptive_sde's max_steps must be a positive integer, got {max_steps!r}")
    t0, t1 = float(t0), float(t1)
    if not t0 > t1:
        raise ValueError(f"adaptive_sde integrates from t0 down to t1 < t0, got t0={t0}, t1={t1}")

    n = x[0].numel()
    t, h = t0, min(h_init, t0 - t1)
    x_prev = x                                    # x'_prev <- x (Algorithm 1)
    bm = _BrownianQueue(ctx, x)
    accepted = rejected = 0
    while t > t1:
        if accepted + rejected >= max_steps:
            raise RuntimeError(f"adaptive_sde did not reach t1={t1:g} in {max_steps} attempts (t = {t:.3g}): "
                               f"loosen eps_rel / eps_abs or raise max_steps")
        s = t1 if h >= t - t1 else t - h          # land exactly on t1
        h = t - s
        dW, used = bm.take(h)
        g_t = float(ctx.sde.diffusion(t))
        g_s = float(ctx.sde.diffusion(s))
        x1 = x - h * _reverse_drift(ctx, x, t) + g_t * dW                 # Euler–Maruyama
        x_tilde = x - h * _reverse_drift(ctx, x1, s) + g_s * dW           # the same increment
        x2 = 0.5 * (x1 + x_tilde)                                         # improved Euler
        delta = torch.clamp(eps_rel * torch.maximum(x1.abs(), x_prev.abs()), min=eps_abs)
        E_ps = torch.sqrt(((x1 - x2) / delta).pow(2).flatten(1).sum(1) / n)   # ||(x' - x'')/delta||_2 / sqrt(n)
        E = float(E_ps.max())                     # batch-level: the worst sample decides
        if not math.isfinite(E):
            raise NonFiniteError(f"adaptive_sde: the error estimate became non-finite at t={t:.3g} (after "
                                 f"{ctx.nfe} network calls): check the model")
        if E <= 1:                                # accept: x <- x'', t <- t - h, x'_prev <- x'
            x, x_prev, t = x2, x1, s
            accepted += 1
            x = ctx.step_done(accepted + rejected - 1, t, x, adaptive=True)
        else:
            bm.give_back(used)                    # the path is kept (RSwM)
            rejected += 1
        h = min(t - t1, theta * h * max(E, 1e-12) ** (-r))   # h <- min(t - eps, theta h E^{-r})
    return x, {"accepted": accepted, "rejected": rejected}
