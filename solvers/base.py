"""The one sampling entry point, the sampler registry, the grid and the context every sampler works through.

**The contract (solvers v2).**  A sampler sees a Gaussian path (the SDE: ``marginal_coeffs``, ``marginal_coeffs_dt``,
``log_snr``, ``t_from_log_snr``, drift and diffusion), a model it can only *predict* with, and tensors:

* ``pred = ctx.predict(x, t)`` — one counted network call, converted from the model's declared output
  (``sde_diffusion.prediction``): ``pred.eps``, ``pred.x0``, ``pred.score``, ``pred.velocity`` (the probability
  flow's dx/dt).  Exponential integrators ask for x0 or eps, Euler for the velocity, the SDE samplers for the score.
* ``grid`` — ``Grid`` with ``t``, ``a``, ``sigma``, ``lam`` (log-SNR) per node in float64, walked from ``grid.t[0]``
  (T) down.  With ``denoise=True`` (the default) the grid ends at t = 0 (sigma = 0, lam = +inf): samplers registered
  with ``lands_on_data=True`` take that last step themselves (DDIM, DPM-Solver, the ancestral step all reach x0_hat
  from their last positive node at no extra network call); for the others the driver runs them to the last positive
  node and jumps to x0_hat with the prediction there — one call, in place of their last step.  ``num_steps`` is the
  number of steps, so ``n`` steps of a 1-call-per-step sampler cost exactly ``n`` calls either way.
* ``ctx.noise(x)`` draws from the generator; ``x = ctx.step_done(i, t, x)`` checks finiteness, applies the constraint
  (inpainting) and calls the callback after each step.

Two kinds are registered: fixed-grid samplers ``fn(ctx, x, grid, **options) -> x`` (``@register_sampler``; multistep
history lives in the sampler) and adaptive integrators ``fn(ctx, x, t0, t1, **options) -> (x, stats)``
(``@register_adaptive``; ``stats`` counts accepted / rejected steps).  Each declares its calls per step, whether it is
stochastic and whether it can apply a constraint.  Options are validated against the function's signature; options
of the time schedule (e.g. ``rho``) pass through ``sample(**options)`` as well.  Solvers import nothing from
networks, data or configs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from sde_diffusion.prediction import Model, Prediction, as_model

from .schedules import get_timesteps, schedule_options

Tensor = torch.Tensor

__all__ = ["sample", "available", "register_sampler", "register_adaptive", "get_sampler", "SampleResult",
           "SamplingContext", "NonFiniteError", "SamplerInfo", "Grid", "make_grid"]


class NonFiniteError(FloatingPointError):
    """Raised when the model's prediction or the state stops being finite during sampling."""


PerStep = Union[int, Callable[[Dict[str, Any]], int]]
Flag = Union[bool, Callable[[Dict[str, Any]], bool]]


def _call(v, opts):
    return v(opts) if callable(v) else v


@dataclasses.dataclass
class SamplerInfo:
    name: str
    fn: Callable
    description: str
    kind: str                              #: "fixed" (a grid) or "adaptive" (tolerances)
    #: option sets worth comparing (e.g. the ODE's integrators, DPM-Solver's orders); experiments sweep these
    variants: List[Dict[str, Any]]
    nfe_per_step: Optional[PerStep]        #: network calls per grid step (fixed kind)
    stochastic_: Flag
    supports_constraint: bool
    lands_on_data: bool                    #: takes the final step to t = 0 itself (fixed kind)
    final_step_nfe: Optional[PerStep] = None   #: calls of that final step, if not nfe_per_step (EDM's Heun: 1)
    tolerances: Sequence[str] = ()         #: adaptive: the options a tolerance sweep sets (e.g. rtol, atol)

    @property
    def options(self) -> List[str]:
        """The sampler's own options (keyword parameters after ``ctx, x, grid`` or ``ctx, x, t0, t1``)."""
        skip = 3 if self.kind == "fixed" else 4
        params = list(inspect.signature(self.fn).parameters.values())[skip:]
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @property
    def defaults(self) -> Dict[str, Any]:
        sig = inspect.signature(self.fn)
        return {k: sig.parameters[k].default for k in self.options
                if sig.parameters[k].default is not inspect.Parameter.empty}

    def fixed_steps(self, opts: Optional[Dict[str, Any]] = None) -> bool:
        """Whether ``num_steps`` sets the cost (False for adaptive integrators)."""
        return self.kind == "fixed"

    def stochastic(self, opts: Optional[Dict[str, Any]] = None) -> bool:
        return bool(_call(self.stochastic_, dict(opts or {})))

    def calls_per_step(self, opts: Optional[Dict[str, Any]] = None) -> Optional[int]:
        return None if self.nfe_per_step is None else int(_call(self.nfe_per_step, dict(opts or {})))

    def nfe(self, num_steps: int, opts: Optional[Dict[str, Any]] = None, denoise: bool = True) -> Optional[int]:
        """The exact number of network calls of ``num_steps`` steps (None for adaptive integrators)."""
        per = self.calls_per_step(opts)
        if per is None:
            return None
        if not denoise:
            return num_steps * per
        if not self.lands_on_data:                       # the driver's jump to x0_hat replaces the last step
            return (num_steps - 1) * per + 1
        last = per if self.final_step_nfe is None else int(_call(self.final_step_nfe, dict(opts or {})))
        return (num_steps - 1) * per + last


