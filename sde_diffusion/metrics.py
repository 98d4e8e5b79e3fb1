"""Distances between samples and known distributions, for experiments and tests.

Everything here works in float64 on CPU (samples are detached and converted) and returns Python floats or dicts of
them.  Inputs are ``(n, D)`` arrays or tensors (``(n,)`` is read as 1-D data); reference distributions are given by
their parameters, never by another sampler, so a metric can be checked against closed forms.

* ``gaussian_kl(m0, C0, m1, C1)``: KL(N0 || N1) in closed form; ``gaussian_kl_from_samples(x, m, C)`` fits the sample
  mean and covariance of x first (a moment-matched KL, exact when x is Gaussian up to sampling noise of about
  D(D+3)/(4n) nats).
* ``gaussian_w2(m0, C0, m1, C1)``: the Wasserstein-2 distance between Gaussians (Bures formula).
* ``wasserstein_1d(x, y, p)``: exact W_p between two 1-D empirical measures of any sizes;
  ``sliced_wasserstein(x, y, ...)``: its average over random directions, with projections fixed by a generator;
  ``wasserstein1_to_cdf(x, cdf)``: W1 between a 1-D sample and an analytic CDF, int |F_n - F|.
* ``modewise_w2(x, means, covs, weights)``: for well-separated mixtures, assign each sample to its nearest mode, fit a
  Gaussian to each mode's samples and report its W2 to the true component, plus the error in the mode weights.
* ``energy_distance(x, y)`` and ``mmd_rbf(x, y, bandwidths)``: two-sample distances that vanish iff the laws agree.
* ``sample_distances(x, y)``: a summary for comparing generated samples with held-out data.
* ``precision_recall(real, fake, k)``: improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import numpy as np
import torch

__all__ = [
    "gaussian_kl", "gaussian_kl_from_samples", "gaussian_w2", "sample_moments", "wasserstein_1d",
    "sliced_wasserstein", "random_directions", "wasserstein1_to_cdf", "modewise_w2", "energy_distance", "mmd_rbf",
    "sample_distances", "precision_recall",
]


# ---------------------------------------------------------------------------------------------------- helpers
def _np2d(x) -> np.ndarray:
    """(n,) or (n, *D) array/tensor -> (n, D) float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    return x.reshape(x.shape[0], -1)


def _vec(m, dim: Optional[int] = None) -> np.ndarray:
    if isinstance(m, torch.Tensor):
        m = m.detach().to("cpu", torch.float64).numpy()
    m = np.asarray(m, dtype=np.float64).reshape(-1)
    if dim is not None and m.shape[0] == 1 and dim > 1:
        m = np.full(dim, m[0])
    return m


def _mat(C, dim: int) -> np.ndarray:
    """A scalar (isotropic), (D,) diagonal or (D, D) covariance -> (D, D) matrix."""
    if isinstance(C, torch.Tensor):
        C = C.detach().to("cpu", torch.float64).numpy()
    C = np.asarray(C, dtype=np.float64)
    if C.ndim == 0 or C.size == 1 and dim == 1:
        return np.eye(dim) * float(C.reshape(-1)[0])
    if C.ndim == 1:
        return np.diag(C)
    if C.shape != (dim, dim):
        raise ValueError(f"covariance of shape {C.shape} does not match dimension {dim}")
    return 0.5 * (C + C.T)


def _psd_sqrt(C: np.ndarray) -> np.ndarray:
    lam, U = np.linalg.eigh(0.5 * (C + C.T))
    return (U * np.sqrt(np.clip(lam, 0.0, None))) @ U.T


def sample_moments(x):
    """(mean (D,), covariance (D, D)) of the samples x: (n, D), with the unbiased 1/(n-1) normalisation."""
    x = _np2d(x)
    if x.shape[0] < 2:
        raise ValueError("need at least two samples for a covariance")
    m = x.mean(0)
    xc = x - m
    return m, xc.T @ xc / (x.shape[0] - 1)


