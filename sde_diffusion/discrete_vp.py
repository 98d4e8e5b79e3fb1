"""A variance-preserving Gaussian path through a discrete chain's own noise levels, for any beta table.

A discrete-time model (DDPM and its descendants, e.g. every diffusers ``UNet2DModel`` checkpoint) was trained at N
levels i = 0..N-1 with abar_i = prod_{j <= i} (1 - beta_j) and x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps
(Ho et al. 2020, eq. 4).  The tables in use (``beta_table``):

* ``linear``             beta_i = linspace(beta_start, beta_end, N)                                (Ho et al. 2020)
* ``scaled_linear``      beta_i = linspace(sqrt(beta_start), sqrt(beta_end), N)^2                  (latent diffusion)
* ``squaredcos_cap_v2``  beta_i = min(1 - abar(t_{i+1}) / abar(t_i), 0.999), abar(t) = cos^2((t + s) / (1 + s) pi/2),
                         t_i = i / N, s = 0.008                                 (Nichol & Dhariwal 2021, eq. 17)

``DiscreteVP`` is the continuous VP SDE dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW on [0, 1] whose log mean coefficient
is piecewise linear between the knots t = (i + 1) / N, where it meets the chain exactly:

    B(t) = int_0^t beta = -log abar(t),   B((i + 1) / N) = -sum_{j <= i} log(1 - beta_j) = -log abar_i,

so beta(t) = -N log(1 - beta_i) on (i / N, (i + 1) / N] (piecewise constant), a(t) = exp(-B/2), sigma(t)^2 = 1 - e^-B,
and level i sits at t_i = (i + 1) / N with exactly its (a_i, sigma_i).  Its log-SNR lambda = -1/2 log(e^B - 1) covers
the table's whole range (lambda_{N-1} at T = 1, +inf at t = 0), and its inverse is closed form (B = softplus(-2 lambda),
then the inverse of a piecewise-linear function), so every sampler and time schedule of ``solvers`` runs on it; the
exponential integrators (DDIM, DPM-Solver, UniPC) see only lambda at their nodes and are the same on any VP path with
the table's levels.  The reverse-SDE samplers integrate the piecewise-constant-beta SDE; its exact one-step transition
over [t - dt, t] inside one segment is x_t = sqrt(1 - b) x_{t-dt} + sqrt(b) z with b = 1 - exp(-beta(t) dt), which for
t = (i + 1) / N, dt = 1 / N is exactly DDPM's step with beta_i (``discretize``).

For ``linear`` tables ``VPSDE(N beta_start, N beta_end, N)`` has the same discrete betas but a slightly different
continuous abar (exp(-int beta) vs prod (1 - beta_i)): this path is exact at the levels for every table.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .sdes import SDE, VPPath, _as_time, expand_as_batch

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["DiscreteVP", "beta_table", "BETA_SCHEDULES"]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def beta_table(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               trained_betas: Optional[Sequence[float]] = None) -> Tensor:
    """The chain's betas (N,) in float64 (module doc); ``trained_betas`` wins when given."""
    N = int(num_train_timesteps)
    if trained_betas is not None:
        b = torch.as_tensor(list(trained_betas), dtype=F64).flatten()
    elif N < 2:
        raise ValueError(f"a discrete chain needs num_train_timesteps >= 2, got {N}")
    elif schedule == "linear":
        b = torch.linspace(float(beta_start), float(beta_end), N, dtype=F64)
    elif schedule == "scaled_linear":
        b = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), N, dtype=F64) ** 2
    elif schedule == "squaredcos_cap_v2":
        s = 0.008
        t = torch.arange(N + 1, dtype=F64) / N
        abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2            # Nichol & Dhariwal 2021, eq. 17
        b = torch.clamp(1 - abar[1:] / abar[:-1], max=0.999)
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; available: {', '.join(BETA_SCHEDULES)} "
                         f"(or trained_betas)")
    if b.numel() < 2 or not bool(((b > 0) & (b < 1)).all()):
        raise ValueError("a beta table needs N >= 2 values, each in (0, 1) (a zero-terminal-SNR table, beta = 1 at the "
                         "last level, has no finite log-SNR there)")
    return b


