"""Forward SDEs dx = f(x, t) dt + g(t) dW with Gaussian transitions, and everything derived from them.

Every SDE here is linear in x with a scalar, time-dependent diffusion, so the transition from x(0) is Gaussian:

    x(t) | x(0) ~ N(a(t) x(0), sigma(t)^2 I),

with ``(a, sigma) = sde.marginal_coeffs(t)`` in closed form.  From one SDE object we derive the prior at ``T``,
its log-density, the one-step discretisation used by ancestral / reverse-diffusion samplers, and the reverse-time SDE

    dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dW_bar        (Anderson 1982; Song et al. 2021, eq. 6)

or its probability-flow ODE  dx = [f(x, t) - 1/2 g(t)^2 s(x, t)] dt   (Song et al. 2021, eq. 13).

Every SDE is also a **Gaussian path**, the interface the samplers work with (solvers v2): ``marginal_coeffs(t)`` =
(a, sigma), ``marginal_coeffs_dt(t)`` = (da/dt, dsigma/dt), ``log_snr(t)`` = lambda(t) = log(a/sigma) (strictly
decreasing) and its inverse ``t_from_log_snr(lam)`` (closed form for every SDE here; bisection is the fallback of the
base class), ``t_min`` (the smallest time the path is defined at) and ``sampling_eps`` (the default last positive time
of a sampler's grid).  Drift and diffusion follow from any path (``drift_from_path`` / ``diffusion_from_path``):
f(x, t) = (a'/a) x and g(t)^2 = 2 sigma sigma' - 2 (a'/a) sigma^2 (the moment equations dm/dt = f m, dv/dt = 2 f v + g^2
of a linear SDE solved for f and g), so a new Gaussian process needs only its (a, sigma).

Shapes: ``x`` is ``(B, *D)``; ``t`` is a float or a tensor of shape ``()`` or ``(B,)``.  Coefficients that depend only
on t come back with ``t``'s shape; ``expand_as_batch`` broadcasts them against ``x``.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, Optional, Tuple

import torch

from .registry import Registry

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "SDE", "VPPath", "VPSDE", "SubVPSDE", "VESDE", "OUSDE", "BrownianSDE", "ReverseSDE",
    "get_sde", "register_sde", "available_sdes", "expand_as_batch",
]


def expand_as_batch(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample coefficient ``v`` of shape ``()`` or ``(B,)`` so that it broadcasts against ``x: (B, *D)``."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (x.dim() - 1)))


def _as_time(t, like: Optional[Tensor] = None) -> Tensor:
    if isinstance(t, Tensor):
        return t if like is None else t.to(dtype=like.dtype, device=like.device)
    if like is None:
        return torch.tensor(float(t), dtype=torch.float64)
    return torch.tensor(float(t), dtype=like.dtype, device=like.device)


_REGISTRY = Registry("SDE")
register_sde = _REGISTRY.register        # class decorator: make an SDE buildable by ``get_sde(name, **kw)``
available_sdes = _REGISTRY.names


def get_sde(name: str, **kwargs) -> "SDE":
    """Build a registered SDE by name (``vpsde``/``vp``, ``subvpsde``/``subvp``, ``vesde``/``ve``, ``ou``, ``brownian``)."""
    key = name.lower()
    aliases = {"vp": "vpsde", "subvp": "subvpsde", "ve": "vesde"}
    key = aliases.get(key, key)
    return _REGISTRY.get(key, shown=name)(**kwargs)


class SDE(abc.ABC):
    """A forward SDE dx = f(x, t) dt + g(t) dW on [0, T] whose transition from x(0) is N(a(t) x0, sigma(t)^2 I).

    Subclasses define ``T``, ``drift``, ``diffusion``, ``marginal_coeffs`` and ``prior_std``; everything else
    (``marginal``, prior, ``discretize``, ``reverse``) follows.
    """

    name = "sde"
    #: default smallest time of likelihood integration, DSM training and classifier training (the score blows up as
    #: t -> 0)
    default_eps = 1e-3
    #: default last positive time of a sampler's grid (solvers.sample's ``eps``): small enough that the noise left
    #: there (sigma ~ 1e-3 of the data scale) sits below the sample-size floor of the analytic targets, since the grid
    #: ends with a jump to the denoised x0-hat at no extra cost
    sampling_eps = 1e-5
    #: smallest time the path is defined at (sigma(t_min) = 0 for every SDE here)
    t_min = 0.0

    def __init__(self, N: int = 1000):
        if int(N) < 1:
            raise ValueError(f"N must be >= 1, got {N}")
        self.N = int(N)

    # ------------------------------------------------------------------ definition
    @property
    @abc.abstractmethod
    def T(self) -> float:
        """End time of the forward process."""

    def drift(self, x: Tensor, t) -> Tensor:
        """f(x, t), shape of x (default: derived from the path, ``drift_from_path``)."""
        return self.drift_from_path(x, t)

    def diffusion(self, t) -> Tensor:
        """g(t), shape of t (default: derived from the path, ``diffusion_from_path``)."""
        return self.diffusion_from_path(t)

    @abc.abstractmethod
    def marginal_coeffs(self, t) -> Tuple[Tensor, Tensor]:
        """(a(t), sigma(t)) with x(t) | x(0) ~ N(a(t) x(0), sigma(t)^2 I); shapes of t."""

    @property
    @abc.abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the isotropic Gaussian prior N(0, prior_std^2 I) used at time T."""

    # ------------------------------------------------------------------ Gaussian path
    def marginal_coeffs_dt(self, t) -> Tuple[Tensor, Tensor]:
        """(da/dt, dsigma/dt) at t, shapes of t.  Default: autograd through ``marginal_coeffs`` (subclasses here give
        closed forms)."""
        t = _as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            a, s = self.marginal_coeffs(t)
            da, ds = (torch.autograd.grad(c.sum(), t, retain_graph=True)[0] if c.requires_grad
                      else torch.zeros_like(t) for c in (a, s))      # a constant coefficient has no graph
        return da.detach(), ds.detach()

    def log_snr(self, t) -> Tensor:
        """lambda(t) = log(a(t) / sigma(t)), strictly decreasing in t; +inf where sigma = 0."""
        a, s = self.marginal_coeffs(_as_time(t))
        return torch.log(a) - torch.log(s)

    def t_from_log_snr(self, lam) -> Tensor:
        """The inverse of ``log_snr`` on [t_min, T].  Default: bisection in float64 (subclasses give closed forms)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo = torch.full_like(lam, float(self.t_min))
        hi = torch.full_like(lam, float(self.T))
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > lam          # lambda decreases: the root lies later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def drift_from_path(self, x: Tensor, t) -> Tensor:
        """f(x, t) = (a'(t) / a(t)) x, the drift of the linear SDE whose transition is N(a x0, sigma^2 I)."""
        t = _as_time(t, x)
        a, _ = self.marginal_coeffs(t)
        da, _ = self.marginal_coeffs_dt(t)
        return expand_as_batch(da / a, x) * x

    def diffusion_from_path(self, t) -> Tensor:
        """g(t) = sqrt(2 sigma sigma' - 2 (a'/a) sigma^2) (from dv/dt = 2 f v + g^2 with v = sigma^2)."""
        t = _as_time(t)
        a, s = self.marginal_coeffs(t)
        da, ds = self.marginal_coeffs_dt(t)
        return torch.sqrt(torch.clamp(2 * s * ds - 2 * (da / a) * s ** 2, min=0.0))

    # ------------------------------------------------------------------ derived
    def marginal(self, x0: Tensor, t) -> Tuple[Tensor, Tensor]:
        """Mean and std of p_{0t}(x(t) | x(0) = x0): mean has x0's shape, std has t's shape (broadcast with
        ``expand_as_batch``)."""
        a, std = self.marginal_coeffs(_as_time(t, x0))
        return expand_as_batch(a, x0) * x0, std

    def prior_sample(self, shape, generator: Optional[torch.Generator] = None, dtype=torch.float32,
                     device=None) -> Tensor:
        """Draw from the prior N(0, prior_std^2 I); ``shape = (B, *D)``."""
        z = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device)
        return self.prior_std * z

    def prior_logp(self, z: Tensor) -> Tensor:
        """log N(z; 0, prior_std^2 I) summed over all but the batch dimension; shape (B,)."""
        d = z[0].numel()
        s2 = self.prior_std ** 2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

    def discretize(self, x: Tensor, t, dt) -> Tuple[Tensor, Tensor]:
        """The forward step that ends at t: x_t = x_{t-dt} + f + G z, z ~ N(0, I), with x = x_{t-dt}.

        Coefficients are read at t (score_sde's convention: step i produces x_i), so the reverse step from t down to
        t - dt uses the same (f, G).  Default: Euler–Maruyama, f = f(x, t) dt, G = g(t) sqrt(dt).
        Returns (f with x's shape, G with t's shape).
        """
        t = _as_time(t, x)
        dt = _as_time(dt, x)
        return self.drift(x, t) * expand_as_batch(dt, x), self.diffusion(t) * torch.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> "ReverseSDE":
        """The reverse-time SDE (or probability-flow ODE) driven by ``score_fn(x, t) ~ grad_x log p_t(x)``."""
        return ReverseSDE(self, score_fn, probability_flow)

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._repr_args().items())})"

    def _repr_args(self):
        return {"N": self.N}


