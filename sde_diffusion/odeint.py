"""Integrators for dx/dt = F(x, t) on torch tensors, shared by the probability-flow sampler (``solvers/ode.py``) and
the likelihood (``likelihood.py``, which integrates the state augmented with the divergence).

``rk_step`` is one explicit Runge–Kutta step of size h = s - t (either sign): ``euler`` (order 1), ``heun`` (order 2)
or the classical ``rk4`` (order 4).  ``rk45`` integrates the whole tensor as one system with scipy's adaptive
Dormand–Prince ``solve_ivp`` (float64 on the CPU, as score_sde does) and returns the state at t1.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

Tensor = torch.Tensor
VectorField = Callable[[Tensor, float], Tensor]

__all__ = ["FIXED_STEP_METHODS", "rk_step", "rk45"]

FIXED_STEP_METHODS = ("euler", "heun", "rk4")


def rk_step(F: VectorField, x: Tensor, t: float, s: float, method: str) -> Tensor:
    """One ``method`` step of dx/dt = F(x, t) from t to s (1, 2 or 4 evaluations of F)."""
    h = s - t
    if method == "euler":
        return x + h * F(x, t)
    if method == "heun":
        k1 = F(x, t)
        k2 = F(x + h * k1, s)
        return x + 0.5 * h * (k1 + k2)
    if method == "rk4":
        mid = t + 0.5 * h
        k1 = F(x, t)
        k2 = F(x + 0.5 * h * k1, mid)
        k3 = F(x + 0.5 * h * k2, mid)
        k4 = F(x + h * k3, s)
        return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown fixed-step method {method!r}; available: {', '.join(FIXED_STEP_METHODS)}")


def rk45(F: VectorField, x: Tensor, t0: float, t1: float, rtol: float, atol: float,
         on_eval: Optional[Callable[[float, Tensor], None]] = None, return_stats: bool = False):
    """x(t1) for dx/dt = F(x, t), x(t0) = x, by adaptive RK45 with tolerances ``rtol``/``atol``.

    ``on_eval(t, x_t)`` is called after every evaluation of F.  With ``return_stats`` returns ``(x(t1), stats)``,
    stats = {"accepted", "rejected", "nfev"} (Dormand–Prince costs 6 new evaluations per attempted step after the 2 of
    the initial step-size selection).  Raises ``ValueError`` for non-positive tolerances and ``FloatingPointError``
    when the integration fails (e.g. the field stops being finite)."""
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    from scipy.integrate import solve_ivp

    shape, dtype, device = x.shape, x.dtype, x.device

    def fun(t, y):
        xt = torch.from_numpy(y).reshape(shape).to(dtype=dtype, device=device)
        v = F(xt, float(t))
        if on_eval is not None:
            on_eval(float(t), xt)
        return v.detach().to("cpu", torch.float64).reshape(-1).numpy()

    y0 = x.detach().to("cpu", torch.float64).reshape(-1).numpy()
    sol = solve_ivp(fun, (float(t0), float(t1)), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise FloatingPointError(f"adaptive RK45 failed between t={t0} and t={t1}: {sol.message}")
    out = torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape).to(dtype=dtype, device=device)
    if not return_stats:
        return out
    accepted = len(sol.t) - 1
    return out, {"accepted": accepted, "rejected": max(0, (int(sol.nfev) - 2) // 6 - accepted),
                 "nfev": int(sol.nfev)}