# ---------------------------------------------------------------------------------------------------- Gaussians
def gaussian_kl(mean0, cov0, mean1, cov1) -> float:
    """KL(N(m0, C0) || N(m1, C1)) = 1/2 [tr(C1^-1 C0) + (m1-m0)^T C1^-1 (m1-m0) - D + log det C1 - log det C0].

    Covariances may be scalars, (D,) diagonals or (D, D) matrices; C1 must be positive definite, and so must C0 for
    a finite answer (returns inf if C0 is singular).
    """
    m0 = _vec(mean0)
    D = m0.shape[0]
    m1 = _vec(mean1, D)
    C0, C1 = _mat(cov0, D), _mat(cov1, D)
    L1 = np.linalg.cholesky(C1)
    sign0, logdet0 = np.linalg.slogdet(C0)
    if sign0 <= 0:
        return math.inf
    logdet1 = 2.0 * np.log(np.diag(L1)).sum()
    A = np.linalg.solve(L1, C0)                      # L1^-1 C0
    tr = np.trace(np.linalg.solve(L1.T, A))          # tr(C1^-1 C0)
    d = np.linalg.solve(L1, m1 - m0)
    return float(0.5 * (tr + d @ d - D + logdet1 - logdet0))


def gaussian_kl_from_samples(x, mean, cov, reverse: bool = False) -> float:
    """KL between the Gaussian fitted to x (sample mean and covariance) and N(mean, cov).

    ``reverse=False``: KL(N(x_hat) || N(mean, cov)) (the sampler's law against the truth); ``True``: the other way.
    For x drawn from N(mean, cov) itself the expected value is about D(D+3)/(4n) nats (sampling noise).
    """
    m, C = sample_moments(x)
    if reverse:
        return gaussian_kl(mean, cov, m, C)
    return gaussian_kl(m, C, mean, cov)


def gaussian_w2(mean0, cov0, mean1, cov1) -> float:
    """W2(N(m0, C0), N(m1, C1))^2 = |m0 - m1|^2 + tr(C0 + C1 - 2 (C1^1/2 C0 C1^1/2)^1/2)   (Bures–Wasserstein)."""
    m0 = _vec(mean0)
    D = m0.shape[0]
    m1 = _vec(mean1, D)
    C0, C1 = _mat(cov0, D), _mat(cov1, D)
    S1 = _psd_sqrt(C1)
    cross = _psd_sqrt(S1 @ C0 @ S1)
    w2sq = float(((m0 - m1) ** 2).sum() + np.trace(C0) + np.trace(C1) - 2.0 * np.trace(cross))
    return math.sqrt(max(w2sq, 0.0))


# ---------------------------------------------------------------------------------------------------- Wasserstein
def _wasserstein_sorted(xs: np.ndarray, ys: np.ndarray, p: float) -> np.ndarray:
    """Exact W_p^p between 1-D empirical measures, row by row: xs (P, n) and ys (P, m) sorted along axis 1.

    W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du, with both quantile functions piecewise constant on the merged grid of
    levels {i/n} U {j/m}.
    """
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (np.abs(xs - ys) ** p).mean(1)
    levels = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    levels[-1] = 1.0
    widths = np.diff(np.concatenate([[0.0], levels]))
    mids = levels - 0.5 * widths                       # a level inside each piece
    ix = np.minimum((mids * n).astype(np.int64), n - 1)
    iy = np.minimum((mids * m).astype(np.int64), m - 1)
    return (np.abs(xs[:, ix] - ys[:, iy]) ** p) @ widths


def wasserstein_1d(x, y, p: float = 2.0) -> float:
    """Exact W_p between the empirical measures of two 1-D samples (any sizes)."""
    x, y = _np2d(x), _np2d(y)
    if x.shape[1] != 1 or y.shape[1] != 1:
        raise ValueError("wasserstein_1d needs 1-D samples; use sliced_wasserstein in higher dimensions")
    xs, ys = np.sort(x.T, axis=1), np.sort(y.T, axis=1)
    return float(_wasserstein_sorted(xs, ys, p)[0] ** (1.0 / p))


def random_directions(dim: int, num: int, generator: Optional[torch.Generator] = None) -> np.ndarray:
    """``num`` directions uniform on the unit sphere of R^dim, shape (dim, num); fixed by ``generator``."""
    g = torch.randn(dim, num, generator=generator, dtype=torch.float64)
    return (g / g.norm(dim=0, keepdim=True)).numpy()