_SAMPLERS: Dict[str, SamplerInfo] = {}


def _register(name, fn, kind, variants, nfe_per_step, stochastic, constraint, lands_on_data, final_step_nfe=None,
              tolerances=()):
    if name in _SAMPLERS:
        raise ValueError(f"a sampler named {name!r} is already registered")
    doc = inspect.getdoc(fn) or ""
    info = SamplerInfo(name, fn, doc.split("\n")[0], kind, [dict(v) for v in (variants or [{}])], nfe_per_step,
                       stochastic, bool(constraint), bool(lands_on_data), final_step_nfe, ())
    if tolerances is None:      # default: whichever of rtol / atol the integrator takes
        tolerances = [k for k in ("rtol", "atol") if k in info.options]
    info.tolerances = tuple(tolerances)
    missing = [k for k in info.tolerances if k not in info.options]
    if missing:
        raise ValueError(f"sampler {name!r} declares tolerance options {missing} it does not accept")
    _SAMPLERS[name] = info
    return fn


def register_sampler(name: str, variants: Optional[Sequence[Dict[str, Any]]] = None, *, nfe_per_step: PerStep = 1,
                     stochastic: Flag = False, constraint: bool = True, lands_on_data: bool = False,
                     final_step_nfe: Optional[PerStep] = None):
    """Decorator registering a fixed-grid sampler ``fn(ctx, x, grid, **options) -> x`` as ``method=name``.

    ``lands_on_data``: the sampler's step formula reaches sigma = 0 (the grid's last node when ``denoise``); otherwise
    the driver replaces its last step by the jump to x0_hat.  ``final_step_nfe``: the calls of that landing step when
    they differ from ``nfe_per_step`` (EDM's Heun skips its correction there: 1)."""
    return lambda fn: _register(name, fn, "fixed", variants, nfe_per_step, stochastic, constraint, lands_on_data,
                                final_step_nfe)


def register_adaptive(name: str, variants: Optional[Sequence[Dict[str, Any]]] = None, *, stochastic: Flag = False,
                      tolerances: Optional[Sequence[str]] = None):
    """Decorator registering an adaptive integrator ``fn(ctx, x, t0, t1, **options) -> (x, stats)`` (stats: a dict
    with at least ``accepted`` and ``rejected``) as ``method=name``.  ``tolerances`` names the options that set its
    accuracy (a tolerance sweep sets them all to one value; default: those of rtol / atol it takes).  Adaptive integrators apply no constraint."""
    return lambda fn: _register(name, fn, "adaptive", variants, None, stochastic, False, False, None, tolerances)


def available() -> List[str]:
    """Names of the registered sampling methods."""
    return sorted(_SAMPLERS)


def get_sampler(method: str) -> SamplerInfo:
    if method not in _SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; available: {', '.join(available())}")
    return _SAMPLERS[method]


# ------------------------------------------------------------------------------------------------ grid
@dataclasses.dataclass
class Grid:
    """Nodes of a sampling grid, from noise to data, in float64: times ``t`` (strictly decreasing), the path's ``a``,
    ``sigma`` and log-SNR ``lam`` at each (lam = +inf and sigma = 0 at a final t = 0 node)."""
    t: Tensor
    a: Tensor
    sigma: Tensor
    lam: Tensor

    @property
    def num_steps(self) -> int:
        return len(self.t) - 1

    @property
    def ends_at_data(self) -> bool:
        return bool(self.sigma[-1] == 0)

    def coeffs(self, i: int, like: Tensor):
        """(a_i, sigma_i) as 0-d tensors in like's dtype and device."""
        return (torch.as_tensor(self.a[i], dtype=like.dtype, device=like.device),
                torch.as_tensor(self.sigma[i], dtype=like.dtype, device=like.device))

    def __getitem__(self, sl: slice) -> "Grid":
        return Grid(self.t[sl], self.a[sl], self.sigma[sl], self.lam[sl])


def make_grid(sde, t: Tensor) -> Grid:
    t = torch.as_tensor(t, dtype=torch.float64)
    a, s = sde.marginal_coeffs(t)
    lam = sde.log_snr(t)
    lam = torch.where(s == 0, torch.full_like(lam, float("inf")), lam)
    return Grid(t, torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(s, dtype=torch.float64), lam)