class ReverseSDE:
    """Reverse-time SDE dx = [f - g^2 s] dt + g dW_bar, or the probability-flow ODE dx = [f - 1/2 g^2 s] dt.

    Time runs from T down to 0.  ``drift``/``diffusion`` are the coefficients of the equation above, written in
    forward-time form, so an Euler–Maruyama step of size h > 0 backwards is
    x_{t-h} = x_t - drift(x_t, t) h + diffusion(t) sqrt(h) z.
    """

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = bool(probability_flow)
        self.T = sde.T
        self.N = sde.N
        self._weight = 0.5 if self.probability_flow else 1.0

    def drift(self, x: Tensor, t) -> Tensor:
        t = _as_time(t, x)
        g = expand_as_batch(self.sde.diffusion(t), x)
        return self.sde.drift(x, t) - self._weight * g ** 2 * self.score_fn(x, _batch_time(t, x))

    def diffusion(self, t) -> Tensor:
        g = self.sde.diffusion(t)
        return torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: Tensor, t, dt) -> Tuple[Tensor, Tensor]:
        """Reverse of ``sde.discretize`` (the step that ended at t): x_{t-dt} = x - rev_f + rev_G z with
        rev_f = f - G^2 s (or f - 1/2 G^2 s and rev_G = 0 for the probability flow)."""
        t = _as_time(t, x)
        f, G = self.sde.discretize(x, t, dt)
        rev_f = f - self._weight * expand_as_batch(G, x) ** 2 * self.score_fn(x, _batch_time(t, x))
        rev_G = torch.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G


