"""sde_diffusion.metrics against closed forms and independent implementations (scipy), not against itself."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from sde_diffusion import metrics
from sde_diffusion.targets import GaussianMixture


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_spd(rng, d):
    A = rng.normal(size=(d, d))
    return A @ A.T / d + 0.5 * np.eye(d)


# ------------------------------------------------------------------------------------------------ Gaussian KL
def test_gaussian_kl_diagonal_matches_elementwise_formula():
    rng = _rng(1)
    m0, m1 = rng.normal(size=6), rng.normal(size=6)
    s0, s1 = rng.uniform(0.3, 2.0, 6), rng.uniform(0.3, 2.0, 6)
    # sum over independent 1-D KLs: log(s1/s0) + (s0^2 + (m0 - m1)^2) / (2 s1^2) - 1/2
    expected = np.sum(np.log(s1 / s0) + (s0 ** 2 + (m0 - m1) ** 2) / (2 * s1 ** 2) - 0.5)
    assert metrics.gaussian_kl(m0, s0 ** 2, m1, s1 ** 2) == pytest.approx(expected, rel=1e-12)
    assert metrics.gaussian_kl(m0, np.diag(s0 ** 2), m1, np.diag(s1 ** 2)) == pytest.approx(expected, rel=1e-12)
    assert metrics.gaussian_kl(m0, np.diag(s0 ** 2), m0, np.diag(s0 ** 2)) == pytest.approx(0.0, abs=1e-12)


def test_gaussian_kl_full_covariance_matches_monte_carlo():
    rng = _rng(2)
    d = 3
    m0, m1 = rng.normal(size=d), rng.normal(size=d)
    C0, C1 = _random_spd(rng, d), _random_spd(rng, d)
    p, q = stats.multivariate_normal(m0, C0), stats.multivariate_normal(m1, C1)
    x = p.rvs(size=200_000, random_state=rng)
    log_ratio = p.logpdf(x) - q.logpdf(x)
    mc, se = log_ratio.mean(), log_ratio.std() / math.sqrt(x.shape[0])
    assert abs(metrics.gaussian_kl(m0, C0, m1, C1) - mc) < 4 * se


def test_gaussian_kl_from_samples():
    rng = _rng(3)
    d, n = 5, 40_000
    mu, C = rng.normal(size=d), _random_spd(rng, d)
    x = rng.multivariate_normal(mu, C, size=n)
    # sampling noise only: about d (d + 3) / (4 n) = 2.5e-4 nats
    assert metrics.gaussian_kl_from_samples(x, mu, C) < 2e-3
    mu2, C2 = mu + 0.5, 1.5 * C
    y = rng.multivariate_normal(mu2, C2, size=n)
    expected = metrics.gaussian_kl(mu2, C2, mu, C)
    assert metrics.gaussian_kl_from_samples(y, mu, C) == pytest.approx(expected, rel=0.03)
    assert metrics.gaussian_kl_from_samples(torch.from_numpy(y), torch.from_numpy(mu), torch.from_numpy(C)) \
        == pytest.approx(metrics.gaussian_kl_from_samples(y, mu, C))


# ------------------------------------------------------------------------------------------------ Gaussian W2
def test_gaussian_w2_closed_forms():
    # 1-D: W2 = sqrt((m1 - m2)^2 + (s1 - s2)^2)
    assert metrics.gaussian_w2([0.3], 0.5 ** 2, [-1.0], 2.0 ** 2) == pytest.approx(math.hypot(1.3, 1.5), rel=1e-12)
    # commuting (diagonal) covariances: |dm|^2 + sum (sqrt(l0) - sqrt(l1))^2
    rng = _rng(4)
    l0, l1 = rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 4)
    m0, m1 = rng.normal(size=4), rng.normal(size=4)
    expected = math.sqrt(((m0 - m1) ** 2).sum() + ((np.sqrt(l0) - np.sqrt(l1)) ** 2).sum())
    assert metrics.gaussian_w2(m0, l0, m1, l1) == pytest.approx(expected, rel=1e-10)
    # invariant under a common rotation, symmetric
    Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    w_rot = metrics.gaussian_w2(Q @ m0, Q @ np.diag(l0) @ Q.T, Q @ m1, Q @ np.diag(l1) @ Q.T)
    assert w_rot == pytest.approx(expected, rel=1e-8)
    C0, C1 = _random_spd(rng, 4), _random_spd(rng, 4)
    assert metrics.gaussian_w2(m0, C0, m1, C1) == pytest.approx(metrics.gaussian_w2(m1, C1, m0, C0), rel=1e-8)


# ------------------------------------------------------------------------------------------------ Wasserstein
def test_wasserstein_1d_small_exact_case_unequal_sizes():
    # quantile functions: x -> 0 on (0, 1/2], 1 on (1/2, 1]; y -> 0, 1/2, 1 on thirds.  They differ by 1/2 on
    # (1/3, 2/3]: W1 = 1/6, W2^2 = 1/12.
    x, y = np.array([1.0, 0.0]), np.array([0.5, 1.0, 0.0])
    assert metrics.wasserstein_1d(x, y, p=1) == pytest.approx(1 / 6, rel=1e-12)
    assert metrics.wasserstein_1d(x, y, p=2) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)


def test_wasserstein_1d_matches_scipy_for_unequal_sizes():
    rng = _rng(5)
    x, y = rng.normal(size=737), rng.gamma(2.0, size=1291)
    assert metrics.wasserstein_1d(x, y, p=1) == pytest.approx(stats.wasserstein_distance(x, y), rel=1e-10)


def test_wasserstein_1d_between_gaussians():
    rng = _rng(6)
    m1, s1, m2, s2 = 0.5, 1.0, -0.7, 2.0
    x, y = m1 + s1 * rng.normal(size=200_000), m2 + s2 * rng.normal(size=150_000)
    assert metrics.wasserstein_1d(x, y) == pytest.approx(math.hypot(m1 - m2, s1 - s2), abs=0.02)
    # in 1-D the sliced distance is the distance
    assert metrics.sliced_wasserstein(x, y) == pytest.approx(metrics.wasserstein_1d(x, y), rel=1e-12)


def test_sliced_wasserstein_of_a_shift():
    rng = _rng(7)
    d = 8
    x = rng.normal(size=(1000, d)) @ _random_spd(rng, d)
    c = rng.normal(size=d)
    theta = metrics.random_directions(d, 500, torch.Generator().manual_seed(1))
    # each projection of a shifted cloud is the same cloud shifted by theta.c, so W2 = |theta.c| exactly
    expected = math.sqrt(np.mean((c @ theta) ** 2))
    assert metrics.sliced_wasserstein(x, x + c, projections=theta) == pytest.approx(expected, rel=1e-9)
    # and over uniform directions E (theta.c)^2 = |c|^2 / d
    sw = metrics.sliced_wasserstein(x, x + c, num_projections=2000, generator=torch.Generator().manual_seed(2))
    assert sw == pytest.approx(np.linalg.norm(c) / math.sqrt(d), rel=0.05)
    assert metrics.sliced_wasserstein(x, x.copy()) == 0.0


def test_wasserstein1_to_cdf():
    rng = _rng(8)
    x = rng.normal(size=100_000)
    # W1 between N(0, 1) and N(0.4, 1) is the shift
    assert metrics.wasserstein1_to_cdf(x, stats.norm(0.4, 1.0).cdf) == pytest.approx(0.4, abs=0.01)
    assert metrics.wasserstein1_to_cdf(x, stats.norm(0.0, 1.0).cdf) < 0.01


# ------------------------------------------------------------------------------------------------ mixtures
def _ring(K=6, radius=3.0, std=0.2):
    ang = 2 * np.pi * np.arange(K) / K
    means = radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    return GaussianMixture(np.ones(K), means, std ** 2 * np.ones(K))


def test_modewise_w2_on_exact_and_perturbed_samples():
    mix = _ring()
    x, labels = mix.sample(30_000, torch.Generator().manual_seed(0), return_labels=True)
    res = metrics.modewise_w2(x, mix)
    assert res["max_w2"] < 0.03 and res["weight_tv"] < 0.02
    # shift every sample of mode 2 by c: that mode's W2 becomes |c|, the others stay put
    c = torch.tensor([0.3, -0.4], dtype=torch.float64)
    y = x.clone()
    y[labels == 2] += c
    res = metrics.modewise_w2(y, mix.means, mix.covs, mix.weights)
    assert res["per_mode"][2] == pytest.approx(0.5, abs=0.03)
    assert max(v for k, v in enumerate(res["per_mode"]) if k != 2) < 0.03
    # drop half of mode 0's samples: weights become (1/2 w0, w_k) renormalised
    keep = (labels != 0) | (torch.arange(x.shape[0]) % 2 == 0)
    res = metrics.modewise_w2(x[keep], mix)
    w = np.ones(6) / 6
    w_new = w.copy()
    w_new[0] /= 2
    w_new /= w_new.sum()
    assert res["weight_tv"] == pytest.approx(0.5 * np.abs(w_new - w).sum(), abs=0.01)
    # a missing mode makes the mean distance infinite
    res = metrics.modewise_w2(x[labels != 4], mix)
    assert math.isnan(res["per_mode"][4]) and math.isinf(res["mean_w2"])


# ------------------------------------------------------------------------------------------------ two-sample
def test_energy_distance_between_shifted_gaussians():
    rng = _rng(9)
    mu, n, reps = 1.0, 1500, 6
    # X - Y ~ N(-mu, 2): E|X - Y| = s sqrt(2/pi) exp(-mu^2 / (2 s^2)) + mu (1 - 2 Phi(-mu / s)), s = sqrt(2);
    # E|X - X'| = E|Y - Y'| = 2 / sqrt(pi)
    s = math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-mu ** 2 / (2 * s * s)) + mu * (1 - 2 * stats.norm.cdf(-mu / s))
    expected = 2 * e_xy - 4 / math.sqrt(math.pi)
    # the estimate's spread is about 0.04 at n = 1500 (mostly the sample means): average a few replicates
    est = np.mean([metrics.energy_distance(rng.normal(size=n), mu + rng.normal(size=n)) for _ in range(reps)])
    assert est == pytest.approx(expected, abs=0.05)
    assert abs(np.mean([metrics.energy_distance(rng.normal(size=n), rng.normal(size=n)) for _ in range(reps)])) < 0.01


def test_mmd_rbf_between_shifted_gaussians():
    rng = _rng(10)
    mu, s, h, n = 0.8, 1.0, 0.7, 2000
    x, y = s * rng.normal(size=n), mu + s * rng.normal(size=n)
    # E k(X, Y) for X - Y ~ N(dm, 2 s^2): h / sqrt(h^2 + 2 s^2) exp(-dm^2 / (2 (h^2 + 2 s^2)))
    c = h / math.sqrt(h * h + 2 * s * s)
    expected = 2 * c * (1 - math.exp(-mu ** 2 / (2 * (h * h + 2 * s * s))))
    assert metrics.mmd_rbf(x, y, bandwidths=(h,)) == pytest.approx(expected, abs=0.01)
    assert abs(metrics.mmd_rbf(x, s * rng.normal(size=n), bandwidths=(h,))) < 0.005


def test_sample_distances_summary():
    rng = _rng(11)
    x, y = rng.normal(size=(3000, 3)), rng.normal(size=(3000, 3))
    d = metrics.sample_distances(x, y)
    assert set(d) == {"sliced_w2", "energy", "mean_err", "cov_rel_err"}
    assert d["sliced_w2"] < 0.1 and d["mean_err"] < 0.1 and d["cov_rel_err"] < 0.1
    d2 = metrics.sample_distances(x + 1.0, y)
    assert d2["mean_err"] == pytest.approx(math.sqrt(3), abs=0.1)
