"""Adaptive DPM-Solver-12 and DPM-Solver-23 (Lu et al. 2022, sec. 3.3 and Appendix C): step-size control in the
log-SNR lambda from an embedded pair of singlestep DPM-Solvers.

Each trial step from lambda_s by h computes the order-k solution x_high and the order-(k-1) solution x_low that shares
its model calls (``solvers.dpm_solver.singlestep_pair``): k = 2 pairs DPM-Solver-2 (r1 = 1/2) with DPM-Solver-1,
k = 3 pairs DPM-Solver-3 (r1 = 1/3, r2 = 2/3) with DPM-Solver-2 at r1 = 1/3.  With the tolerance per element

    delta = max(atol, rtol * max(|x_low|, |x_prev|)),

the error is E = max over the batch of the RMS of (x_high - x_low) / delta; the step is accepted if E <= 1 (the state
becomes x_high), and the next trial step is h <- min(safety * h * E^{-1/k}, lambda_end - lambda_s) (safety = 0.9, the
paper's theta), starting from ``h_init``.  Defaults rtol = 0.05, atol = 0.0078 are the paper's (image data in [-1, 1]).

Cost: the model value at the current point is computed once and reused by every trial from there, so a trial costs
k - 1 calls and an accepted step one more (the value at its end); in all 1 + (accepted + rejected)(k - 1) +
(accepted - 1) calls.  (Lu et al.'s code re-evaluates the current point on a rejected trial; same steps, fewer calls.)
``prediction`` chooses DPM-Solver (``"eps"``, the paper's algorithm) or its DPM-Solver++ twin (``"x0"``).
"""
from __future__ import annotations

import math

import torch

from .base import NonFiniteError, register_adaptive
from .dpm_solver import Node, check_order, check_prediction, model_output, node_at_lambda, singlestep_pair


def _positive(v, name: str, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and
                                                                                                  not allow_zero):
        raise ValueError(f"dpm_adaptive's {name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")
    return float(v)


def _node(sde, t) -> Node:
    t = torch.tensor(float(t), dtype=torch.float64)
    a, s = sde.marginal_coeffs(t)
    return Node(t, float(a), float(s), float(sde.log_snr(t)))


@register_adaptive("dpm_adaptive", variants=[{"order": 2}, {"order": 3}])
def dpm_adaptive(ctx, x, t0, t1, order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                 safety: float = 0.9, prediction: str = "x0"):
    """Adaptive DPM-Solver-12 / -23 (Lu et al. 2022): embedded singlestep pair, step control in lambda."""
    order = check_order(order, (2, 3), "dpm_adaptive")
    rtol = _positive(rtol, "rtol", allow_zero=True)
    atol = _positive(atol, "atol")
    h = _positive(h_init, "h_init")
    safety = _positive(safety, "safety")
    if safety > 1:
        raise ValueError(f"dpm_adaptive's safety must lie in (0, 1], got {safety}")
    prediction = check_prediction(prediction)
    sde = ctx.sde
    start, end = _node(sde, t0), _node(sde, t1)
    if not end.lam > start.lam:
        raise ValueError(f"dpm_adaptive integrates towards the data: need log-SNR(t1) > log-SNR(t0), got t0={t0}, "
                         f"t1={t1}")
    span = end.lam - start.lam
    nt = start
    m0 = model_output(ctx, x, nt, prediction, None)
    accepted = rejected = 0
    h = min(h, span)
    while True:
        last = nt.lam + h >= end.lam - 1e-12 * max(1.0, abs(end.lam))
        ns = end if last else node_at_lambda(sde, nt.lam + h)
        x_high, x_low = singlestep_pair(ctx, prediction, None, x, m0, nt, ns, order)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x.abs()), min=atol)        # Lu et al. 2022, App. C
        err = ((x_high - x_low) / delta).reshape(x.shape[0], -1).pow(2).mean(1).sqrt().max()
        E = float(err)
        if not math.isfinite(E):
            raise NonFiniteError(f"dpm_adaptive: the error estimate became non-finite at lambda={nt.lam:.6g} (after "
                                 f"{ctx.nfe} network calls): check the model")
        if E <= 1.0:
            accepted += 1
            x = ctx.step_done(accepted - 1, ns.t, x_high, adaptive=True)
            nt = ns
            if last:
                break
            m0 = model_output(ctx, x, nt, prediction, None)
        else:
            rejected += 1
        # step-size update with safety factor theta (Lu et al. 2022, App. C): h <- theta h E^{-1/k}
        h = min(safety * h * (E ** (-1.0 / order) if E > 0 else math.inf), end.lam - nt.lam)
    return x, {"accepted": accepted, "rejected": rejected, "nfe": ctx.nfe}
