"""Exact scores of the analytic targets against autograd of independently written diffused log-densities."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from sde_diffusion import sdes, targets

F64 = dict(dtype=torch.float64)

SDES = {
    "vp": sdes.VPSDE(), "subvp": sdes.SubVPSDE(), "ve": sdes.VESDE(), "ou": sdes.OUSDE(theta=0.5, sigma=1.0),
    "brownian": sdes.BrownianSDE(D=0.3),
}

WEIGHTS = [0.2, 0.5, 0.3]
MEANS = [[-2.0, 0.5], [1.5, 1.0], [0.0, -2.0]]
COVS = [[[0.5, 0.3], [0.3, 0.4]], [[0.2, -0.05], [-0.05, 0.1]], [[1.0, 0.0], [0.0, 0.05]]]


def _log_pt_reference(x, t, sde, weights, means, covs):
    """log sum_k w_k N(x; a mu_k, a^2 Sigma_k + sigma^2 I) with dense matrices, slogdet and solve (no eigenbases)."""
    a, s = sde.marginal_coeffs(t)
    D = x.shape[1]
    terms = []
    for w, mu, cov in zip(weights, means, covs):
        mu = torch.tensor(mu, **F64)
        C = a[:, None, None] ** 2 * torch.tensor(cov, **F64) + s[:, None, None] ** 2 * torch.eye(D, **F64)
        d = x - a[:, None] * mu
        quad = (d[:, None, :] @ torch.linalg.solve(C, d[:, :, None]))[:, 0, 0]
        terms.append(math.log(w) - 0.5 * (quad + torch.linalg.slogdet(C)[1] + D * math.log(2 * math.pi)))
    return torch.logsumexp(torch.stack(terms, 1), 1)


@pytest.mark.parametrize("name", sorted(SDES))
def test_mixture_score_is_gradient_of_diffused_log_density(name):
    sde = SDES[name]
    mix = targets.GaussianMixture(WEIGHTS, MEANS, COVS)
    gen = torch.Generator().manual_seed(0)
    x = 2.5 * torch.randn(64, 2, generator=gen, **F64)
    t = sde.T * (0.002 + 0.998 * torch.rand(64, generator=gen, **F64))
    x.requires_grad_(True)
    logp = _log_pt_reference(x, t, sde, WEIGHTS, MEANS, COVS)
    (grad,) = torch.autograd.grad(logp.sum(), x)
    with torch.no_grad():
        score = mix.score_fn(sde)(x, t)
        ours = mix.marginal_log_prob(sde)(x, t)
    assert torch.allclose(score, grad, rtol=1e-8, atol=1e-8)
    assert torch.allclose(ours, logp.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["vp", "ve", "brownian"])
def test_gaussian_and_point_mass_scores(name):
    sde = SDES[name]
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(3, 3, generator=gen, **F64)
    cov = A @ A.T + 0.1 * torch.eye(3, **F64)
    mu = [0.3, -1.0, 2.0]
    g = targets.Gaussian(mu, cov)
    p = targets.PointMass(mu)
    x = torch.randn(32, 3, generator=gen, **F64).requires_grad_(True)
    t = sde.T * (0.01 + 0.99 * torch.rand(32, generator=gen, **F64))
    for target, c in ((g, cov.tolist()), (p, [[0.0] * 3] * 3)):
        logp = _log_pt_reference(x, t, sde, [1.0], [mu], [c])
        (grad,) = torch.autograd.grad(logp.sum(), x)
        assert torch.allclose(target.score_fn(sde)(x, t), grad, rtol=1e-8, atol=1e-8)


def test_score_accepts_image_shaped_batches():
    sde = SDES["vp"]
    g = targets.Gaussian(torch.zeros(12, **F64), 0.5)
    x = torch.randn(4, 3, 2, 2, **F64)
    t = torch.full((4,), 0.3, **F64)
    a, s = sde.marginal_coeffs(0.3)
    expected = -x / (a ** 2 * 0.5 + s ** 2)
    assert torch.allclose(g.score_fn(sde)(x, t), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="R\\^12"):
        g.score_fn(sde)(torch.randn(4, 5, **F64), t)


def test_log_prob_and_sampling_moments():
    mix = targets.GaussianMixture(WEIGHTS, MEANS, COVS)
    x = torch.randn(10, 2, **F64)
    ref = np.log(sum(w * multivariate_normal(m, c).pdf(x.numpy()) for w, m, c in zip(WEIGHTS, MEANS, COVS)))
    np.testing.assert_allclose(mix.log_prob(x).numpy(), ref, rtol=1e-10)
    # moments of 200k samples: within 5 standard errors
    n = 200_000
    s, labels = mix.sample(n, generator=torch.Generator().manual_seed(1), return_labels=True)
    freq = torch.bincount(labels, minlength=3).double() / n
    w = torch.tensor(WEIGHTS, **F64)
    assert ((freq - w).abs() < 5 * torch.sqrt(w * (1 - w) / n)).all()
    for k in range(3):
        sk = s[labels == k]
        cov = torch.tensor(COVS[k], **F64)
        se_mean = torch.sqrt(torch.diag(cov) / len(sk))
        assert ((sk.mean(0) - torch.tensor(MEANS[k], **F64)).abs() < 5 * se_mean).all()
        se_cov = torch.sqrt((torch.diag(cov)[:, None] * torch.diag(cov)[None] + cov ** 2) / len(sk))
        assert ((torch.cov(sk.T) - cov).abs() < 5 * se_cov).all()


def test_component_posterior_is_bayes_rule():
    sde = SDES["vp"]
    mix = targets.GaussianMixture(WEIGHTS, MEANS, COVS)
    x = torch.randn(8, 2, **F64)
    t = torch.full((8,), 0.2, **F64)
    post = mix.component_posterior(sde)(x, t)
    joint = torch.stack([math.log(w) + mix.component(k).marginal_log_prob(sde)(x, t)
                         for k, w in enumerate(WEIGHTS)], 1)
    assert torch.allclose(post, torch.softmax(joint, 1), rtol=1e-12)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="positive semi-definite"):
        targets.Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="symmetric"):
        targets.Gaussian([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="weights"):
        targets.GaussianMixture([1.0], [[0.0], [1.0]], 1.0)
    with pytest.raises(ValueError, match="positive-definite"):
        targets.PointMass([0.0]).log_prob(torch.zeros(1, 1, **F64))