# ------------------------------------------------------------------------------------------------ results, context
@dataclasses.dataclass
class SampleResult:
    samples: Tensor           #: (B, *D) final samples
    nfe: int                  #: exact number of network calls (batched)
    timesteps: Tensor         #: the time grid walked (endpoints only for adaptive integrators)
    method: str
    options: Dict[str, Any]
    stats: Dict[str, Any] = dataclasses.field(default_factory=dict)   #: adaptive: accepted / rejected steps


class SamplingContext:
    """What a sampler may touch: the path (``sde``), the counted prediction, the noise source, the step callback."""

    def __init__(self, sde, model, generator=None, callback=None, num_steps: int = 0, constraint=None):
        self.sde = sde
        self.model: Model = as_model(model)
        self.generator = generator
        self.callback = callback
        self.constraint = constraint
        self.num_steps = num_steps
        self.nfe = 0

    def predict(self, x: Tensor, t) -> Prediction:
        """The model at (x, t) (t a float or (B,)), converted (``pred.eps``/``x0``/``score``/``velocity``); one counted
        call.  Finiteness is checked once per step on the state (``step_done``): one device sync per step."""
        pred = self.model.predict(self.sde, x, t)
        self.nfe += 1
        return pred

    def score(self, x: Tensor, t) -> Tensor:
        """grad_x log p_t(x) from one prediction."""
        return self.predict(x, t).score

    def noise(self, x: Tensor) -> Tensor:
        """z ~ N(0, I) shaped like x, from the sampler's generator."""
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)

    def coeffs(self, t, x: Tensor):
        """(a(t), sigma(t)) of the path as tensors in x's dtype."""
        a, s = self.sde.marginal_coeffs(torch.as_tensor(t, dtype=torch.float64))
        return (torch.as_tensor(a, dtype=x.dtype, device=x.device),
                torch.as_tensor(s, dtype=x.dtype, device=x.device))

    def step_done(self, i: int, t, x: Tensor, **extra) -> Tensor:
        """After step i (now at time t): check the state, apply the constraint, call the callback; return the state."""
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"samples became non-finite at step {i + 1} (t={float(t):.6g}, after {self.nfe} "
                                 f"network calls): check the model, or try more steps, a larger eps "
                                 f"or a smaller corrector snr")
        if self.constraint is not None:
            x = self.constraint(x, torch.as_tensor(t, dtype=x.dtype, device=x.device), self.generator)
        if self.callback is not None:
            self.callback(dict(i=i, t=float(t), x=x, nfe=self.nfe, num_steps=self.num_steps, **extra))
        return x


def _progress_callback(num_steps: int, method: str, user_callback):
    from tqdm.auto import tqdm
    bar = tqdm(total=num_steps, desc=f"sampling ({method})", leave=False)

    def cb(info):
        bar.update(1)
        bar.set_postfix(t=f"{info['t']:.4f}", nfe=info["nfe"])
        if info["i"] + 1 >= num_steps:
            bar.close()
        if user_callback is not None:
            user_callback(info)
    return cb


def _split_options(info: SamplerInfo, schedule: str, options: Dict[str, Any]):
    own = set(info.options)
    sched = set(schedule_options(schedule))
    unknown = sorted(set(options) - own - sched)
    if unknown:
        raise ValueError(f"method {info.name!r} got unknown option(s) {unknown}; it accepts {sorted(own)}"
                         + (f" and schedule {schedule!r} accepts {sorted(sched)}" if sched else ""))
    # a name both take goes to both
    return ({k: v for k, v in options.items() if k in own}, {k: v for k, v in options.items() if k in sched})


