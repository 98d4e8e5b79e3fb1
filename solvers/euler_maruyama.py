"""Euler–Maruyama on the reverse-time SDE dx = [f - g^2 s] dt + g dW_bar, integrated from T down to eps.

With h = t_i - t_{i+1} > 0:  x_{i+1} = x_i - [f(x_i, t_i) - g(t_i)^2 s(x_i, t_i)] h + g(t_i) sqrt(h) z_i
(Song et al. 2021, eq. 6, discretised; weak order 1).
"""
from __future__ import annotations

import torch

from .base import register_sampler

__all__ = ["euler_maruyama_step"]


def euler_maruyama_step(rsde, x, t, h, noise):
    """x_{t-h} = x_t - drift_rev(x_t, t) h + g(t) sqrt(h) z for the reverse SDE ``rsde``."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    h = torch.as_tensor(h, dtype=x.dtype, device=x.device)
    return x - rsde.drift(x, t) * h + rsde.diffusion(t) * torch.sqrt(h) * noise


@register_sampler("euler_maruyama", stochastic=True)
def euler_maruyama(ctx, x, grid):
    """Euler–Maruyama on the reverse-time SDE (weak order 1)."""
    rsde = ctx.sde.reverse(ctx.score)
    for i in range(grid.num_steps):
        t, s = grid.t[i], grid.t[i + 1]
        x = euler_maruyama_step(rsde, x, t, t - s, ctx.noise(x))
        x = ctx.step_done(i, s, x)
    return x
