"""Pluggable samplers for score-based diffusion models.

``solvers.sample(sde, score_fn, shape, method, num_steps, generator=None, **options) -> SampleResult`` is the one entry
point; ``solvers.available()`` lists the methods.  A new sampler is one file with one ``@register_sampler`` function,
imported below.  Solvers see only the SDE interface, a ``score_fn(x, t)`` and tensors.
"""
from .base import (NonFiniteError, SampleResult, SamplerInfo, SamplingContext, available, get_sampler,
                   register_sampler, sample, tweedie_denoise)
from .schedules import available_schedules, get_timesteps, register_schedule
from . import ancestral, euler_maruyama, pc, ode, ddim  # noqa: F401  (registers the samplers)

__all__ = ["sample", "available", "register_sampler", "get_sampler", "SampleResult", "SamplerInfo",
           "SamplingContext", "NonFiniteError", "tweedie_denoise", "get_timesteps", "available_schedules",
           "register_schedule"]
