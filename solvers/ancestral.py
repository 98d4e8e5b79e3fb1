"""Ancestral sampling: DDPM's reverse step on VP, SMLD's on VE, and the same step for any SDE with Gaussian transitions.

Between grid times s < t the forward transition is x_t = a_{t|s} x_s + sqrt(v_{t|s}) z with a_{t|s} = a(t)/a(s) and
v_{t|s} = sigma(t)^2 - a_{t|s}^2 sigma(s)^2.  Tweedie's formula on that transition gives the exact reverse mean

    E[x_s | x_t] = (x_t + v_{t|s} grad log p_t(x_t)) / a_{t|s}.

On VP, a_{t|s}^2 = alpha_t and v_{t|s} = beta_t = 1 - alpha_t, and with eps = -sigma(t) * score this is DDPM's
1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphabar_t) eps)  (Ho et al. 2020, Alg. 2); on VE it is SMLD's
x_t + (sigma_t^2 - sigma_s^2) score.  The added noise has variance
  * ``posterior`` (default): v_{t|s} sigma(s)^2 / sigma(t)^2 — DDPM's beta-tilde, SMLD's ancestral variance;
  * ``beta``: v_{t|s} — DDPM's sigma_t^2 = beta_t.
A last step to sigma(s) = 0 gives v_{t|s} = sigma(t)^2 and the mean (x + sigma^2 score) / a = x0_hat: the grid lands on
the data without an extra network call.
"""
from __future__ import annotations

import torch

from .base import register_sampler

__all__ = ["ancestral_step"]


def ancestral_step(x, score, a_t, s_t, a_s, s_s, noise, variance: str = "posterior"):
    """One ancestral step from time t to s < t given the score at (x, t) and the marginal coefficients."""
    a_ts = a_t / a_s
    v_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
    mean = (x + v_ts * score) / a_ts
    if variance == "posterior":
        var = v_ts * s_s ** 2 / s_t ** 2
    elif variance == "beta":
        var = v_ts
    else:
        raise ValueError(f"ancestral variance must be 'posterior' or 'beta', got {variance!r}")
    return mean + torch.sqrt(torch.clamp(var, min=0.0)) * noise


@register_sampler("ancestral", variants=[{"variance": "posterior"}, {"variance": "beta"}], stochastic=True,
                  lands_on_data=True)
def ancestral(ctx, x, grid, variance: str = "posterior"):
    """Ancestral sampling (DDPM on VP, SMLD on VE): exact Gaussian-transition reverse mean plus posterior noise."""
    if variance not in ("posterior", "beta"):
        raise ValueError(f"ancestral variance must be 'posterior' or 'beta', got {variance!r}")
    for i in range(grid.num_steps):
        a_t, s_t = grid.coeffs(i, x)
        a_s, s_s = grid.coeffs(i + 1, x)
        # the last step to sigma = 0 lands on the posterior mean x0_hat, noise-free (DDPM's Alg. 2 takes z = 0 at t = 1)
        noise = ctx.noise(x) if float(grid.sigma[i + 1]) > 0 else torch.zeros_like(x)
        x = ancestral_step(x, ctx.score(x, grid.t[i]), a_t, s_t, a_s, s_s, noise, variance)
        x = ctx.step_done(i, grid.t[i + 1], x)
    return x
