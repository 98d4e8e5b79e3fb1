"""Ancestral sampling: DDPM's reverse step on VP, SMLD's on VE, and the same step for any SDE with Gaussian transitions.

Between grid times s < t the forward transition is x_t = a_{t|s} x_s + sqrt(v_{t|s}) z with a_{t|s} = a(t)/a(s) and
v_{t|s} = sigma(t)^2 - a_{t|s}^2 sigma(s)^2.  Tweedie's formula on that transition gives the exact reverse mean

    E[x_s | x_t] = (x_t + v_{t|s} grad log p_t(x_t)) / a_{t|s}.

On VP, a_{t|s}^2 = alpha_t and v_{t|s} = beta_t = 1 - alpha_t, and with eps = -sigma(t) * score this is DDPM's
1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alphabar_t) eps)  (Ho et al. 2020, Alg. 2); on VE it is SMLD's
x_t + (sigma_t^2 - sigma_s^2) score.  The added noise has variance
  * ``posterior`` (what ``auto`` uses without a learned variance): v_{t|s} sigma(s)^2 / sigma(t)^2 — DDPM's
    beta-tilde, SMLD's ancestral variance;
  * ``beta``: v_{t|s} — DDPM's sigma_t^2 = beta_t;
  * ``learned``: exp(v log v_{t|s} + (1 - v) log(posterior variance)) with the model's own v
    (``Prediction.log_variance_frac``; Nichol & Dhariwal 2021, eq. 15) — on a grid coarser than the training chain
    the same v interpolates between the coarse step's two variances (their sec. 4);
  * ``auto`` (default): ``learned`` when the model has a learned variance, else ``posterior``.
A last step to sigma(s) = 0 gives v_{t|s} = sigma(t)^2 and the mean (x + sigma^2 score) / a = x0_hat: the grid lands on
the data without an extra network call.
"""
from __future__ import annotations

import torch

from .base import register_sampler

__all__ = ["ancestral_step", "VARIANCES"]


VARIANCES = ("auto", "posterior", "beta", "learned")


def ancestral_step(x, score, a_t, s_t, a_s, s_s, noise, variance: str = "posterior", log_variance_frac=None):
    """One ancestral step from time t to s < t given the score at (x, t) and the marginal coefficients.
    ``variance="learned"`` needs ``log_variance_frac`` (v, x's shape)."""
    a_ts = a_t / a_s
    v_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
    mean = (x + v_ts * score) / a_ts
    if variance == "posterior":
        var = v_ts * s_s ** 2 / s_t ** 2
    elif variance == "beta":
        var = v_ts
    elif variance == "learned":
        if log_variance_frac is None:
            raise ValueError("ancestral variance 'learned' needs a model with a learned variance (model."
                             "learned_variance); this one has none: use 'posterior' or 'beta'")
        if float(s_s) <= 0:          # the step to the data: the posterior variance is 0 and no noise is added
            return mean
        v = log_variance_frac.to(x.dtype)
        # log Sigma = v log beta + (1 - v) log beta-tilde  (Nichol & Dhariwal 2021, eq. 15)
        var = torch.exp(v * torch.log(v_ts) + (1 - v) * torch.log(v_ts * s_s ** 2 / s_t ** 2))
    else:
        raise ValueError(f"ancestral variance must be one of {', '.join(VARIANCES[1:])}, got {variance!r}")
    return mean + torch.sqrt(torch.clamp(var, min=0.0)) * noise


@register_sampler("ancestral", variants=[{"variance": "posterior"}, {"variance": "beta"}], stochastic=True,
                  lands_on_data=True)
def ancestral(ctx, x, grid, variance: str = "auto"):
    """Ancestral sampling (DDPM on VP, SMLD on VE): exact Gaussian-transition reverse mean plus posterior noise."""
    if variance not in VARIANCES:
        raise ValueError(f"ancestral variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
    for i in range(grid.num_steps):
        a_t, s_t = grid.coeffs(i, x)
        a_s, s_s = grid.coeffs(i + 1, x)
        # the last step to sigma = 0 lands on the posterior mean x0_hat, noise-free (DDPM's Alg. 2 takes z = 0 at t = 1)
        noise = ctx.noise(x) if float(grid.sigma[i + 1]) > 0 else torch.zeros_like(x)
        pred = ctx.predict(x, grid.t[i])
        v = pred.log_variance_frac
        var = ("learned" if v is not None else "posterior") if variance == "auto" else variance
        x = ancestral_step(x, pred.score, a_t, s_t, a_s, s_s, noise, var, log_variance_frac=v)
        x = ctx.step_done(i, grid.t[i + 1], x)
    return x