def _batch_time(t: Tensor, x: Tensor) -> Tensor:
    """Make t of shape (B,), as score functions expect."""
    t = _as_time(t, x)
    return t.expand(x.shape[0]) if t.dim() == 0 else t


# ====================================================================== VP family
class _LinearBetaSDE(SDE):
    """Shared by VP and sub-VP: drift -1/2 beta(t) x on T = 1 with beta(t) = beta_min + t (beta_max - beta_min),
    int_0^t beta = beta_min t + 1/2 t^2 (beta_max - beta_min), mean coefficient a(t) = exp(-1/2 int_0^t beta)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        if not (0 <= beta_min <= beta_max):
            raise ValueError(f"need 0 <= beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_0, self.beta_1 = float(beta_min), float(beta_max)

    @property
    def T(self):
        return 1.0

    @property
    def prior_std(self):
        return 1.0

    def beta(self, t) -> Tensor:
        t = _as_time(t)
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def integrated_beta(self, t) -> Tensor:
        t = _as_time(t)
        return self.beta_0 * t + 0.5 * t ** 2 * (self.beta_1 - self.beta_0)

    def log_mean_coeff(self, t) -> Tensor:
        return -0.5 * self.integrated_beta(_as_time(t))

    def drift(self, x, t):
        t = _as_time(t, x)
        return -0.5 * expand_as_batch(self.beta(t), x) * x

    def t_from_integrated_beta(self, B) -> Tensor:
        """The t >= 0 with beta_min t + 1/2 t^2 (beta_max - beta_min) = B, in the cancellation-free form
        t = 2B / (beta_min + sqrt(beta_min^2 + 2 (beta_max - beta_min) B))."""
        B = torch.as_tensor(B, dtype=torch.float64)
        return 2 * B / (self.beta_0 + torch.sqrt(self.beta_0 ** 2 + 2 * (self.beta_1 - self.beta_0) * B))

    def _repr_args(self):
        return {"beta_min": self.beta_0, "beta_max": self.beta_1, "N": self.N}


class VPPath:
    """What every variance-preserving path shares, given its ``beta(t)`` and ``integrated_beta(t)`` = B(t) (and its own
    ``marginal_coeffs``: a = exp(-B/2), sigma^2 = 1 - a^2): the coefficients' time derivatives and the log-SNR."""

    def marginal_coeffs_dt(self, t):
        # a' = -1/2 beta a;  sigma' = -a a' / sigma = 1/2 beta a^2 / sigma
        t = _as_time(t)
        a, s = self.marginal_coeffs(t)
        b = self.beta(t)
        return -0.5 * b * a, 0.5 * b * a ** 2 / s

    def log_snr(self, t):
        # lambda = log a - 1/2 log(1 - a^2) = -1/2 log(expm1(int beta))
        return -0.5 * torch.log(torch.expm1(self.integrated_beta(_as_time(t))))


