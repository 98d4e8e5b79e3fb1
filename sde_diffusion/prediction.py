"""What a sampler samples from: a model with a declared output and time convention, and its converted prediction.

For a Gaussian path x_t = a(t) x0 + sigma(t) eps (every SDE in ``sdes``), a network may output any of

* ``score``    — grad_x log p_t(x)                      eps = -sigma score,     x0 = (x + sigma^2 score) / a
* ``eps``      — the noise eps (DDPM)                    x0 = (x - sigma eps) / a
* ``x0``       — the clean data (EDM's denoiser D)       eps = (x - a x0) / sigma
* ``v``        — v = a~ eps - sigma~ x0 with a~ = a/r, sigma~ = sigma/r, r = sqrt(a^2 + sigma^2)
                 (Salimans & Ho 2022, sec. 4, generalised to any path by normalising (a, sigma) to the unit circle):
                 x0 = a~ x~ - sigma~ v, eps = sigma~ x~ + a~ v with x~ = x / r
* ``velocity`` — u = a' x0 + sigma' eps, the conditional velocity of flow matching; inverted with the 2x2 system
                 [a sigma; a' sigma'] (x0, eps) = (x, u)

and every one of them determines the others (Tweedie's formula links the score to x0: E[x0 | x_t] = (x + sigma^2
grad log p_t) / a).  The probability-flow velocity dx/dt = f - 1/2 g^2 score equals a' x0_hat + sigma' eps_hat for any
path (substitute f = (a'/a) x, g^2 = 2 sigma sigma' - 2 (a'/a) sigma^2 and x = a x0_hat + sigma eps_hat).

**Time conventions.**  ``Model(fn, output)`` is a continuous-time model: ``fn(x, t)`` with the path's t.  A model
trained on a discrete chain (DDPM's N steps, SMLD's N noise levels) declares it with ``discrete=(a_table,
sigma_table)``, the (a_i, sigma_i) of its training levels i = 0..N-1 (noise increasing with i), and ``model_time`` (the
network input for a, possibly fractional, index; default the index itself).  Asked at path time t, it is evaluated at
the index whose log-SNR equals lambda(t) (linear interpolation in lambda, clamped to the table), so that at the
discrete schedules' nodes (``solvers.schedules``: ``leading``/``trailing``/``linspace``) the network sees exactly the
noise level it was trained at, and its output is converted with that level's (a, sigma).

**Learned reverse variances** (Nichol & Dhariwal 2021, eq. 15).  A model built with ``learned_variance=True`` returns
a pair ``(value, v)`` from ``fn``: ``v`` (x's shape) interpolates the reverse step's log-variance between the two
fixed choices, log Sigma = v log beta + (1 - v) log beta-tilde, for whatever step (s < t) a sampler or a bound takes
(the ancestral sampler's ``variance="learned"``, ``sde_diffusion.elbo``).  ``Prediction.log_variance_frac`` carries
it (None for every other model).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import torch

from .sdes import expand_as_batch

Tensor = torch.Tensor

__all__ = ["Model", "Prediction", "OUTPUTS", "as_model"]

OUTPUTS = ("score", "eps", "x0", "v", "velocity")


class Prediction:
    """One model evaluation at (x, t), converted on demand: ``eps``, ``x0``, ``score``, ``velocity`` (probability
    flow dx/dt).  ``a``, ``sigma`` (and ``da``, ``dsigma``) broadcast against x."""

    def __init__(self, sde, x: Tensor, t: Tensor, output: str, value: Tensor,
                 log_variance_frac: Optional[Tensor] = None):
        self.sde, self.x, self.t, self.output, self.value = sde, x, t, output, value
        #: v of a learned-variance model (x's shape): log Sigma = v log beta + (1 - v) log beta-tilde; else None
        self.log_variance_frac = log_variance_frac
        a, s = sde.marginal_coeffs(t.to(torch.float64))
        self.a = expand_as_batch(a, x)
        self.sigma = expand_as_batch(s, x)

    @functools.cached_property
    def _derivs(self) -> Tuple[Tensor, Tensor]:
        da, ds = self.sde.marginal_coeffs_dt(self.t.to(torch.float64))
        return expand_as_batch(da, self.x), expand_as_batch(ds, self.x)

    @property
    def da(self) -> Tensor:
        return self._derivs[0]

    @property
    def dsigma(self) -> Tensor:
        return self._derivs[1]

    @functools.cached_property
    def _x0_eps(self) -> Tuple[Tensor, Tensor]:
        x, a, s, out = self.x, self.a, self.sigma, self.value
        if self.output == "eps":
            return (x - s * out) / a, out
        if self.output == "score":
            return (x + s ** 2 * out) / a, -s * out
        if self.output == "x0":
            return out, (x - a * out) / s
        if self.output == "v":
            r = torch.sqrt(a ** 2 + s ** 2)
            at, st, xt = a / r, s / r, x / r
            return at * xt - st * out, st * xt + at * out
        # velocity u = a' x0 + sigma' eps together with x = a x0 + sigma eps
        da, ds = self._derivs
        det = a * ds - s * da
        return (ds * x - s * out) / det, (a * out - da * x) / det

    @property
    def x0(self) -> Tensor:
        """x0_hat = E[x0 | x_t = x]."""
        return self._x0_eps[0]

    @property
    def eps(self) -> Tensor:
        """eps_hat = E[eps | x_t = x]."""
        return self._x0_eps[1]

    @property
    def score(self) -> Tensor:
        """grad_x log p_t(x) = -eps_hat / sigma."""
        if self.output == "score":
            return self.value
        return -self.eps / self.sigma

    @property
    def velocity(self) -> Tensor:
        """Probability-flow dx/dt = f - 1/2 g^2 score = a' x0_hat + sigma' eps_hat."""
        if self.output == "velocity":
            return self.value
        da, ds = self._derivs
        return da * self.x0 + ds * self.eps


class Model:
    """A network function with its declared output (one of ``OUTPUTS``) and time convention; see the module doc.

    Args:
        fn: ``fn(x: (B, *D), t_in: (B,)) -> (B, *D)``.
        output: what fn returns.
        discrete: ``(a_table, sigma_table)`` of a discrete-time model's N training levels (noise increasing with the
            index), or None for a continuous-time model (fn takes the path's t).
        model_time: for a discrete model, ``index (B,) float -> t_in`` (default: the index).
        learned_variance: fn returns ``(value, v)``, v the log-variance interpolation of the reverse step
            (``Prediction.log_variance_frac``; Nichol & Dhariwal 2021, eq. 15).
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], output: str = "score", *,
                 discrete: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
                 model_time: Optional[Callable[[Tensor], Tensor]] = None, learned_variance: bool = False):
        if output not in OUTPUTS:
            raise ValueError(f"unknown model output {output!r}; available: {', '.join(OUTPUTS)}")
        if not callable(fn):
            raise TypeError(f"a model needs a callable fn(x, t), got {type(fn).__name__}")
        self.fn, self.output = fn, output
        self.model_time = model_time
        self.learned_variance = bool(learned_variance)
        self.discrete = None
        if discrete is not None:
            a, s = (torch.as_tensor(v, dtype=torch.float64).flatten() for v in discrete)
            if a.shape != s.shape or a.numel() < 2 or not bool((s > 0).all() and (a > 0).all()):
                raise ValueError("discrete=(a_table, sigma_table) needs two equal-length tables (N >= 2) of "
                                 "positive values")
            lam = torch.log(a) - torch.log(s)
            if not bool((lam[1:] < lam[:-1]).all()):
                raise ValueError("a discrete model's levels must have strictly increasing noise (decreasing "
                                 "log-SNR) with the index")
            self.discrete = (a, s)
            self.log_snr_table = lam

    @property
    def is_discrete(self) -> bool:
        return self.discrete is not None

    def fractional_index(self, lam: Tensor) -> Tensor:
        """The (fractional) training level whose log-SNR is lam, clamped to [0, N-1]."""
        q = -self.log_snr_table.to(lam.device)              # increasing
        v = torch.clamp(-lam.to(torch.float64), min=float(q[0]), max=float(q[-1]))
        j = torch.clamp(torch.searchsorted(q, v), 1, q.numel() - 1)
        return (j - 1) + (v - q[j - 1]) / (q[j] - q[j - 1])

    def network_time(self, sde, t: Tensor, like: Tensor) -> Tensor:
        """What fn receives at path time t (B,)."""
        if self.discrete is None:
            return t.to(dtype=like.dtype)
        idx = self.fractional_index(sde.log_snr(t.to(torch.float64)))
        tin = idx if self.model_time is None else self.model_time(idx)
        return torch.as_tensor(tin, device=like.device).to(dtype=like.dtype)

    def predict(self, sde, x: Tensor, t) -> Prediction:
        """One evaluation of fn at (x, t), t a float or a tensor of shape () or (B,)."""
        # a Python number becomes float64 first (as_tensor would round it to float32 before the cast to x's dtype)
        t = t.to(x.device) if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        t = t.to(dtype=x.dtype)
        out = self.fn(x, self.network_time(sde, t, x))
        v = None
        if self.learned_variance:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise ValueError(f"a learned-variance model's fn must return (value, v), got {type(out).__name__}")
            out, v = out
            if not isinstance(v, Tensor) or v.shape != x.shape:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"the model returned v of shape {shape} for x of shape {tuple(x.shape)}; it must "
                                 f"have x's shape")
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model returned {shape} for x of shape {tuple(x.shape)}; it must return x's shape")
        return Prediction(sde, x, t, self.output, out, log_variance_frac=v)

    def score_fn(self, sde) -> Callable[[Tensor, Tensor], Tensor]:
        """A plain ``score_fn(x, t)`` (for the likelihood, guidance wrappers, losses)."""
        if self.output == "score" and self.discrete is None and not self.learned_variance:
            return self.fn
        return lambda x, t: self.predict(sde, x, t).score


def as_model(obj) -> Model:
    """A ``Model`` as is; any other callable is read as a continuous-time ``score_fn(x, t)``."""
    if isinstance(obj, Model):
        return obj
    if callable(obj):
        return Model(obj, "score")
    raise TypeError(f"expected a prediction.Model or a score_fn(x, t), got {type(obj).__name__}")
