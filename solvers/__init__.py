"""Pluggable samplers for diffusion models on any Gaussian path.

``solvers.sample(sde, model, shape, method, num_steps, generator=None, **options) -> SampleResult`` is the one entry
point; ``solvers.available()`` lists the methods.  A new sampler is one file in this folder with one
``@register_sampler`` (fixed grid) or ``@register_adaptive`` function: every module here is imported on first import
of the package, so nothing else needs editing.  Solvers see only the path (the SDE), ``ctx.predict`` and tensors.
"""
import importlib as _importlib
import pkgutil as _pkgutil

from .base import (Grid, NonFiniteError, SampleResult, SamplerInfo, SamplingContext, available, get_sampler,
                   make_grid, register_adaptive, register_sampler, sample)
from .schedules import available_schedules, get_timesteps, register_schedule, schedule_options

_INFRASTRUCTURE = {"base", "schedules"}
for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name not in _INFRASTRUCTURE and not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["sample", "available", "register_sampler", "register_adaptive", "get_sampler", "SampleResult",
           "SamplerInfo", "SamplingContext", "NonFiniteError", "Grid", "make_grid", "get_timesteps",
           "available_schedules", "register_schedule", "schedule_options"]
