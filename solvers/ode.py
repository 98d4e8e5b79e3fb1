"""Probability-flow ODE dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song et al. 2021, eq. 13), integrated from T down.

The velocity is the prediction's ``velocity`` = a' x0_hat + sigma' eps_hat, the same field for every Gaussian path and
every model output.  Fixed-step ``euler`` (order 1, 1 call/step), ``heun`` (order 2, 2 calls/step; the default, as in
EDM) and classical ``rk4`` (order 4, 4 calls/step) on the grid.  The adaptive RK45 is its own method, ``rk45``.
"""
from __future__ import annotations

from sde_diffusion.odeint import FIXED_STEP_METHODS, rk_step

from .base import register_sampler

_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}


@register_sampler("ode", variants=[{"solver": s} for s in FIXED_STEP_METHODS],
                  nfe_per_step=lambda opts: _PER_STEP.get(opts.get("solver", "heun"), 1))
def ode(ctx, x, grid, solver: str = "heun"):
    """Probability-flow ODE with fixed-step Euler / Heun / RK4 on the grid."""
    if solver not in FIXED_STEP_METHODS:
        raise ValueError(f"unknown ODE solver {solver!r}; available: {', '.join(FIXED_STEP_METHODS)} "
                         f"(adaptive RK45 is method 'rk45')")

    def velocity(y, t):
        return ctx.predict(y, t).velocity

    for i in range(grid.num_steps):
        t, s = float(grid.t[i]), float(grid.t[i + 1])
        x = rk_step(velocity, x, t, s, solver)
        x = ctx.step_done(i, s, x)
    return x
