"""The one sampling entry point, the sampler registry, and the context every sampler works through.

A sampler is a function ``fn(ctx, x, timesteps, **options) -> x`` registered with ``@register_sampler(name)``.  It
starts from ``x`` drawn from the prior at ``timesteps[0] = T`` and walks the grid down to ``timesteps[-1] = eps``.  It
sees the SDE (``ctx.sde``) and the score only through ``ctx.score(x, t)``, which counts evaluations, broadcasts ``t``
to ``(B,)`` and checks the output; it draws noise with ``ctx.noise(x)`` and reports each step with
``x = ctx.step_done(i, t, x)``, which also applies an optional ``constraint(x, t, generator) -> x`` (the hook that
inpainting and colourisation use to re-impose known data after every step).  Solvers import nothing from networks,
data or configs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .schedules import get_timesteps

Tensor = torch.Tensor

__all__ = ["sample", "available", "register_sampler", "get_sampler", "SampleResult", "SamplingContext",
           "NonFiniteError", "SamplerInfo", "tweedie_denoise"]


class NonFiniteError(FloatingPointError):
    """Raised when the score or the state stops being finite during sampling."""


@dataclasses.dataclass
class SamplerInfo:
    name: str
    fn: Callable
    description: str
    #: option sets worth comparing (e.g. the ODE's integrators); experiments sweep these
    variants: List[Dict[str, Any]]
    #: whether num_steps controls the cost (False for adaptive integrators)
    fixed_steps: Callable[[Dict[str, Any]], bool]

    @property
    def options(self) -> List[str]:
        params = list(inspect.signature(self.fn).parameters.values())[3:]
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD]


_SAMPLERS: Dict[str, SamplerInfo] = {}


def register_sampler(name: str, variants: Optional[Sequence[Dict[str, Any]]] = None,
                     fixed_steps: Optional[Callable[[Dict[str, Any]], bool]] = None):
    """Decorator registering ``fn(ctx, x, timesteps, **options) -> x`` as ``solvers.sample(..., method=name)``."""
    def deco(fn):
        if name in _SAMPLERS:
            raise ValueError(f"a sampler named {name!r} is already registered")
        doc = inspect.getdoc(fn) or ""
        _SAMPLERS[name] = SamplerInfo(name, fn, doc.split("\n")[0], [dict(v) for v in (variants or [{}])],
                                      fixed_steps or (lambda opts: True))
        return fn
    return deco


def available() -> List[str]:
    """Names of the registered sampling methods."""
    return sorted(_SAMPLERS)


def get_sampler(method: str) -> SamplerInfo:
    if method not in _SAMPLERS:
        raise ValueError(f"unknown sampling method {method!r}; available: {', '.join(available())}")
    return _SAMPLERS[method]


@dataclasses.dataclass
class SampleResult:
    samples: Tensor           #: (B, *D) final samples (denoised if asked)
    nfe: int                  #: exact number of score evaluations (batched calls)
    timesteps: Tensor         #: the time grid walked, T -> eps (endpoints only for adaptive solvers)
    method: str
    options: Dict[str, Any]


class SamplingContext:
    """What a sampler may touch: the SDE, the checked and counted score, the noise source, the step callback."""

    def __init__(self, sde, score_fn, generator=None, callback=None, num_steps: int = 0, constraint=None):
        self.sde = sde
        self._score_fn = score_fn
        self.generator = generator
        self.callback = callback
        self.constraint = constraint
        self.num_steps = num_steps
        self.nfe = 0

    def score(self, x: Tensor, t) -> Tensor:
        """score_fn(x, t) with t broadcast to (B,); counted and checked for shape.  Finiteness is checked once per step,
        on the state (``step_done``): a non-finite score makes the state non-finite, and one device sync per step is
        enough."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        s = self._score_fn(x, t)
        self.nfe += 1
        if not isinstance(s, Tensor) or s.shape != x.shape:
            shape = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"score_fn returned {shape} for x of shape {tuple(x.shape)}; it must return x's shape")
        return s

    def noise(self, x: Tensor) -> Tensor:
        """z ~ N(0, I) shaped like x, from the sampler's generator."""
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)

    def coeffs(self, t, x: Tensor):
        """(a(t), sigma(t)) of the SDE's Gaussian transition as tensors in x's dtype."""
        a, s = self.sde.marginal_coeffs(torch.as_tensor(t, dtype=torch.float64))
        return (torch.as_tensor(a, dtype=x.dtype, device=x.device),
                torch.as_tensor(s, dtype=x.dtype, device=x.device))

    def step_done(self, i: int, t, x: Tensor, **extra) -> Tensor:
        """After step i (now at time t): check the state, apply the constraint, call the callback; return the state."""
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"samples became non-finite at step {i + 1} (t={float(t):.6g}, after {self.nfe} "
                                 f"score evaluations): check the score network, or try more steps, a larger eps "
                                 f"or a smaller corrector snr")
        if self.constraint is not None:
            x = self.constraint(x, torch.as_tensor(t, dtype=x.dtype, device=x.device), self.generator)
        if self.callback is not None:
            self.callback(dict(i=i, t=float(t), x=x, nfe=self.nfe, num_steps=self.num_steps, **extra))
        return x