class DiscreteVP(VPPath, SDE):
    """The VP path through a chain's levels (module doc).  ``betas``: (N,) values in (0, 1); ``name`` is shown in
    the repr (e.g. the diffusers ``beta_schedule``).  The coefficients' derivatives and lambda come from ``VPPath``
    (one-sided at the knots: beta is the segment ending at t)."""

    name = "discrete_vp"

    def __init__(self, betas, name: str = "table"):
        betas = torch.as_tensor(betas, dtype=F64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("DiscreteVP needs N >= 2 betas in (0, 1)")
        super().__init__(betas.numel())
        self.schedule_name = str(name)
        self.discrete_betas = betas
        self.alphas = 1.0 - betas
        # B at the knots t_k = k / N, k = 0..N: B_0 = 0, B_{i+1} = -log abar_i (log1p for accuracy at small beta)
        self._B = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(-torch.log1p(-betas), 0)])
        self.alphas_cumprod = torch.exp(-self._B[1:])
        self._rate = self.N * (self._B[1:] - self._B[:-1])          # beta(t) on segment k: -N log(1 - beta_k)

    @property
    def T(self) -> float:
        return 1.0

    @property
    def prior_std(self) -> float:
        return 1.0

    def level_times(self) -> Tensor:
        """t_i = (i + 1) / N of the levels i = 0..N-1 (float64)."""
        return torch.arange(1, self.N + 1, dtype=F64) / self.N

    # ---------------------------------------------------------------- B(t), beta(t) and the inverse
    def _segment(self, t64: Tensor) -> Tensor:
        """The segment k (t in (k/N, (k+1)/N]; t = 0 in segment 0; t > 1 in the last) of each time."""
        return torch.clamp(torch.ceil(t64 * self.N).long() - 1, 0, self.N - 1)

    def integrated_beta(self, t) -> Tensor:
        t = _as_time(t)
        t64 = t.to(F64)
        k = self._segment(t64)
        B = self._B.to(t.device)[k] + self._rate.to(t.device)[k] * (t64 - k.to(F64) / self.N)
        return B.to(t.dtype) if t.is_floating_point() else B

    def beta(self, t) -> Tensor:
        t = _as_time(t)
        b = self._rate.to(t.device)[self._segment(t.to(F64))]
        return b.to(t.dtype) if t.is_floating_point() else b

    def t_from_integrated_beta(self, B) -> Tensor:
        B = torch.as_tensor(B, dtype=F64)
        knots = self._B.to(B.device)
        k = torch.clamp(torch.searchsorted(knots, B) - 1, 0, self.N - 1)     # knots[k] <= B <= knots[k+1] inside
        return k.to(F64) / self.N + (B - knots[k]) / self._rate.to(B.device)[k]

    # ---------------------------------------------------------------- Gaussian path
    def marginal_coeffs(self, t):
        B = self.integrated_beta(t)
        return torch.exp(-0.5 * B), torch.sqrt(-torch.expm1(-B))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=F64)
        return self.t_from_integrated_beta(torch.nn.functional.softplus(-2 * lam))   # e^B - 1 = e^{-2 lambda}

    def drift(self, x, t):
        t = _as_time(t, x)
        return -0.5 * expand_as_batch(self.beta(t), x) * x

    def diffusion(self, t):
        return torch.sqrt(self.beta(t))

    def discretize(self, x, t, dt):
        """x_t = sqrt(1 - b) x_{t-dt} + sqrt(b) z with b = 1 - exp(-beta(t) dt): the exact transition over a step inside
        one segment, DDPM's beta_i for t = (i + 1) / N and dt = 1 / N."""
        t = _as_time(t, x)
        b = -torch.expm1(-self.beta(t) * _as_time(dt, x))
        return (torch.sqrt(1.0 - expand_as_batch(b, x)) - 1.0) * x, torch.sqrt(b)

    def _repr_args(self):
        import hashlib
        digest = hashlib.sha256(self.discrete_betas.numpy().tobytes()).hexdigest()[:12]
        return {"schedule": self.schedule_name, "N": self.N, "betas_sha256": digest}