def sample(sde, model, shape, method: str, num_steps: int, generator: Optional[torch.Generator] = None, *,
           eps: Optional[float] = None, schedule: Union[str, Sequence[float], Tensor] = "uniform", denoise: bool = True,
           callback: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = False,
           dtype: torch.dtype = torch.float32, device=None, x_init: Optional[Tensor] = None,
           constraint: Optional[Callable[[Tensor, Tensor, Optional[torch.Generator]], Tensor]] = None,
           **options) -> SampleResult:
    """Draw samples by integrating the reverse of the path ``sde`` from T down to the data.

    Args:
        sde: an ``sde_diffusion.sdes.SDE`` (a Gaussian path).
        model: a ``sde_diffusion.prediction.Model`` (declared output and time convention), or any
            ``score_fn(x: (B, *D), t: (B,)) -> (B, *D)``.
        shape: ``(B, *D)``.
        method: one of ``available()``.
        num_steps: number of steps on the grid (>= 1); adaptive integrators ignore it.
        generator: ``torch.Generator`` for the prior draw and all noise (reproducible runs).
        eps: last positive time of the grid (default ``sde.sampling_eps``, 1e-5).
        schedule: time grid, see ``solvers.schedules`` (default ``uniform``); its options (``rho``) go in **options.
            Or the grid itself: a decreasing sequence of positive times (``num_steps`` of them with ``denoise``, where
            t = 0 is appended; ``num_steps + 1`` without).
        denoise: end on x0_hat at t = 0 (default True): samplers that land on the data take that step themselves,
            the others' last step becomes the jump to x0_hat — no extra network call.  False: end at ``eps`` with the
            sampler's state.  Adaptive integrators: one extra call at ``eps``.
        callback: called after each step with a dict (``i``, ``t``, ``x``, ``nfe``, ``num_steps``, ...).
        progress: show a tqdm progress bar.
        dtype, device: of the samples (float32 by default; float64 for comparisons with analytic answers).
        x_init: start from this state at T instead of a prior draw.
        constraint: ``(x, t, generator) -> x`` applied to the state at the start and after every step (e.g. replace
            known pixels by forward-noised data: inpainting).  Samplers that declare no support refuse it.
        **options: the method's own options (``solvers.get_sampler(method).options``) and the schedule's.
    """
    info = get_sampler(method)
    sampler_opts, sched_opts = _split_options(info, schedule if isinstance(schedule, str) else "", options)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, *D) with positive sizes, got {shape}")
    eps = float(getattr(sde, "sampling_eps", 1e-5) if eps is None else eps)
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")
    if constraint is not None and not info.supports_constraint:
        raise ValueError(f"method {method!r} cannot apply a constraint (it is adaptive or does not support one): "
                         f"use a fixed-grid sampler such as ancestral, ddim or pc")
    model = as_model(model)

    if x_init is not None:
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}")
        x = x_init.to(dtype=dtype, device=device)
    else:
        x = sde.prior_sample(shape, generator=generator, dtype=dtype, device=device)
    if info.kind == "fixed":
        steps_on_schedule = num_steps - 1 if denoise else num_steps
        if isinstance(schedule, str):
            t = get_timesteps(sde, steps_on_schedule, eps=eps, schedule=schedule, model=model, like=x,
                              solver=(method, sampler_opts, denoise), **sched_opts)
        else:
            t = _custom_grid(sde, schedule, num_steps, denoise)
        if denoise:
            t = torch.cat([t, t.new_zeros(1)])
        grid = make_grid(sde, t)
    else:
        grid = make_grid(sde, torch.tensor([float(sde.T), eps], dtype=torch.float64))
    if progress and info.kind == "fixed":
        callback = _progress_callback(num_steps, method, callback)
    if constraint is not None:
        x = constraint(x, grid.t[0].to(dtype=dtype, device=x.device), generator)
    ctx = SamplingContext(sde, model, generator=generator, callback=callback, num_steps=num_steps,
                          constraint=constraint)
    stats: Dict[str, Any] = {}
    if info.kind == "adaptive":
        x, stats = info.fn(ctx, x, float(grid.t[0]), float(grid.t[-1]), **sampler_opts)
        if denoise:
            x = _jump_to_data(ctx, x, grid.t[-1], num_steps)
    elif denoise and not info.lands_on_data:
        if grid.num_steps > 1:
            x = info.fn(ctx, x, grid[:-1], **sampler_opts)
        x = _jump_to_data(ctx, x, grid.t[-2], grid.num_steps - 1)
    else:
        x = info.fn(ctx, x, grid, **sampler_opts)
    return SampleResult(samples=x, nfe=ctx.nfe, timesteps=grid.t, method=method, options=dict(options), stats=stats)


def _custom_grid(sde, schedule, num_steps: int, denoise: bool) -> Tensor:
    t = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    expected = t.numel() if denoise else t.numel() - 1
    if num_steps != expected:
        raise ValueError(f"a custom grid of {t.numel()} times makes {expected} steps "
                         f"({'with' if denoise else 'without'} the step to the data), but num_steps is {num_steps}")
    if not (bool((t[1:] < t[:-1]).all()) and float(t[-1]) > 0):
        # (t[0] may exceed T slightly: a discrete chain's top level can be noisier than the path at T)
        raise ValueError(f"a custom grid must be strictly decreasing positive times, got {t.tolist()[:4]}...")
    return t


def _jump_to_data(ctx: SamplingContext, x: Tensor, t, i: int) -> Tensor:
    """x0_hat = E[x(0) | x(t) = x] from one prediction (Tweedie's formula), reported as step i ending at t = 0."""
    x = ctx.predict(x, t).x0
    return ctx.step_done(i, 0.0, x)
