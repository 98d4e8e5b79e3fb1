"""Predictor–corrector sampling (Song et al. 2021, Alg. 1–3).

At each grid time t_i: ``n_corrector_steps`` Langevin corrector steps targeting p_{t_i}, then one predictor step to
t_{i+1}.
  * predictor ``reverse_diffusion``: x <- x - [f_i - G_i^2 s(x, t_i)] + G_i z with (f_i, G_i) = sde.discretize(x, t_i, h),
    the forward step reversed (on VP the DDPM step, on VE the SMLD step); ``euler_maruyama``: the plain EM step.
  * corrector ``langevin``: x <- x + e s + sqrt(2 e) z with e = 2 alpha (snr ||z|| / ||s||)^2, alpha = a_{t_i|t_{i+1}}^2
    (1 - beta_i on VP, 1 on VE).  ||.|| is the per-sample norm averaged over the batch, as in score_sde: per-sample
    step sizes blow up in low dimension wherever ||s|| ~ 0.  ``langevin`` with ``snr`` 0.16 and one step is the
    default; ``none`` turns it off.
"""
from __future__ import annotations

import torch

from .base import register_sampler
from .euler_maruyama import euler_maruyama_step

__all__ = ["langevin_step", "reverse_diffusion_step"]


def _mean_norm(v):
    return v.reshape(v.shape[0], -1).norm(dim=1).mean()


def langevin_step(x, score, noise, snr: float, alpha):
    """One Langevin step with the signal-to-noise-ratio step size of Song et al. (2021), Alg. 4/5."""
    step = 2 * alpha * (snr * _mean_norm(noise) / _mean_norm(score).clamp_min(1e-30)) ** 2
    return x + step * score + torch.sqrt(2 * step) * noise


def reverse_diffusion_step(rsde, x, t, h, noise):
    """x_{t-h} = x - rev_f + rev_G z with (rev_f, rev_G) the reversed forward discretisation at t."""
    rev_f, rev_G = rsde.discretize(x, t, h)
    G = rev_G.reshape(-1, *([1] * (x.dim() - 1))) if rev_G.dim() else rev_G
    return x - rev_f + G * noise


_PREDICTORS = {"reverse_diffusion": reverse_diffusion_step, "euler_maruyama": euler_maruyama_step}


@register_sampler("pc", variants=[{"predictor": "reverse_diffusion", "corrector": "langevin"},
                                  {"predictor": "euler_maruyama", "corrector": "langevin"}],
                  nfe_per_step=lambda o: 1 + (int(o.get("n_corrector_steps", 1)) if o.get("corrector", "langevin")
                                              == "langevin" else 0), stochastic=True)
def pc(ctx, x, grid, predictor: str = "reverse_diffusion", corrector: str = "langevin", snr: float = 0.16,
       n_corrector_steps: int = 1):
    """Predictor–corrector: reverse-diffusion (or Euler–Maruyama) predictor, Langevin corrector."""
    if predictor not in _PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; available: {', '.join(sorted(_PREDICTORS))}")
    if corrector not in ("langevin", "none"):
        raise ValueError(f"unknown corrector {corrector!r}; available: langevin, none")
    if snr <= 0 or int(n_corrector_steps) < 0:
        raise ValueError(f"need snr > 0 and n_corrector_steps >= 0, got {snr}, {n_corrector_steps}")
    n_corr = int(n_corrector_steps) if corrector == "langevin" else 0
    step_fn = _PREDICTORS[predictor]
    rsde = ctx.sde.reverse(ctx.score)
    for i in range(grid.num_steps):
        t, s = grid.t[i], grid.t[i + 1]
        if n_corr:
            a_t, _ = grid.coeffs(i, x)
            a_s, _ = grid.coeffs(i + 1, x)
            alpha = (a_t / a_s) ** 2
            for _ in range(n_corr):
                x = langevin_step(x, ctx.score(x, t), ctx.noise(x), snr, alpha)
        x = step_fn(rsde, x, torch.as_tensor(t, dtype=x.dtype), torch.as_tensor(t - s, dtype=x.dtype), ctx.noise(x))
        x = ctx.step_done(i, s, x)
    return x
