"""The EDM samplers (Karras, Aittala, Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): Heun's 2nd-order method (Algorithm 1) and its stochastic version with "churn" (Algorithm 2).

**Variables.**  EDM's algorithms are written for x = x0 + sigma eps (s(t) = 1, sigma(t) = t), the choice sec. 3
recommends.  Any Gaussian path x = a x0 + sigma eps is that path after scaling: eq. (4) with a general s(t),

    dx = [s'/s x - s^2 sigma' sigma grad log p(x/s; sigma)] dt,

becomes, for y = x/s and sigma~ = sigma/s (Table 1 and sec. 4: the sampler may use any s(t), sigma(t)),
dy/dsigma~ = -sigma~ grad_y log p(y; sigma~) = (y - D(y; sigma~)) / sigma~.  Here s = a, sigma~ = sigma/a =
e^{-lambda} and (y - D)/sigma~ = eps_hat, the model's noise prediction at x = a y: the sampler runs Algorithm 2 on
(y, sigma~) with sigma~ as its time variable, i.e. exactly EDM's sigma(t) = t, s(t) = 1 case, at the grid's nodes.

**Algorithm 2** (per step i of N, sigma~_i -> sigma~_{i+1}):

    gamma_i = min(S_churn / N, sqrt(2) - 1) if S_tmin <= sigma~_i <= S_tmax else 0
    sigma^_i = (1 + gamma_i) sigma~_i,   y^_i = y_i + sqrt(sigma^_i^2 - sigma~_i^2) S_noise z
    d_i = eps_hat(y^_i, sigma^_i);       y_{i+1} = y^_i + (sigma~_{i+1} - sigma^_i) d_i            (Euler)
    if sigma~_{i+1} != 0:  d'_i = eps_hat(y_{i+1}, sigma~_{i+1});
                           y_{i+1} = y^_i + (sigma~_{i+1} - sigma^_i)(d_i + d'_i)/2               (Heun)

With S_churn = 0 (the default) it is Algorithm 1, deterministic.  The last step to sigma~ = 0 (a grid that ends on
the data) takes no correction: Euler to sigma~ = 0 is Tweedie's x0_hat, so n steps cost 2n - 1 network calls
(2n when the grid ends at eps > 0).  The path is defined on [0, T] only, so sigma^ is capped at sigma~(T): the
first step from T is never churned (EDM's own settings use S_tmax < sigma_max, where this never binds).
"""
from __future__ import annotations

import math

import torch

from .base import register_sampler

__all__ = []


@register_sampler("edm", variants=[{}, {"S_churn": 10.0}], nfe_per_step=2, final_step_nfe=1,
                  stochastic=lambda opts: float(opts.get("S_churn", 0.0)) > 0, lands_on_data=True)
def edm(ctx, x, grid, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = float("inf"),
        S_noise: float = 1.0):
    """EDM (Karras et al. 2022): Heun on dy/dsigma~ = eps_hat (Alg. 1), with S_churn > 0 the stochastic Alg. 2."""
    S_churn, S_tmin, S_tmax, S_noise = (float(v) for v in (S_churn, S_tmin, S_tmax, S_noise))
    if not (math.isfinite(S_churn) and S_churn >= 0):
        raise ValueError(f"EDM's S_churn must be a finite number >= 0, got {S_churn}")
    if not (S_tmin >= 0 and S_tmax >= S_tmin):
        raise ValueError(f"EDM needs 0 <= S_tmin <= S_tmax, got S_tmin={S_tmin}, S_tmax={S_tmax}")
    if not (math.isfinite(S_noise) and S_noise >= 0):
        raise ValueError(f"EDM's S_noise must be a finite number >= 0, got {S_noise}")
    sde = ctx.sde
    r = (grid.sigma / grid.a).tolist()                       # sigma~_i = sigma_i / a_i
    a_T, s_T = sde.marginal_coeffs(torch.as_tensor(float(sde.T), dtype=torch.float64))
    r_max = float(s_T / a_T)
    N = grid.num_steps
    for i in range(N):
        a_i, _ = grid.coeffs(i, x)
        y = x / a_i
        t_hat, r_hat, a_hat = grid.t[i], r[i], a_i
        gamma = min(S_churn / N, math.sqrt(2.0) - 1.0) if S_tmin <= r[i] <= S_tmax else 0.0   # Alg. 2, gamma_i
        r_up = min((1.0 + gamma) * r[i], max(r_max, r[i]))              # Alg. 2, line 5: t^_i = t_i + gamma_i t_i
        if gamma > 0 and r_up > r[i]:
            r_hat = r_up
            t_hat = sde.t_from_log_snr(torch.tensor(-math.log(r_hat), dtype=torch.float64))
            a_hat, _ = ctx.coeffs(t_hat, x)
            # Alg. 2, lines 4 and 6: x^_i = x_i + sqrt(t^_i^2 - t_i^2) eps_i, eps_i ~ N(0, S_noise^2 I)
            y = y + math.sqrt(r_hat ** 2 - r[i] ** 2) * S_noise * ctx.noise(x)
        d = ctx.predict(a_hat * y, t_hat).eps          # Alg. 2, line 7: d_i = (x^ - D(x^; t^)) / t^ = eps_hat
        dr = r[i + 1] - r_hat
        y_next = y + dr * d                            # Alg. 2, line 8: Euler step
        if r[i + 1] != 0:                              # Alg. 2, line 9: no correction on a step to sigma = 0
            a_next, _ = grid.coeffs(i + 1, x)
            d2 = ctx.predict(a_next * y_next, grid.t[i + 1]).eps                 # Alg. 2, line 10
            y_next = y + dr * (0.5 * d + 0.5 * d2)     # Alg. 2, line 11: the trapezoidal (Heun) correction
        a_next, _ = grid.coeffs(i + 1, x)
        x = ctx.step_done(i, grid.t[i + 1], a_next * y_next)
    return x
