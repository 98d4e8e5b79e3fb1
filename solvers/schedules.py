"""Time grids for samplers, kept apart from the samplers themselves (k-diffusion's habit).

``get_timesteps(sde, num_steps, eps, schedule)`` returns ``num_steps + 1`` decreasing times from ``T`` to ``eps``:

* ``uniform``   — t_i = T + i/n (eps - T)  (score_sde's grid).
* ``quadratic`` — t_i = eps + (T - eps)(1 - i/n)^2: denser near the data, as in DDIM's quadratic skip.
* ``edm``       — Karras et al. (2022), eq. 5, in the noise-to-signal ratio r(t) = sigma(t)/a(t):
                  r_i = (r_T^{1/rho} + i/n (r_eps^{1/rho} - r_T^{1/rho}))^rho, rho = 7, mapped back to t.
* ``logsnr``    — uniform in log r(t) (equivalently in log-SNR), as DPM-Solver uses.

The last two invert r(t) numerically (it is strictly increasing for every SDE here) by bisection in float64.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

__all__ = ["get_timesteps", "available_schedules", "register_schedule"]

_SCHEDULES: Dict[str, Callable] = {}


def register_schedule(name: str):
    def deco(fn):
        _SCHEDULES[name] = fn
        return fn
    return deco


def available_schedules():
    return sorted(_SCHEDULES)


def _noise_to_signal(sde, t: torch.Tensor) -> torch.Tensor:
    a, s = sde.marginal_coeffs(t)
    return s / a


def _invert_noise_to_signal(sde, r: torch.Tensor, eps: float, T: float, iters: int = 80) -> torch.Tensor:
    lo = torch.full_like(r, eps)
    hi = torch.full_like(r, T)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = _noise_to_signal(sde, mid) < r
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


@register_schedule("uniform")
def _uniform(sde, n, eps, **_):
    return torch.linspace(sde.T, eps, n + 1, dtype=torch.float64)


@register_schedule("quadratic")
def _quadratic(sde, n, eps, **_):
    u = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return eps + (sde.T - eps) * u ** 2


@register_schedule("edm")
def _edm(sde, n, eps, rho: float = 7.0, **_):
    T = torch.tensor(sde.T, dtype=torch.float64)
    r_max = _noise_to_signal(sde, T) ** (1 / rho)
    r_min = _noise_to_signal(sde, torch.tensor(eps, dtype=torch.float64)) ** (1 / rho)
    r = (r_max + torch.linspace(0, 1, n + 1, dtype=torch.float64) * (r_min - r_max)) ** rho
    return _pin_ends(_invert_noise_to_signal(sde, r, eps, sde.T), sde.T, eps)


@register_schedule("logsnr")
def _logsnr(sde, n, eps, **_):
    T = torch.tensor(sde.T, dtype=torch.float64)
    lr_max = torch.log(_noise_to_signal(sde, T))
    lr_min = torch.log(_noise_to_signal(sde, torch.tensor(eps, dtype=torch.float64)))
    r = torch.exp(lr_max + torch.linspace(0, 1, n + 1, dtype=torch.float64) * (lr_min - lr_max))
    return _pin_ends(_invert_noise_to_signal(sde, r, eps, sde.T), sde.T, eps)


def _pin_ends(t, T, eps):
    t[0], t[-1] = T, eps
    return t


def get_timesteps(sde, num_steps: int, eps: float, schedule: str = "uniform", dtype=torch.float64,
                  device=None, **kwargs) -> torch.Tensor:
    """``num_steps + 1`` strictly decreasing times from ``sde.T`` to ``eps``."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown time schedule {schedule!r}; available: {', '.join(available_schedules())}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    t = _SCHEDULES[schedule](sde, int(num_steps), float(eps), **kwargs)
    if not (t[1:] < t[:-1]).all():
        raise ValueError(f"schedule {schedule!r} produced a non-decreasing grid for {num_steps} steps")
    return t.to(dtype=dtype, device=device)