def tweedie_denoise(ctx: SamplingContext, x: Tensor, t) -> Tensor:
    """E[x(0) | x(t) = x] = (x + sigma(t)^2 grad log p_t(x)) / a(t)   (Tweedie's formula; one score evaluation)."""
    a, s = ctx.coeffs(t, x)
    return (x + s ** 2 * ctx.score(x, t)) / a


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


def sample(sde, score_fn, shape, method: str, num_steps: int, generator: Optional[torch.Generator] = None, *,
           eps: Optional[float] = None, schedule: str = "uniform", denoise: bool = True,
           callback: Optional[Callable[[Dict[str, Any]], None]] = None, progress: bool = False,
           dtype: torch.dtype = torch.float32, device=None, x_init: Optional[Tensor] = None,
           constraint: Optional[Callable[[Tensor, Tensor, Optional[torch.Generator]], Tensor]] = None,
           **options) -> SampleResult:
    """Draw samples by integrating the reverse of ``sde`` from T down to ``eps``.

    Args:
        sde: an ``sde_diffusion.sdes.SDE``.
        score_fn: ``(x: (B, *D), t: (B,)) -> (B, *D)``, an estimate of grad_x log p_t(x).
        shape: ``(B, *D)``.
        method: one of ``available()``: ``ancestral``, ``euler_maruyama``, ``pc``, ``ode``.
        num_steps: number of steps on the time grid (>= 1); adaptive ODE solvers ignore it.
        generator: ``torch.Generator`` for the prior draw and all noise (reproducible runs).
        eps: last time of the grid (default ``sde.default_eps``: 1e-3 for VP/sub-VP/OU/Brownian, 1e-5 for VE).
        schedule: time grid, see ``solvers.schedules`` (default ``uniform``).
        denoise: finish with Tweedie's formula at eps (one extra score evaluation; default True).
        callback: called after each step with a dict (``i``, ``t``, ``x``, ``nfe``, ``num_steps``, ...).
        progress: show a tqdm progress bar.
        dtype, device: of the samples (float32 by default; float64 for comparisons with analytic answers).
        x_init: start from this state at T instead of a prior draw.
        constraint: ``(x, t, generator) -> x`` applied to the state at the start (t = T) and after every step (e.g.
            replace known pixels by forward-noised data: inpainting).  Adaptive solvers do not support it.
        **options: the method's own options (``solvers.get_sampler(method).options`` lists them).
    """
    info = get_sampler(method)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise ValueError(f"method {method!r} got unknown option(s) {unknown}; it accepts {info.options}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ValueError(f"shape must be (B, *D) with positive sizes, got {shape}")
    eps = sde.default_eps if eps is None else float(eps)
    if not 0 < eps < sde.T:
        raise ValueError(f"eps must lie in (0, T={sde.T}), got {eps}")

    timesteps = get_timesteps(sde, num_steps, eps=eps, schedule=schedule, dtype=torch.float64)
    if x_init is not None:
        if tuple(x_init.shape) != shape:
            raise ValueError(f"x_init has shape {tuple(x_init.shape)}, expected {shape}")
        x = x_init.to(dtype=dtype, device=device)
    else:
        x = sde.prior_sample(shape, generator=generator, dtype=dtype, device=device)
    if progress and info.fixed_steps(options):
        callback = _progress_callback(num_steps, method, callback)
    if constraint is not None:
        if not info.fixed_steps(options):
            raise ValueError(f"method {method!r} with options {options} is adaptive and cannot apply a constraint")
        x = constraint(x, timesteps[0].to(dtype=dtype, device=x.device), generator)
    ctx = SamplingContext(sde, score_fn, generator=generator, callback=callback, num_steps=num_steps,
                          constraint=constraint)
    x = info.fn(ctx, x, timesteps, **options)
    if denoise:
        x = tweedie_denoise(ctx, x, timesteps[-1])
        if not torch.isfinite(x).all():
            raise NonFiniteError("the final denoising step produced non-finite samples")
    return SampleResult(samples=x, nfe=ctx.nfe, timesteps=timesteps, method=method, options=dict(options))
