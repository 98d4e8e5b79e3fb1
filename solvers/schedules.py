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

* ``optimized`` — the grid that minimises the sampler's own global error on pilot trajectories (in the spirit of
  Sabour et al. 2024, "Align Your Steps", and Watson et al. 2021's learned step sizes; here fitted directly, no bound).
  ``pilot_samples`` prior draws (fixed ``seed``) are carried to the data by a reference — third-order UniPC on
  ``ref_steps`` log-SNR steps — and by the sampler itself on a candidate grid; the objective is the mean squared
  distance between the two endpoints in the metric of the reference endpoints' covariance (whitened, so that the
  low-variance directions of the data, which decide likelihood-type errors, count as much as the high-variance ones).
  The grid's log-SNR step sizes are a softmax of free parameters, started at the uniform log-SNR grid and minimised
  with Powell's method within ``max_evals`` sampler runs (0: 60 per node).  Deterministic fixed-grid samplers only;
  the cost is about ``max_evals * num_steps`` batched calls on the pilots, once per (model, sampler and its options,
  number of steps, path, eps, pilot settings, data shape): the grid is cached with the network.

A schedule is one function ``fn(sde, n, eps, model, **options)`` registered with ``@register_schedule``; its keyword
options pass through ``solvers.sample(**options)`` (a schedule that declares ``like`` gets the initial state from
``sample``, for its shape, dtype and device; it is not a user option).
"""
from __future__ import annotations

import inspect
import math
import weakref
from typing import Callable, Dict, List

import numpy as np
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


#: what ``solvers.sample`` hands to a schedule that declares it (not user options): ``like`` — the initial state (its
#: shape, dtype, device); ``solver`` — ``(method, its options, denoise)`` of the run the grid is for
INTERNAL_OPTIONS = ("like", "solver")


def schedule_options(name: str, internal: bool = False) -> List[str]:
    """The user options of schedule ``name`` (with ``internal``: also the ``INTERNAL_OPTIONS`` it declares); empty
    for an unknown name (``get_timesteps`` reports that)."""
    fn = _SCHEDULES.get(name)
    if fn is None:
        return []
    params = list(inspect.signature(fn).parameters.values())[4:]
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names if internal else [p for p in names if p not in INTERNAL_OPTIONS]


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
def _optimized(sde, n, eps, model, pilot_samples: int = 256, ref_steps: int = 100, max_evals: int = 0,
               seed: int = 0, like=None, solver=None):
    if model is None or like is None or solver is None:
        raise ValueError("schedule 'optimized' fits the grid to a model and a sampler: use it through solvers.sample, "
                         "which passes the model, the sampler and the data shape")
    pilot_samples, ref_steps, max_evals, seed = int(pilot_samples), int(ref_steps), int(max_evals), int(seed)
    if pilot_samples < 2 or ref_steps < 10 or max_evals < 0:
        raise ValueError(f"schedule 'optimized' needs pilot_samples >= 2, ref_steps >= 10 and max_evals >= 0 (0: "
                         f"60 per node); got {pilot_samples}, {ref_steps}, {max_evals}")
    method, method_options, denoise = solver
    from .base import get_sampler
    info = get_sampler(method)
    if info.kind != "fixed" or info.stochastic(method_options):
        raise ValueError(f"schedule 'optimized' fits the grid of a deterministic fixed-grid sampler to its flow map; "
                         f"{method!r} with {method_options or 'its defaults'} is "
                         f"{'adaptive' if info.kind != 'fixed' else 'stochastic'}: use logsnr or edm")
    key = (repr(sde), float(eps), int(n), method, tuple(sorted((k, repr(v)) for k, v in method_options.items())),
           bool(denoise), pilot_samples, ref_steps, max_evals, seed, tuple(like.shape[1:]), str(like.dtype),
           str(like.device), model.output)
    owner = getattr(model.fn, "__self__", model.fn)         # the network (or function): every Model of it shares
    try:
        cache = _FITTED.setdefault(owner, {})
    except TypeError:                                      # not weak-referenceable: cache on this Model only
        cache = model.__dict__.setdefault("_optimized_grids", {})
    if key not in cache:
        cache[key] = _fit_grid(sde, n, eps, model, info, method_options, denoise, pilot_samples, ref_steps,
                               max_evals or 60 * n, seed, like)
    return cache[key].clone()


_FITTED = weakref.WeakKeyDictionary()


def _whitener(ref: torch.Tensor):
    """``werr(x) = mean_i || W (x_i - ref_i) ||^2`` with W the inverse square root of the reference endpoints'
    covariance (principal directions of the pilot cloud; with fewer pilots than dimensions the remaining directions
    get the smallest principal variance)."""
    R = ref.reshape(ref.shape[0], -1).to(F64)
    Rc = R - R.mean(0)
    _, sv, Vh = torch.linalg.svd(Rc, full_matrices=False)
    var = sv ** 2 / (R.shape[0] - 1)
    var = torch.clamp(var, min=1e-12 * float(var.max()) + 1e-300)
    keep = var > 1e-10 * float(var.max())
    V, var = Vh[keep], var[keep]
    rest = float(var.min())
    full = V.shape[0] == R.shape[1]

    def werr(x):
        d = x.reshape(x.shape[0], -1).to(F64) - R
        c = d @ V.T
        e = (c ** 2 / var).sum(1)
        if not full:
            e = e + (d.pow(2).sum(1) - c.pow(2).sum(1)).clamp(min=0) / rest
        return float(e.mean())
    return werr


def _fit_grid(sde, n, eps, model, info, method_options, denoise, pilot_samples, ref_steps, max_evals, seed, like):
    from scipy.optimize import minimize
    from .base import sample
    lam_T, lam_e = float(_lam(sde, sde.T)), float(_lam(sde, eps))
    gen = torch.Generator(device=like.device).manual_seed(seed)
    shape = (pilot_samples, *like.shape[1:])
    z = sde.prior_sample(shape, generator=gen, dtype=like.dtype, device=like.device)
    steps = n + 1 if denoise else n                      # the sampler's steps on this grid (+ the jump to the data)
    with torch.no_grad():
        # the reference flow map: third-order UniPC (its measured order is 3, tests/test_solver_orders.py) on a fine
        # log-SNR grid, ending like the sampler does
        ref = sample(sde, model, shape, "unipc", ref_steps, x_init=z, eps=eps, schedule="logsnr", denoise=denoise,
                     dtype=like.dtype, device=like.device, order=3).samples
    werr = _whitener(ref)

    def grid(u):
        h = torch.softmax(torch.as_tensor(u, dtype=F64), 0)           # step sizes in lambda, positive, summing to 1
        lam = lam_T + torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(h, 0)]) * (lam_e - lam_T)
        return _from_lam(sde, lam, eps)

    def objective(u):
        try:
            with torch.no_grad():
                x = sample(sde, model, shape, info.name, steps, x_init=z, eps=eps, schedule=grid(u), denoise=denoise,
                           dtype=like.dtype, device=like.device, **method_options).samples
        except (FloatingPointError, ValueError, RuntimeError):
            return 1e6
        e = werr(x)
        return math.log(e) if math.isfinite(e) and e > 0 else 1e6

    u0 = np.zeros(n)                                                   # start: the uniform log-SNR grid
    best = minimize(objective, u0, method="Powell", options=dict(maxfev=max_evals, xtol=1e-3, ftol=1e-4))
    u = best.x if best.fun < objective(u0) else u0
    return grid(u)


def get_timesteps(sde, num_steps: int, eps: float, schedule: str = "uniform", dtype=F64, device=None,
                  model=None, **options) -> torch.Tensor:
    """``num_steps + 1`` strictly decreasing positive times (``num_steps = 0``: the first node alone)."""
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown time schedule {schedule!r}; available: {', '.join(available_schedules())}")
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    declared = schedule_options(schedule, internal=True)
    options = {k: v for k, v in options.items() if k not in INTERNAL_OPTIONS or k in declared}
    unknown = sorted(set(options) - set(declared))
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
