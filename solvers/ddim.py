"""DDIM (Song, Meng & Ermon 2021), written for any SDE with Gaussian transitions N(a(t) x0, sigma(t)^2 I).

From the score at (x_t, t): the Tweedie data estimate x0_hat = (x_t + sigma_t^2 s) / a_t and the noise estimate
eps_hat = -sigma_t s.  The step to s < t is

    x_s = a_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,   c^2 = eta^2 v_{t|s} sigma_s^2 / sigma_t^2,

with v_{t|s} = sigma_t^2 - (a_t/a_s)^2 sigma_s^2 (DDIM eq. 12 and 16 in these coefficients).  eta = 0 is the
deterministic first-order exponential integrator of the probability-flow ODE (exact in one step for a point mass);
eta = 1 gives the posterior q(x_s | x_t, x0_hat), whose mean equals the ancestral sampler's Tweedie mean.
"""
from __future__ import annotations

import torch

from .base import register_sampler

__all__ = ["ddim_step"]


def ddim_step(x, x0_hat, eps_hat, a_s, s_s, v_ts, s_t, noise=None, eta: float = 0.0):
    """One DDIM step to s < t from the prediction (x0_hat, eps_hat) at (x, t) (DDIM eq. 12 in (a, sigma))."""
    c2 = eta ** 2 * v_ts * s_s ** 2 / s_t ** 2
    out = a_s * x0_hat + torch.sqrt(torch.clamp(s_s ** 2 - c2, min=0.0)) * eps_hat
    return out + torch.sqrt(torch.clamp(c2, min=0.0)) * noise if noise is not None else out


@register_sampler("ddim", variants=[{"eta": 0.0}, {"eta": 1.0}], stochastic=lambda opts: opts.get("eta", 0.0) > 0,
                  lands_on_data=True)
def ddim(ctx, x, grid, eta: float = 0.0):
    """DDIM: eta = 0 deterministic (exponential integrator of the probability flow), eta = 1 ancestral-like."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"DDIM's eta must lie in [0, 1], got {eta}")
    for i in range(grid.num_steps):
        a_t, s_t = grid.coeffs(i, x)
        a_s, s_s = grid.coeffs(i + 1, x)
        pred = ctx.predict(x, grid.t[i])
        noise = ctx.noise(x) if eta > 0 and float(grid.sigma[i + 1]) > 0 else None
        x = ddim_step(x, pred.x0, pred.eps, a_s, s_s, v_ts=s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2, s_t=s_t,
                      noise=noise, eta=float(eta))
        x = ctx.step_done(i, grid.t[i + 1], x)
    return x
