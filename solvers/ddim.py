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


def ddim_step(x, score, a_t, s_t, a_s, s_s, noise, eta: float = 0.0):
    """One DDIM step from t to s < t given the score at (x, t) and the marginal coefficients."""
    x0_hat = (x + s_t ** 2 * score) / a_t
    eps_hat = -s_t * score
    v_ts = s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
    c2 = eta ** 2 * v_ts * s_s ** 2 / s_t ** 2
    out = a_s * x0_hat + torch.sqrt(torch.clamp(s_s ** 2 - c2, min=0.0)) * eps_hat
    return out + torch.sqrt(torch.clamp(c2, min=0.0)) * noise if eta > 0 else out


@register_sampler("ddim", variants=[{"eta": 0.0}, {"eta": 1.0}])
def ddim(ctx, x, timesteps, eta: float = 0.0):
    """DDIM: eta = 0 deterministic (exponential integrator of the probability flow), eta = 1 ancestral-like."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"DDIM's eta must lie in [0, 1], got {eta}")
    for i in range(len(timesteps) - 1):
        t, s = timesteps[i], timesteps[i + 1]
        a_t, s_t = ctx.coeffs(t, x)
        a_s, s_s = ctx.coeffs(s, x)
        noise = ctx.noise(x) if eta > 0 else None
        x = ddim_step(x, ctx.score(x, t), a_t, s_t, a_s, s_s, noise, float(eta))
        x = ctx.step_done(i, s, x)
    return x
