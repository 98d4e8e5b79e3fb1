"""Analytic data distributions whose diffused marginals, and so their exact scores, are known in closed form.

For an SDE with Gaussian transition x(t) | x(0) ~ N(a(t) x(0), sigma(t)^2 I):
  * a Gaussian N(mu, Sigma) diffuses to N(a mu, a^2 Sigma + sigma^2 I);
  * a mixture sum_k w_k N(mu_k, Sigma_k) stays a mixture with the same weights and diffused components;
  * a point mass at x0 diffuses to N(a x0, sigma^2 I).
Each target gives ``sample``, ``log_prob`` (t = 0), ``marginal_log_prob(sde)(x, t)`` and ``score_fn(sde)(x, t)``,
the exact grad_x log p_t(x), vectorised over a per-sample time ``t: (B,)``.  Covariances are eigendecomposed once
(Sigma = U diag(lam) U^T), so the diffused covariance U diag(a^2 lam + sigma^2) U^T costs no solve per time.

Data live in R^D; samples are ``(n, D)``; score functions accept ``x: (B, *S)`` with prod(S) = D and return x's shape.
Parameters are stored in float64 and cast to the input's dtype and device on use.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

__all__ = ["Gaussian", "GaussianMixture", "PointMass"]

_LOG_2PI = math.log(2 * math.pi)


def _as_matrix_cov(cov, dim: int) -> Tensor:
    """Accept a scalar (isotropic), a (D,) vector (diagonal) or a (D, D) matrix; return a symmetric (D, D) matrix."""
    c = torch.as_tensor(cov, dtype=torch.float64)
    if c.dim() == 0:
        c = c * torch.eye(dim, dtype=torch.float64)
    elif c.dim() == 1:
        if c.shape[0] != dim:
            raise ValueError(f"diagonal covariance has length {c.shape[0]}, expected {dim}")
        c = torch.diag(c)
    elif c.shape != (dim, dim):
        raise ValueError(f"covariance has shape {tuple(c.shape)}, expected ({dim}, {dim})")
    if not torch.allclose(c, c.T, atol=1e-12, rtol=1e-10):
        raise ValueError("covariance matrix is not symmetric")
    return 0.5 * (c + c.T)


def _is_rectangular(values) -> bool:
    try:
        torch.as_tensor(values, dtype=torch.float64)
        return True
    except (TypeError, ValueError):
        return False


def _eigh_psd(cov: Tensor):
    lam, U = torch.linalg.eigh(cov)
    if lam.min() < -1e-10 * max(1.0, float(lam.abs().max())):
        raise ValueError(f"covariance is not positive semi-definite (smallest eigenvalue {float(lam.min()):.3g})")
    return lam.clamp_min(0.0), U


def _coeffs(sde, t: Tensor, x: Tensor):
    a, s = sde.marginal_coeffs(t)
    a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(s, dtype=x.dtype, device=x.device)
    B = x.shape[0]
    return a.expand(B) if a.dim() == 0 else a, s.expand(B) if s.dim() == 0 else s


def _component_terms(x: Tensor, a: Tensor, s: Tensor, mean: Tensor, lam: Tensor, U: Tensor):
    """For components with eigenpairs (lam: (K, D), U: (K, D, D)) and means (K, D), at x: (B, D) with per-sample
    (a, s): (B,), return y = U^T (x - a mu): (B, K, D) and the diffused eigenvalues var = a^2 lam + s^2: (B, K, D)."""
    diff = x[:, None, :] - a[:, None, None] * mean[None]               # (B, K, D)
    y = torch.einsum("bkd,kde->bke", diff, U)                           # coordinates in each eigenbasis
    var = a[:, None, None] ** 2 * lam[None] + s[:, None, None] ** 2     # (B, K, D)
    return y, var


class GaussianMixture:
    """sum_k w_k N(mu_k, Sigma_k) in R^D.

    Args:
        weights: (K,) non-negative, normalised here.
        means: (K, D).
        covs: (K, D, D) matrices, (K, D) diagonals, (K,) isotropic variances, a shared scalar, or a shared (D, D)
            matrix (when K != D; pass (K, D, D) to be unambiguous), or a list of K per-component values of mixed forms.
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.dim() == 1:
            mu = mu[:, None]
        K, D = mu.shape
        if w.shape[0] != K:
            raise ValueError(f"{w.shape[0]} weights for {K} components")
        if (w < 0).any() or w.sum() <= 0 or not torch.isfinite(w).all():
            raise ValueError("mixture weights must be non-negative, finite and not all zero")
        if isinstance(covs, (list, tuple)) and len(covs) == K and not _is_rectangular(covs):
            covs = torch.stack([_as_matrix_cov(ck, D) for ck in covs])       # per-component, mixed forms
        c = torch.as_tensor(covs, dtype=torch.float64)
        if c.dim() == 0 or (c.dim() == 2 and c.shape == (D, D) and K != D):
            c = c.expand(K, *c.shape)                                     # one value shared by all components
        if c.dim() not in (1, 2, 3) or c.shape[0] != K:
            raise ValueError(f"covariances of shape {tuple(c.shape)} do not fit {K} components in R^{D}: "
                             f"pass (K, D, D), (K, D) diagonals, (K,) variances or one shared value")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = torch.stack([_as_matrix_cov(c[k], D) for k in range(K)])
        eig = [_eigh_psd(self.covs[k]) for k in range(K)]
        self._lam = torch.stack([e[0] for e in eig])
        self._U = torch.stack([e[1] for e in eig])
        self._sqrt_cov = self._U * self._lam.sqrt()[:, None, :]         # U diag(sqrt lam): Sigma = S S^T

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _params(self, x: Tensor):
        kw = dict(dtype=x.dtype, device=x.device)
        return (self.weights.to(**kw), self.means.to(**kw), self._lam.to(**kw), self._U.to(**kw))

    def _flat(self, x: Tensor) -> Tensor:
        xf = x.reshape(x.shape[0], -1)
        if xf.shape[1] != self.dim:
            raise ValueError(f"target lives in R^{self.dim}, got input of shape {tuple(x.shape)}")
        return xf

    # ---------------------------------------------------------------- t = 0
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False,
               dtype=torch.float64):
        """n samples ``(n, D)`` (and their component labels ``(n,)`` if asked)."""
        labels = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        z = torch.randn(int(n), self.dim, generator=generator, dtype=torch.float64)
        x = self.means[labels] + torch.einsum("nde,ne->nd", self._sqrt_cov[labels], z)
        x = x.to(dtype)
        return (x, labels) if return_labels else x

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_0(x), shape (B,).  Needs non-degenerate covariances."""
        if (self._lam <= 0).any():
            raise ValueError("log_prob at t = 0 needs positive-definite covariances")
        x = self._flat(x)
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self._log_prob_at(x, torch.ones_like(zeros), zeros)

    # ---------------------------------------------------------------- diffused marginal
    def _component_log_probs(self, x: Tensor, a: Tensor, s: Tensor):
        w, mu, lam, U = self._params(x)
        y, var = _component_terms(x, a, s, mu, lam, U)
        logp = -0.5 * (y ** 2 / var + torch.log(var) + _LOG_2PI).sum(-1) + torch.log(w)[None]   # (B, K)
        return logp, y, var, U

    def _log_prob_at(self, x, a, s):
        logp, *_ = self._component_log_probs(x, a, s)
        return torch.logsumexp(logp, dim=1)

    def marginal_log_prob(self, sde) -> Callable[[Tensor, Tensor], Tensor]:
        """(x, t) -> log p_t(x), shape (B,)."""
        def fn(x, t):
            xf = self._flat(x)
            return self._log_prob_at(xf, *_coeffs(sde, t, xf))
        return fn

    def component_posterior(self, sde) -> Callable[[Tensor, Tensor], Tensor]:
        """(x, t) -> p(k | x_t), shape (B, K): the exact posterior over components of the diffused mixture."""
        def fn(x, t):
            xf = self._flat(x)
            logp, *_ = self._component_log_probs(xf, *_coeffs(sde, t, xf))
            return torch.softmax(logp, dim=1)
        return fn

    def score_fn(self, sde) -> Callable[[Tensor, Tensor], Tensor]:
        """(x, t) -> grad_x log p_t(x), x's shape: sum_k p(k | x) * (-(a^2 Sigma_k + sigma^2 I)^{-1} (x - a mu_k))."""
        def fn(x, t):
            xf = self._flat(x)
            logp, y, var, U = self._component_log_probs(xf, *_coeffs(sde, t, xf))
            r = torch.softmax(logp, dim=1)                                  # (B, K)
            comp = -torch.einsum("bke,kde->bkd", y / var, U)                # each component's score
            return (r[..., None] * comp).sum(1).reshape(x.shape)
        return fn

    def component(self, k: int) -> "Gaussian":
        """The k-th component as a ``Gaussian``."""
        return Gaussian(self.means[k], self.covs[k])


class Gaussian(GaussianMixture):
    """N(mean, cov) in R^D; ``cov`` a (D, D) matrix, a (D,) diagonal or a scalar (isotropic)."""

    def __init__(self, mean, cov):
        mu = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        super().__init__([1.0], mu[None], _as_matrix_cov(cov, mu.shape[0])[None])

    @property
    def mean(self) -> Tensor:
        return self.means[0]

    @property
    def cov(self) -> Tensor:
        return self.covs[0]

    def marginal_moments(self, sde, t):
        """(mean, cov) of p_t for a scalar t: (a mu, a^2 Sigma + sigma^2 I)."""
        a, s = sde.marginal_coeffs(t)
        a, s = float(a), float(s)
        return a * self.mean, a ** 2 * self.cov + s ** 2 * torch.eye(self.dim, dtype=torch.float64)


class PointMass(Gaussian):
    """A Dirac mass at x0: p_t = N(a x0, sigma^2 I) for t > 0.  ``log_prob`` at t = 0 is undefined and raises."""

    def __init__(self, x0):
        x0 = torch.as_tensor(x0, dtype=torch.float64).reshape(-1)
        super().__init__(x0, torch.zeros(x0.shape[0], x0.shape[0], dtype=torch.float64))
