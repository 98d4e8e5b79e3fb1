"""Processes beyond VP/VE as Gaussian paths: the linear interpolant (rectified flow), the cosine interpolant and EDM's
sigma-parameterised VE path.

Each is registered with ``get_sde`` (``linear``, ``cosine``, ``edm``) and defines only its path x_t = a(t) x0 +
sigma(t) eps in closed form: (a, sigma), their time derivatives, the log-SNR lambda = log(a / sigma) and its inverse.
Drift and diffusion come from the base class (f = (a'/a) x, g^2 = 2 sigma sigma' - 2 (a'/a) sigma^2), so every
sampler of ``solvers`` applies, the SDE samplers integrating the reverse of the SDE whose marginals are the path's.

**The end time of the unit-time interpolants.**  Both interpolants reach pure noise at t = 1, where a(1) = 0: there
lambda = -inf, the data estimate x0 = (x - sigma eps) / a of a score / eps model is undefined, and the drift
a'/a = -1/(1 - t) (linear) or -(pi/2) tan(pi t / 2) (cosine) diverges.  So the path's ``T`` is ``t_max`` = 1 - 1e-3
by default, where a(T) = 1e-3 (linear) or sin(pi 1e-3 / 2) = 1.6e-3 (cosine), and the prior is N(0, sigma(T)^2 I): the
noise part of x_T, neglecting its data part a(T) x0 — as VP's N(0, I) neglects a(1) x0 = 6.6e-3 x0.  A
velocity-output model is well-defined at t = 1 as well (det[a sigma; a' sigma'] = 1 for the linear path), so flow
matching may train on t up to 1; sampling starts at T.  Near T the reverse SDE is stiff (rate ~ 1/(1 - t)): the SDE
samplers want grids dense near T (the ``edm`` or ``logsnr`` schedules, in sigma/a = e^{-lambda}); the ODE and
exponential integrators do not care.
"""
from __future__ import annotations

import math

import torch

from .sdes import SDE, _as_time, register_sde

__all__ = ["LinearInterpolant", "CosineInterpolant", "EDMPath"]


class _UnitTimeInterpolant(SDE):
    """Shared by the interpolants on [0, 1): T = t_max < 1, prior N(0, sigma(T)^2 I).  ``sampling_eps`` = 1e-3,
    where sigma ~ 1e-3 as at VP's default 1e-5 (a grid's last positive node; the jump to x0_hat follows)."""

    sampling_eps = 1e-3

    def __init__(self, t_max: float = 1.0 - 1e-3, N: int = 1000):
        super().__init__(N)
        t_max = float(t_max)
        if not 0.5 < t_max < 1.0:
            raise ValueError(f"{type(self).__name__} needs 0.5 < t_max < 1 (a(1) = 0 is degenerate), got {t_max}")
        self.t_max = t_max

    @property
    def T(self):
        return self.t_max

    @property
    def prior_std(self):
        return float(self.marginal_coeffs(torch.tensor(self.t_max, dtype=torch.float64))[1])

    def _repr_args(self):
        return {"t_max": self.t_max, "N": self.N}


@register_sde("linear")
class LinearInterpolant(_UnitTimeInterpolant):
    """Linear interpolant / rectified flow x_t = (1 - t) x0 + t eps (Lipman et al. 2023, eq. 20 with sigma_min = 0;
    Liu et al. 2023, eq. 1): a = 1 - t, sigma = t, conditional velocity a' x0 + sigma' eps = eps - x0."""

    def marginal_coeffs(self, t):
        t = _as_time(t)
        return 1.0 - t, t.clone()

    def marginal_coeffs_dt(self, t):
        t = _as_time(t)
        return -torch.ones_like(t), torch.ones_like(t)          # a' = -1, sigma' = 1

    def log_snr(self, t):
        t = _as_time(t)
        return torch.log1p(-t) - torch.log(t)                   # lambda = log((1 - t) / t)

    def t_from_log_snr(self, lam):
        # (1 - t) / t = e^lambda  =>  t = 1 / (1 + e^lambda) = sigmoid(-lambda)
        return torch.sigmoid(-torch.as_tensor(lam, dtype=torch.float64))


@register_sde("cosine")
class CosineInterpolant(_UnitTimeInterpolant):
    """Trigonometric interpolant x_t = cos(pi t / 2) x0 + sin(pi t / 2) eps (Albergo & Vanden-Eijnden 2023, sec. 3;
    the continuous-time limit of Nichol & Dhariwal's cosine schedule with s = 0): variance preserving,
    a^2 + sigma^2 = 1."""

    def marginal_coeffs(self, t):
        u = 0.5 * math.pi * _as_time(t)
        return torch.cos(u), torch.sin(u)

    def marginal_coeffs_dt(self, t):
        # a' = -(pi/2) sin(pi t / 2), sigma' = (pi/2) cos(pi t / 2)
        u = 0.5 * math.pi * _as_time(t)
        return -0.5 * math.pi * torch.sin(u), 0.5 * math.pi * torch.cos(u)

    def log_snr(self, t):
        u = 0.5 * math.pi * _as_time(t)
        return -torch.log(torch.tan(u))                         # lambda = log cot(pi t / 2)

    def t_from_log_snr(self, lam):
        # tan(pi t / 2) = e^{-lambda}
        return (2.0 / math.pi) * torch.atan(torch.exp(-torch.as_tensor(lam, dtype=torch.float64)))


@register_sde("edm")
class EDMPath(SDE):
    """EDM's path (Karras et al. 2022, Table 1, "Ours"): s(t) = 1, sigma(t) = t on [0, sigma_max], i.e.
    x_t = x0 + t eps, prior N(0, sigma_max^2 I).  Its SDE is dx = sqrt(2 t) dW (eq. 6 with sigma' sigma = t) and its
    probability flow dx/dt = eps_hat = (x - D(x; t)) / t (eq. 3 / Alg. 1).
    ``sampling_eps`` = sigma_min = 0.002 (Table 1)."""

    default_eps = 2e-3
    sampling_eps = 2e-3

    def __init__(self, sigma_max: float = 80.0, N: int = 1000):
        super().__init__(N)
        sigma_max = float(sigma_max)
        if not (math.isfinite(sigma_max) and sigma_max > 0.01):
            raise ValueError(f"the EDM path needs sigma_max > 0.01, got {sigma_max}")
        self.sigma_max = sigma_max

    @property
    def T(self):
        return self.sigma_max

    @property
    def prior_std(self):
        return self.sigma_max

    def marginal_coeffs(self, t):
        t = _as_time(t)
        return torch.ones_like(t), t.clone()

    def marginal_coeffs_dt(self, t):
        t = _as_time(t)
        return torch.zeros_like(t), torch.ones_like(t)          # s' = 0, sigma' = 1

    def log_snr(self, t):
        return -torch.log(_as_time(t))                          # lambda = -log sigma

    def t_from_log_snr(self, lam):
        return torch.exp(-torch.as_tensor(lam, dtype=torch.float64))

    def _repr_args(self):
        return {"sigma_max": self.sigma_max, "N": self.N}