def sliced_wasserstein(x, y, num_projections: int = 256, p: float = 2.0,
                       generator: Optional[torch.Generator] = None, projections=None) -> float:
    """Sliced W_p: (mean over directions theta of W_p(theta.x, theta.y)^p)^(1/p), each 1-D term exact.

    The directions are ``projections`` (D, P) if given, else ``num_projections`` uniform ones drawn from
    ``generator`` (default: a generator seeded with 0, so repeated calls compare like with like).  In 1-D this is
    the exact W_p.  For y = x + c in R^D it equals (mean (theta.c)^2)^(1/2) ~ |c| / sqrt(D).
    """
    x, y = _np2d(x), _np2d(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples live in different dimensions: {x.shape[1]} and {y.shape[1]}")
    D = x.shape[1]
    if D == 1:
        theta = np.ones((1, 1))
    elif projections is not None:
        theta = np.asarray(projections, dtype=np.float64).reshape(D, -1)
    else:
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        theta = random_directions(D, num_projections, generator)
    xs = np.sort(np.ascontiguousarray((x @ theta).T), axis=1)        # (P, n): one row per direction
    ys = np.sort(np.ascontiguousarray((y @ theta).T), axis=1)
    return float(_wasserstein_sorted(xs, ys, p).mean() ** (1.0 / p))


def wasserstein1_to_cdf(x, cdf, num_grid: int = 20001, pad: Optional[float] = None) -> float:
    """W1 between a 1-D sample and a law with CDF ``cdf`` (a vectorised numpy callable): int |F_n(z) - F(z)| dz.

    Trapezoidal rule on a uniform grid over the samples' range widened by ``pad`` on each side (default: the range's
    width, far enough for the law's tails when the sample has more than a few hundred points).
    """
    xs = np.sort(_np2d(x)[:, 0])
    span = max(xs[-1] - xs[0], 1e-12)
    pad = span if pad is None else float(pad)
    z = np.linspace(xs[0] - pad, xs[-1] + pad, int(num_grid))
    Fn = np.searchsorted(xs, z, side="right") / xs.size
    v = np.abs(Fn - cdf(z))
    return float(((v[1:] + v[:-1]) * 0.5 * np.diff(z)).sum())


# ---------------------------------------------------------------------------------------------------- mixtures
def modewise_w2(x, means, covs=None, weights=None) -> Dict[str, object]:
    """Mode-wise comparison of samples with a mixture of well-separated Gaussians.

    Each sample goes to its nearest mean (Euclidean).  For every mode k with at least D + 1 samples, a Gaussian is
    fitted to its samples and compared with N(mu_k, Sigma_k) in W2 (closed form).  Returns a dict with
    ``per_mode`` (list of W2, nan for modes with too few samples), ``mean_w2`` (weighted by the true weights; modes
    with too few samples count as missing and make it inf), ``max_w2``, ``weights`` (empirical), and
    ``weight_tv`` = 1/2 sum_k |w_hat_k - w_k| (the total-variation error of the mode weights).

    ``means`` (K, D); ``covs`` (K, D, D), (K, D), (K,) or None (then only the means and weights are checked:
    per-mode distances use the fitted covariance as the truth); ``weights`` (K,) or None (uniform).  An object with
    ``means``, ``covs`` and ``weights`` attributes (e.g. ``targets.GaussianMixture``) may be passed as ``means``.
    """
    if hasattr(means, "means") and covs is None and weights is None:
        mix = means
        means, covs, weights = mix.means, mix.covs, mix.weights
    x = _np2d(x)
    mu = _np2d(means)
    K, D = mu.shape
    w = np.full(K, 1.0 / K) if weights is None else _vec(weights)
    w = w / w.sum()
    d2 = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
    labels = d2.argmin(1)
    counts = np.bincount(labels, minlength=K)
    w_hat = counts / x.shape[0]
    per_mode = []
    for k in range(K):
        xk = x[labels == k]
        if xk.shape[0] < D + 1:
            per_mode.append(math.nan)
            continue
        m_hat, C_hat = sample_moments(xk)
        if covs is None:
            C_true = C_hat
        else:
            ck = covs[k] if not np.isscalar(covs) else covs
            C_true = _mat(ck, D)
        per_mode.append(gaussian_w2(m_hat, C_hat, mu[k], C_true))
    pm = np.array(per_mode)
    mean_w2 = math.inf if np.isnan(pm).any() else float((w * pm).sum())
    return dict(per_mode=[float(v) for v in pm], mean_w2=mean_w2,
                max_w2=math.inf if np.isnan(pm).any() else float(pm.max()),
                weights=[float(v) for v in w_hat], weight_tv=float(0.5 * np.abs(w_hat - w).sum()))


# ---------------------------------------------------------------------------------------------------- two-sample
def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None))


def _mean_offdiag(M: np.ndarray) -> float:
    n = M.shape[0]
    return float((M.sum() - np.trace(M)) / (n * (n - 1)))


