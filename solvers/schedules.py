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

and one no peer ships, fitted to the model and the solver:

* ``optimized`` — nodes that equidistribute the estimated local error of an order-``order`` exponential integrator
  along pilot trajectories.  Such an integrator's local error over a step of size h in lambda is
  C h^{p+1} |d^p x0_hat / d lambda^p| (the Taylor remainder of DPM-Solver-p, Lu et al. 2022, Theorem 3.2 and eq. (3.6)
  with x0 in place of eps for the data-prediction form), so the total error sum_i h_i^{p+1} e(lambda_i) for a fixed
  number of steps is smallest when h(lambda) is proportional to e(lambda)^{-1/(p+1)}: equal shares of
  integral e^{1/(p+1)} d lambda per step.  e is measured once: ``pilot_samples`` prior draws (a fixed seed) are carried
  by DDIM along ``pilot_steps`` uniform-lambda steps from T to eps, x0_hat is recorded at each node, and its p-th
  finite difference in lambda (RMS over samples and dimensions) is e.  The pilot costs ``pilot_steps`` batched calls,
  once per (model, path, eps, order, pilot settings, number of steps): the grid is cached on the model object.

A schedule is one function ``fn(sde, n, eps, model, **options)`` registered with ``@register_schedule``; its keyword
options pass through ``solvers.sample(**options)`` (a schedule that declares ``like`` gets the initial state from
``sample``, for its shape, dtype and device; it is not a user option).
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


@register_schedule("optimized")
def _optimized(sde, n, eps, model, order: int = 2, pilot_samples: int = 64, pilot_steps: int = 200, like=None):
    if model is None or like is None:
        raise ValueError("schedule 'optimized' fits the grid to a model: use it through solvers.sample, which passes "
                         "the model and the data shape")
    order, pilot_samples, pilot_steps = int(order), int(pilot_samples), int(pilot_steps)
    if not 1 <= order <= 4 or pilot_samples < 1 or pilot_steps < order + 2:
        raise ValueError(f"schedule 'optimized' needs 1 <= order <= 4, pilot_samples >= 1 and pilot_steps >= order + 2; "
                         f"got {order}, {pilot_samples}, {pilot_steps}")
    key = (repr(sde), float(eps), order, pilot_samples, pilot_steps, tuple(like.shape[1:]), str(like.dtype),
           str(like.device), int(n))
    cache = model.__dict__.setdefault("_optimized_grids", {})
    if key not in cache:
        lam_T, lam_e = float(_lam(sde, sde.T)), float(_lam(sde, eps))
        density, lam_nodes = _pilot_error_density(sde, model, eps, order, pilot_samples, pilot_steps, like)
        # cumulative share of integral e^{1/(p+1)} d lambda, inverted at n equal shares (trapezoidal rule)
        w = density ** (1.0 / (order + 1))
        w = w + 1e-3 * w.mean() + 1e-300       # a floor: flat stretches still get steps
        seg = 0.5 * (w[1:] + w[:-1]) * (lam_nodes[1:] - lam_nodes[:-1])
        cum = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(seg, 0)])
        cum = cum / cum[-1]
        targets = torch.linspace(0, 1, n + 1, dtype=F64)
        j = torch.clamp(torch.searchsorted(cum, targets), 1, len(cum) - 1)
        frac = (targets - cum[j - 1]) / (cum[j] - cum[j - 1])
        lam = lam_nodes[j - 1] + frac * (lam_nodes[j] - lam_nodes[j - 1])
        lam[0], lam[-1] = lam_T, lam_e
        cache[key] = _from_lam(sde, lam, eps)
    return cache[key].clone()


@torch.no_grad()
def _pilot_error_density(sde, model, eps, order, n_pilot, steps, like):
    """e(lambda) = RMS of the order-th finite difference of x0_hat in lambda along DDIM pilot paths (prior draws shaped,
    typed and placed like ``like``), at the nodes of a uniform lambda grid."""
    lam = _lam(sde, sde.T) + torch.linspace(0, 1, steps + 1, dtype=F64) * (_lam(sde, eps) - _lam(sde, sde.T))
    t = _from_lam(sde, lam, eps)
    gen = torch.Generator(device=like.device).manual_seed(0)
    x = sde.prior_sample((n_pilot, *like.shape[1:]), generator=gen, dtype=like.dtype, device=like.device)
    x0s = []
    for i in range(steps + 1):
        pred = model.predict(sde, x, t[i])
        x0s.append(pred.x0.to(torch.float64).cpu())
        if i < steps:     # DDIM (eta = 0) to the next node: x_s = a_s x0_hat + sigma_s eps_hat
            a_s, s_s = (float(v) for v in sde.marginal_coeffs(t[i + 1]))
            x = a_s * pred.x0 + s_s * pred.eps
    D = torch.stack(x0s).reshape(steps + 1, -1)                     # (nodes, samples * dims)
    for _ in range(order):
        D = D[1:] - D[:-1]
    e = D.pow(2).mean(1).sqrt() / float(lam[1] - lam[0]) ** order   # one value per order-wide stencil
    # node k takes the stencil centred nearest to it
    idx = torch.clamp(torch.round(torch.arange(steps + 1, dtype=F64) - order / 2).long(), 0, e.numel() - 1)
    return e[idx], lam


def get_timesteps(sde, num_steps: int, eps: float, schedule: str = "uniform", dtype=F64, device=None,
                  model=None, **options) -> torch.Tensor:
    """``num_steps + 1`` strictly decreasing positive times (``num_steps = 0``: the first node alone)."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown time schedule {schedule!r}; available: {', '.join(available_schedules())}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    if "like" in options and "like" not in schedule_options(schedule):
        options = {k: v for k, v in options.items() if k != "like"}
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