@register_sde("vpsde")
class VPSDE(VPPath, _LinearBetaSDE):
    """Variance-preserving SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW (DDPM in continuous time).

    Marginal: a(t) = exp(-1/2 int_0^t beta), sigma(t)^2 = 1 - a(t)^2.  Its discretisation on the grid
    t_i = i T/(N-1) with dt = T/N is exactly the DDPM chain x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z with
    beta_i = beta(t_i)/N = ``discrete_betas[i]``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(beta_min, beta_max, N)
        self.discrete_betas = torch.linspace(beta_min / N, beta_max / N, N, dtype=torch.float64)
        if self.discrete_betas.max() >= 1:
            raise ValueError(f"beta_max / N = {beta_max / N} must be < 1 for the DDPM chain")
        self.alphas = 1.0 - self.discrete_betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def marginal_coeffs(self, t):
        log_a = self.log_mean_coeff(t)
        # sigma^2 = 1 - exp(2 log a), computed with expm1 for accuracy at small t
        return torch.exp(log_a), torch.sqrt(-torch.expm1(2 * log_a))


    def t_from_log_snr(self, lam):
        # sigma^2 / a^2 = e^{int beta} - 1 = e^{-2 lambda}  =>  int beta = log(1 + e^{-2 lambda}) = softplus(-2 lambda)
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return self.t_from_integrated_beta(torch.nn.functional.softplus(-2 * lam))

    def discretize(self, x, t, dt):
        """The DDPM step x_t = sqrt(1 - b) x_{t-dt} + sqrt(b) z with b = beta(t) dt (= beta_i for t = t_i, dt = T/N).

        It needs b < 1, i.e. steps of dt < 1/beta_max (more than beta_max * T steps on a uniform grid)."""
        t = _as_time(t, x)
        b = self.beta(t) * _as_time(dt, x)
        if bool((b >= 1).any()):
            raise ValueError(f"the DDPM step needs beta(t) * dt < 1, got {float(b.max()):.3g} (dt = {float(dt):.3g}): "
                             f"use steps shorter than 1/beta_max = {1 / self.beta_1:.3g}, e.g. more than "
                             f"{int(self.beta_1 * self.T)} uniform steps, or an Euler–Maruyama predictor")
        return (torch.sqrt(1.0 - expand_as_batch(b, x)) - 1.0) * x, torch.sqrt(b)


@register_sde("subvpsde")
class SubVPSDE(_LinearBetaSDE):
    """sub-VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t) (1 - exp(-2 int_0^t beta))) dW  (Song et al. 2021, eq. 11).

    Marginal: a(t) = exp(-1/2 int beta), sigma(t) = 1 - a(t)^2 (the std, not the variance, so it never exceeds VP's).
    """

    def diffusion(self, t):
        t = _as_time(t)
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.integrated_beta(t)))

    def marginal_coeffs(self, t):
        log_a = self.log_mean_coeff(t)
        return torch.exp(log_a), -torch.expm1(2 * log_a)

    def marginal_coeffs_dt(self, t):
        # a' = -1/2 beta a;  sigma = 1 - a^2  =>  sigma' = -2 a a' = beta a^2
        t = _as_time(t)
        a, _ = self.marginal_coeffs(t)
        b = self.beta(t)
        return -0.5 * b * a, b * a ** 2

    def t_from_log_snr(self, lam):
        # sigma / a = (1 - a^2) / a = e^{-lambda}: a^2 + e^{-lambda} a - 1 = 0, a = 2 / (e^{-lambda} + sqrt(e^{-2 lambda} + 4))
        lam = torch.as_tensor(lam, dtype=torch.float64)
        r = torch.exp(-lam)
        a = 2.0 / (r + torch.sqrt(r ** 2 + 4.0))
        return self.t_from_integrated_beta(-2.0 * torch.log(a))


# ====================================================================== VE
@register_sde("vesde")
class VESDE(SDE):
    """Variance-exploding SDE dx = sqrt(d[sigma^2]/dt) dW with sigma(t) = sigma_min (sigma_max/sigma_min)^t (SMLD).

    Marginal: a(t) = 1 and sigma_t^2 = sigma(t)^2 - sigma_min^2, the exact variance accumulated since t = 0 (score_sde
    uses sigma(t)^2, i.e. data pre-blurred by sigma_min; the two differ by sigma_min^2).  Its discretisation is the
    SMLD chain x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z on the grid of ``discrete_sigmas``.
    """

    default_eps = 1e-5

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)
        self.discrete_sigmas = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), N,
                                                        dtype=torch.float64))

    @property
    def T(self):
        return 1.0

    @property
    def prior_std(self):
        return self.sigma_max

    def sigma(self, t) -> Tensor:
        """The noise level sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
        return self.sigma_min * torch.exp(_as_time(t) * self._log_ratio)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return self.sigma(t) * math.sqrt(2 * self._log_ratio)

    def marginal_coeffs(self, t):
        t = _as_time(t)
        # sigma(t)^2 - sigma_min^2 = sigma_min^2 (exp(2 t log r) - 1)
        return torch.ones_like(t), self.sigma_min * torch.sqrt(torch.expm1(2 * t * self._log_ratio))

    def marginal_coeffs_dt(self, t):
        # sigma_t^2 = sigma_min^2 (e^{2 t L} - 1)  =>  sigma_t' = sigma_min^2 L e^{2 t L} / sigma_t
        t = _as_time(t)
        _, s = self.marginal_coeffs(t)
        return torch.zeros_like(t), self.sigma_min ** 2 * self._log_ratio * torch.exp(2 * t * self._log_ratio) / s

    def t_from_log_snr(self, lam):
        # sigma_t = e^{-lambda}  =>  e^{2 t L} = 1 + e^{-2 lambda} / sigma_min^2
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return torch.log1p(torch.exp(-2 * lam) / self.sigma_min ** 2) / (2 * self._log_ratio)

    def discretize(self, x, t, dt):
        """SMLD step: f = 0, G = sqrt(sigma(t)^2 - sigma(t - dt)^2), the exact variance gained over [t - dt, t]
        (t - dt clamped at 0).  On the grid t_i = i T/(N-1), dt = T/(N-1) this is sigma_i^2 - sigma_{i-1}^2."""
        t = _as_time(t, x)
        t0 = torch.clamp(t - _as_time(dt, x), min=0.0)
        G = torch.sqrt(self.sigma(t) ** 2 - self.sigma(t0) ** 2)
        return torch.zeros_like(x), G

    def _repr_args(self):
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "N": self.N}


