"""Time grids for samplers, kept apart from the samplers themselves (k-diffusion's habit).

``get_timesteps(sde, num_steps, eps, schedule, model=None, **options)`` returns ``num_steps + 1`` decreasing positive
times (``solvers.sample`` appends t = 0 when the grid ends on the data).  Continuous schedules run from ``T`` to
``eps``:

* ``uniform``   — t_i = T + i/n (eps - T)  (score_sde's grid).
* ``quadratic`` — t_i = eps + (T - eps)(1 - i/n)^2: denser near the data, as in DDIM's quadratic skip.
* ``edm``       — Karras et al. (2022), eq. 5, in the noise-to-signal ratio r = sigma/a = e^{-lambda}:
                  r_i = (r_T^{1/rho} + i/n (r_eps^{1/rho} - r_T^{1/rho}))^rho, ``rho`` = 7 by default.
* ``logsnr``    — uniform in lambda = log(a/sigma), as DPM-Solver uses (Lu et al. 2022, sec. 3.3).

Each is mapped back to t with the path's closed-form inverse ``sde.t_from_log_snr``.  Discrete-time models
(``prediction.Model`` with a ``discrete`` table of N training levels) are sampled at their own levels with the
timestep spacings of diffusers' schedulers (Lin et al. 2024, Table 2), each level i placed at t = t(lambda_i):

* ``linspace``  — levels round(linspace(0, N-1, n+1)), from N-1 down to 0;
* ``leading``   — levels k * (N // (n+1)) for k = n..0 (DDIM's default spacing; never reaches N-1);
* ``trailing``  — levels round(N - k N/(n+1)) - 1 for k = 0..n (starts at N-1).

A schedule is one function ``fn(sde, n, eps, model, **options)`` registered with ``@register_schedule``; its keyword
options pass through ``solvers.sample(**options)``.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Dict, List

import torch

__all__ = ["get_timesteps", "available_schedules", "register_schedule", "schedule_options"]

F64 = torch.float64
_SCHEDULES: Dict[str, Callable] = {}


def register_schedule(name: str):
    def deco(fn):
        _SCHEDULES[name] = fn
        return fn
    return deco


def available_schedules() -> List[str]:
    return sorted(_SCHEDULES)


def schedule_options(name: str) -> List[str]:
    """The keyword options of schedule ``name`` (empty for an unknown name: ``get_timesteps`` reports that)."""
    fn = _SCHEDULES.get(name)
    if fn is None:
        return []
    params = list(inspect.signature(fn).parameters.values())[4:]
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _lam(sde, t) -> torch.Tensor:
    return sde.log_snr(torch.as_tensor(t, dtype=F64))


def _from_lam(sde, lam, eps):
    t = sde.t_from_log_snr(lam).to(F64)
    t[0], t[-1] = sde.T, eps          # exact end points (the inverse is exact to rounding)
    return t


@register_schedule("uniform")
def _uniform(sde, n, eps, model):
    return torch.linspace(sde.T, eps, n + 1, dtype=F64)


@register_schedule("quadratic")
def _quadratic(sde, n, eps, model):
    u = torch.linspace(1.0, 0.0, n + 1, dtype=F64)
    return eps + (sde.T - eps) * u ** 2


@register_schedule("edm")
def _edm(sde, n, eps, model, rho: float = 7.0):
    rho = float(rho)
    if not math.isfinite(rho) or rho <= 0:
        raise ValueError(f"the edm schedule's rho must be a positive number, got {rho}")
    r_max, r_min = torch.exp(-_lam(sde, sde.T)) ** (1 / rho), torch.exp(-_lam(sde, eps)) ** (1 / rho)
    r = (r_max + torch.linspace(0, 1, n + 1, dtype=F64) * (r_min - r_max)) ** rho     # Karras et al., eq. 5
    return _from_lam(sde, -torch.log(r), eps)


@register_schedule("logsnr")
def _logsnr(sde, n, eps, model):
    lam = _lam(sde, sde.T) + torch.linspace(0, 1, n + 1, dtype=F64) * (_lam(sde, eps) - _lam(sde, sde.T))
    return _from_lam(sde, lam, eps)


def _discrete_levels(model, name):
    if model is None or not getattr(model, "is_discrete", False):
        raise ValueError(f"schedule {name!r} places steps at a discrete-time model's training levels; this model is "
                         f"continuous-time: use uniform, quadratic, edm or logsnr")
    return model.log_snr_table.numel()


def _at_levels(sde, model, levels):
    levels = torch.as_tensor(levels, dtype=torch.long)
    return sde.t_from_log_snr(model.log_snr_table[levels]).to(F64)


@register_schedule("linspace")
def _linspace(sde, n, eps, model):
    N = _discrete_levels(model, "linspace")
    return _at_levels(sde, model, torch.linspace(N - 1, 0, n + 1, dtype=F64).round())


@register_schedule("leading")
def _leading(sde, n, eps, model):
    N = _discrete_levels(model, "leading")
    ratio = N // (n + 1)
    if ratio < 1:
        raise ValueError(f"schedule 'leading' needs at most {N} nodes for a model with {N} levels, got {n + 1}")
    return _at_levels(sde, model, torch.arange(n, -1, -1) * ratio)


@register_schedule("trailing")
def _trailing(sde, n, eps, model):
    N = _discrete_levels(model, "trailing")
    levels = torch.round(N - torch.arange(n + 1, dtype=F64) * (N / (n + 1))) - 1
    return _at_levels(sde, model, levels)


def get_timesteps(sde, num_steps: int, eps: float, schedule: str = "uniform", dtype=F64, device=None,
                  model=None, **options) -> torch.Tensor:
    """``num_steps + 1`` strictly decreasing positive times (``num_steps = 0``: the first node alone)."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown time schedule {schedule!r}; available: {', '.join(available_schedules())}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    unknown = sorted(set(options) - set(schedule_options(schedule)))
    if unknown:
        raise ValueError(f"schedule {schedule!r} got unknown option(s) {unknown}; it accepts "
                         f"{schedule_options(schedule)}")
    if num_steps == 0:
        t = _SCHEDULES[schedule](sde, 1, float(eps), model, **options)[:1]
    else:
        t = _SCHEDULES[schedule](sde, int(num_steps), float(eps), model, **options)
    if not (t[1:] < t[:-1]).all() or not bool((t > 0).all()):
        raise ValueError(f"schedule {schedule!r} produced a grid that is not strictly decreasing and positive for "
                         f"{num_steps} steps (too many steps for the model's levels?)")
    return t.to(dtype=dtype, device=device)
