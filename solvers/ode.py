"""Probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song et al. 2021, eq. 13), integrated from T to eps.

Fixed-step ``euler`` (order 1, 1 NFE/step), ``heun`` (order 2, 2 NFE/step; the default, as in EDM) and classical
``rk4`` (order 4, 4 NFE/step) on the time grid, or adaptive ``rk45`` (scipy ``solve_ivp``, Dormand–Prince, with
``rtol``/``atol``; one system for the whole batch, as in score_sde; ``num_steps`` is then ignored).
"""
from __future__ import annotations

import torch

from sde_diffusion.odeint import FIXED_STEP_METHODS, rk45, rk_step

from .base import NonFiniteError, register_sampler

_FIXED = FIXED_STEP_METHODS


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
            x = rk_step(velocity, x, t, s, solver)
            x = ctx.step_done(i, s, x)
        return x
    if solver != "rk45":
        raise ValueError(f"unknown ODE solver {solver!r}; available: {', '.join(_FIXED + ('rk45',))}")
    t0, t1 = float(timesteps[0]), float(timesteps[-1])
    try:
        return rk45(velocity, x, t0, t1, rtol, atol,
                    on_eval=lambda t, y: ctx.step_done(ctx.nfe - 1, t, y, adaptive=True))
    except NonFiniteError:
        raise
    except FloatingPointError as e:
        raise NonFiniteError(str(e)) from e