# ====================================================================== toys
@register_sde("ou")
class OUSDE(SDE):
    """Ornstein–Uhlenbeck process dx = -theta x dt + sigma dW (constant rate; VP is an OU process in the clock
    tau = 1/2 int beta).  Marginal: a = exp(-theta t), sigma_t^2 = sigma^2 (1 - exp(-2 theta t)) / (2 theta).
    Prior: the stationary law N(0, sigma^2 / (2 theta))."""

    def __init__(self, theta: float = 1.0, sigma: float = math.sqrt(2.0), T: float = 5.0, N: int = 1000):
        super().__init__(N)
        if theta <= 0 or sigma <= 0 or T <= 0:
            raise ValueError(f"OU needs theta > 0, sigma > 0, T > 0; got {theta}, {sigma}, {T}")
        self.theta, self.sigma, self._T = float(theta), float(sigma), float(T)

    @property
    def T(self):
        return self._T

    @property
    def prior_std(self):
        return self.sigma / math.sqrt(2 * self.theta)

    def drift(self, x, t):
        return -self.theta * x

    def diffusion(self, t):
        return torch.full_like(_as_time(t), self.sigma)

    def marginal_coeffs(self, t):
        t = _as_time(t)
        return torch.exp(-self.theta * t), self.prior_std * torch.sqrt(-torch.expm1(-2 * self.theta * t))

    def marginal_coeffs_dt(self, t):
        # a' = -theta a;  sigma^2 = s_inf^2 (1 - a^2)  =>  sigma' = theta s_inf^2 a^2 / sigma
        t = _as_time(t)
        a, s = self.marginal_coeffs(t)
        return -self.theta * a, self.theta * self.prior_std ** 2 * a ** 2 / s

    def t_from_log_snr(self, lam):
        # sigma^2 / a^2 = s_inf^2 (e^{2 theta t} - 1) = e^{-2 lambda}
        lam = torch.as_tensor(lam, dtype=torch.float64)
        return torch.log1p(torch.exp(-2 * lam) / self.prior_std ** 2) / (2 * self.theta)

    def _repr_args(self):
        return {"theta": self.theta, "sigma": self.sigma, "T": self._T, "N": self.N}


