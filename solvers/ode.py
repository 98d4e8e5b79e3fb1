"""Probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song et al. 2021, eq. 13), integrated from T to eps.

Fixed-step ``euler`` (order 1, 1 NFE/step), ``heun`` (order 2, 2 NFE/step; the default, as in EDM) and classical
``rk4`` (order 4, 4 NFE/step) on the time grid, or adaptive ``rk45`` (scipy ``solve_ivp``, Dormand–Prince, with
``rtol``/``atol``; one system for the whole batch, as in score_sde; ``num_steps`` is then ignored).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import NonFiniteError, register_sampler

__all__ = ["ode_step"]

_FIXED = ("euler", "heun", "rk4")


def ode_step(velocity, x, t, s, solver: str):
    """One step of size h = s - t (< 0) of dx/dt = velocity(x, t)."""
    h = s - t
    if solver == "euler":
        return x + h * velocity(x, t)
    if solver == "heun":
        k1 = velocity(x, t)
        k2 = velocity(x + h * k1, s)
        return x + 0.5 * h * (k1 + k2)
    if solver == "rk4":
        mid = t + 0.5 * h
        k1 = velocity(x, t)
        k2 = velocity(x + 0.5 * h * k1, mid)
        k3 = velocity(x + 0.5 * h * k2, mid)
        k4 = velocity(x + h * k3, s)
        return x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown ODE solver {solver!r}; available: {', '.join(_FIXED + ('rk45',))}")


@register_sampler("ode", variants=[{"solver": s} for s in _FIXED + ("rk45",)],
                  fixed_steps=lambda opts: opts.get("solver", "heun") != "rk45")
def ode(ctx, x, timesteps, solver: str = "heun", rtol: float = 1e-5, atol: float = 1e-5):
    """Probability-flow ODE: fixed-step Euler / Heun / RK4, or adaptive RK45 (scipy) with rtol/atol."""
    rsde = ctx.sde.reverse(ctx.score, probability_flow=True)

    def velocity(y, t):
        return rsde.drift(y, torch.as_tensor(t, dtype=y.dtype, device=y.device))

    if solver in _FIXED:
        for i in range(len(timesteps) - 1):
            t, s = float(timesteps[i]), float(timesteps[i + 1])
            x = ode_step(velocity, x, t, s, solver)
            x = ctx.step_done(i, s, x)
        return x
    if solver != "rk45":
        raise ValueError(f"unknown ODE solver {solver!r}; available: {', '.join(_FIXED + ('rk45',))}")
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    from scipy.integrate import solve_ivp

    shape, dtype, device = x.shape, x.dtype, x.device

    def fun(t, y):
        yt = torch.from_numpy(y).reshape(shape).to(dtype=dtype, device=device)
        v = velocity(yt, t)
        ctx.step_done(ctx.nfe - 1, t, yt, adaptive=True)
        return v.detach().to("cpu", torch.float64).reshape(-1).numpy()

    t0, t1 = float(timesteps[0]), float(timesteps[-1])
    y0 = x.detach().to("cpu", torch.float64).reshape(-1).numpy()
    sol = solve_ivp(fun, (t0, t1), y0, method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise NonFiniteError(f"adaptive RK45 failed between t={t0} and t={t1}: {sol.message}")
    return torch.from_numpy(np.ascontiguousarray(sol.y[:, -1])).reshape(shape).to(dtype=dtype, device=device)