def energy_distance(x, y, max_samples: int = 2000, generator: Optional[torch.Generator] = None) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (unbiased U-statistics; >= 0 in expectation, 0 iff the laws
    agree).  Samples beyond ``max_samples`` are subsampled (with ``generator``) to bound the O(n^2) cost."""
    x, y = _subsample(_np2d(x), max_samples, generator), _subsample(_np2d(y), max_samples, generator)
    return float(2 * _pairwise_dist(x, y).mean() - _mean_offdiag(_pairwise_dist(x, x))
                 - _mean_offdiag(_pairwise_dist(y, y)))


def mmd_rbf(x, y, bandwidths: Sequence[float] = (0.1, 0.3, 1.0, 3.0), max_samples: int = 2000,
            generator: Optional[torch.Generator] = None) -> float:
    """Unbiased MMD^2 with the kernel sum_h exp(-|x - y|^2 / (2 h^2)) over ``bandwidths``."""
    x, y = _subsample(_np2d(x), max_samples, generator), _subsample(_np2d(y), max_samples, generator)

    def k(a, b):
        d2 = _pairwise_dist(a, b) ** 2
        return sum(np.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return float(_mean_offdiag(k(x, x)) + _mean_offdiag(k(y, y)) - 2 * k(x, y).mean())


def _subsample(x: np.ndarray, n: int, generator) -> np.ndarray:
    if x.shape[0] <= n:
        return x
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[0], generator=generator)[:n].numpy()
    return x[idx]


def sample_distances(x, y, num_projections: int = 256, generator: Optional[torch.Generator] = None) -> Dict[str, float]:
    """Summary distances of samples x from reference samples y (e.g. held-out data): sliced W2, energy distance,
    error of the mean and relative (Frobenius) error of the covariance."""
    x, y = _np2d(x), _np2d(y)
    mx, Cx = sample_moments(x)
    my, Cy = sample_moments(y)
    return dict(
        sliced_w2=sliced_wasserstein(x, y, num_projections=num_projections, generator=generator),
        energy=energy_distance(x, y, generator=generator),
        mean_err=float(np.linalg.norm(mx - my)),
        cov_rel_err=float(np.linalg.norm(Cx - Cy) / max(np.linalg.norm(Cy), 1e-300)),
    )


# ---------------------------------------------------------------------------------------------------- precision / recall
def _kth_neighbour_radius(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """(n,) distance from each row of x to its k-th nearest *other* row: the (k + 1)-th smallest distance in its row
    of the n x n distance matrix, whose smallest entry is the row's distance 0 to itself."""
    return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(batch_size)])


def _inside_any_ball(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(n,) bool: is points[i] within radii[j] of some centres[j] (|p - c| <= r, the boundary counting as inside)."""
    return torch.cat([(torch.cdist(b, centres) <= radii[None]).any(dim=1) for b in points.split(batch_size)])


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> Dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
    Generative Models"), in feature space (for images: the Inception's pool3, as torch-fidelity's ``prc``).

    Each set's manifold is estimated as the union of balls around its points, the ball of x having as radius the
    distance from x to its k-th nearest neighbour within the same set (Eq. 1-2 of the paper, k = 3 its default):
      precision = share of ``fake`` points inside the real manifold   (are the samples realistic?)
      recall    = share of ``real`` points inside the fake manifold   (is the data's variety covered?)
    Identical sets give P = R = 1; far-apart sets P = R = 0.  Returns {"precision", "recall", "f_score"} (f_score =
    2PR / (P + R), with torch-fidelity's 1e-5 floor on the denominator).  ``real`` (n, D), ``fake`` (m, D) with
    n, m > k; distances in float64, ``batch_size`` rows at a time (memory O(batch_size * max(n, m))).  The numbers
    depend on n and m (more points, smaller balls): compare them at equal set sizes.
    """
    k = int(k)
    r = torch.as_tensor(_np2d(real))
    f = torch.as_tensor(_np2d(fake))
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"features live in different dimensions: {r.shape[1]} and {f.shape[1]}")
    if k < 1 or min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"need k >= 1 and more than k points in each set, got k = {k}, {r.shape[0]} real and "
                         f"{f.shape[0]} fake")
    bs = max(1, int(batch_size))
    precision = float(_inside_any_ball(f, r, _kth_neighbour_radius(r, k, bs), bs).double().mean())
    recall = float(_inside_any_ball(r, f, _kth_neighbour_radius(f, k, bs), bs).double().mean())
    return dict(precision=precision, recall=recall,
                f_score=2 * precision * recall / max(1e-5, precision + recall))