@register_sde("brownian")
class BrownianSDE(SDE):
    """Brownian motion dx = sqrt(2 D) dW: its density solves the heat equation df/dt = D d^2f/dx^2.
    Marginal: a = 1, sigma_t^2 = 2 D t.  Prior: N(0, 2 D T) (data assumed near the origin)."""

    def __init__(self, D: float = 0.5, T: float = 1.0, N: int = 1000):
        super().__init__(N)
        if D <= 0 or T <= 0:
            raise ValueError(f"Brownian motion needs D > 0 and T > 0; got {D}, {T}")
        self.D, self._T = float(D), float(T)

    @property
    def T(self):
        return self._T

    @property
    def prior_std(self):
        return math.sqrt(2 * self.D * self._T)

    def drift(self, x, t):
        return torch.zeros_like(x)

    def diffusion(self, t):
        return torch.full_like(_as_time(t), math.sqrt(2 * self.D))

    def marginal_coeffs(self, t):
        t = _as_time(t)
        return torch.ones_like(t), torch.sqrt(2 * self.D * t)

    def marginal_coeffs_dt(self, t):
        # sigma = sqrt(2 D t)  =>  sigma' = D / sigma
        t = _as_time(t)
        return torch.zeros_like(t), self.D / torch.sqrt(2 * self.D * t)

    def t_from_log_snr(self, lam):
        # 2 D t = e^{-2 lambda}
        return torch.exp(-2 * torch.as_tensor(lam, dtype=torch.float64)) / (2 * self.D)

    def _repr_args(self):
        return {"D": self.D, "T": self._T, "N": self.N}


from . import interpolants  # noqa: E402,F401  (registers linear, cosine, edm)
