"""Adaptive Dormand–Prince RK45 on the probability-flow ODE (scipy ``solve_ivp``; one system for the whole batch, in
float64 on the CPU, as score_sde does), with relative / absolute tolerances ``rtol`` / ``atol``."""
from __future__ import annotations

from sde_diffusion.odeint import rk45 as _rk45

from .base import NonFiniteError, register_adaptive


@register_adaptive("rk45", variants=[{"rtol": 1e-3, "atol": 1e-3}, {"rtol": 1e-5, "atol": 1e-5}])
def rk45(ctx, x, t0, t1, rtol: float = 1e-5, atol: float = 1e-5):
    """Adaptive RK45 (scipy) on the probability-flow ODE with rtol/atol."""
    try:
        return _rk45(lambda y, t: ctx.predict(y, t).velocity, x, t0, t1, float(rtol), float(atol),
                     on_eval=lambda t, y: ctx.step_done(ctx.nfe - 1, t, y, adaptive=True), return_stats=True)
    except NonFiniteError:
        raise
    except FloatingPointError as e:
        raise NonFiniteError(str(e)) from e
