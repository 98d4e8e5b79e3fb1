"""Probability-flow likelihood against closed forms.

With the exact score the ODE of ``likelihood.nll`` transports p_eps to p_T exactly, so
-log p_eps(x) = -log p_T(x_T) - int div v is the mathematical identity being tested: results are compared with
the analytic ``marginal_log_prob(sde)(x, eps)`` of the target.  Where the test isolates the integration error it
passes the exact p_T as ``prior_logp``; the default N(0, I) prior of the VP SDE adds the (small) prior mismatch,
which is checked separately.
"""
import math

import pytest
import torch

from sde_diffusion import likelihood, sdes, targets

EPS = 1e-5


def _mixture():
    return targets.GaussianMixture([0.3, 0.7], [[-1.5, 0.5], [1.0, -1.0]],
                                   [[[0.3, 0.1], [0.1, 0.2]], [[0.5, -0.15], [-0.15, 0.25]]])


def _t(x, t):
    return torch.full((x.shape[0],), float(t), dtype=torch.float64)


def _exact_prior(target, sde):
    lp = target.marginal_log_prob(sde)
    return lambda z: lp(z, _t(z, sde.T))


@pytest.fixture(scope="module")
def mixture_case():
    sde = sdes.VPSDE()
    mix = _mixture()
    x = mix.sample(12, torch.Generator().manual_seed(0))
    exact = -mix.marginal_log_prob(sde)(x, _t(x, EPS))
    return sde, mix, x, exact


def test_mixture_exact_trace_rk45_within_001_nats_per_dim(mixture_case):
    sde, mix, x, exact = mixture_case
    D = x.shape[1]
    res = likelihood.nll(sde, mix.score_fn(sde), x, method="exact", solver="rk45", eps=EPS)
    # with the model's own N(0, I) prior (prior mismatch included)
    assert ((res.nll - exact).abs() / D).max() < 0.01
    assert res.nfe > 0 and res.nll_se is None and res.bpd.shape == (12,)
    # with the exact p_T only the integration error is left
    res = likelihood.nll(sde, mix.score_fn(sde), x, solver="rk45", eps=EPS, prior_logp=_exact_prior(mix, sde))
    assert ((res.nll - exact).abs() / D).max() < 1e-3
    # and p_eps is within O(eps) of the data density itself
    assert ((-mix.log_prob(x) - exact).abs() / D).max() < 1e-3


@pytest.mark.parametrize("solver,steps,nfe_per_step", [("rk4", 40, 4), ("heun", 100, 2)])
def test_mixture_fixed_step(mixture_case, solver, steps, nfe_per_step):
    sde, mix, x, exact = mixture_case
    res = likelihood.nll(sde, mix.score_fn(sde), x, solver=solver, num_steps=steps, eps=EPS,
                         prior_logp=_exact_prior(mix, sde))
    assert res.nfe == nfe_per_step * steps
    assert ((res.nll - exact).abs() / x.shape[1]).max() < 0.01


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_mean_within_standard_error(mixture_case, probe):
    """Same fixed grid for both, so the trajectories coincide and the only difference is the trace estimator.
    nll_se = sample std over the K probe channels / sqrt(K); each channel is an unbiased estimate."""
    sde, mix, x, _ = mixture_case
    kw = dict(solver="rk4", num_steps=20, eps=EPS, prior_logp=_exact_prior(mix, sde))
    exact = likelihood.nll(sde, mix.score_fn(sde), x, method="exact", **kw)
    K = 32
    hutch = likelihood.nll(sde, mix.score_fn(sde), x, method="hutchinson", num_probes=K, probe=probe,
                           generator=torch.Generator().manual_seed(1), **kw)
    assert hutch.nll_se is not None and (hutch.nll_se > 0).all()
    diff = hutch.nll - exact.nll
    assert (diff.abs() <= 4 * hutch.nll_se).all()
    # pooled over the batch: the mean error is within 3 standard errors of the mean
    pooled_se = hutch.nll_se.pow(2).sum().sqrt() / len(diff)
    assert diff.mean().abs() <= 3 * pooled_se
    assert hutch.nfe == exact.nfe


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    """For a diagonal-covariance Gaussian the Jacobian of v is diagonal and e^T J e = tr J for e in {-1, 1}^D."""
    sde = sdes.VPSDE()
    g = targets.Gaussian([0.3, -0.2, 0.1], [0.5, 1.5, 0.8])
    x = g.sample(5, torch.Generator().manual_seed(0))
    kw = dict(solver="rk4", num_steps=10, eps=EPS)
    exact = likelihood.nll(sde, g.score_fn(sde), x, **kw)
    hutch = likelihood.nll(sde, g.score_fn(sde), x, method="hutchinson", num_probes=3,
                           generator=torch.Generator().manual_seed(0), **kw)
    assert torch.allclose(hutch.nll, exact.nll, atol=1e-10, rtol=0)
    assert hutch.nll_se.max() < 1e-10


@pytest.mark.parametrize("sde", [sdes.VPSDE(), sdes.SubVPSDE(), sdes.VESDE(sigma_min=0.01, sigma_max=20.0)],
                         ids=["vp", "subvp", "ve"])
def test_gaussian_closed_form(sde):
    """N(mu, Sigma) diffuses to N(a mu, a^2 Sigma + sigma^2 I); log p_eps in closed form."""
    cov = torch.tensor([[0.6, 0.2, 0.0], [0.2, 0.4, -0.1], [0.0, -0.1, 0.3]], dtype=torch.float64)
    mu = torch.tensor([0.5, -0.3, 0.2], dtype=torch.float64)
    g = targets.Gaussian(mu, cov)
    x = g.sample(6, torch.Generator().manual_seed(3))
    a, s = (float(c) for c in sde.marginal_coeffs(EPS))
    closed = -torch.distributions.MultivariateNormal(a * mu, a * a * cov + s * s * torch.eye(3,
                                                     dtype=torch.float64)).log_prob(x)
    res = likelihood.nll(sde, g.score_fn(sde), x, eps=EPS, rtol=1e-7, atol=1e-7, prior_logp=_exact_prior(g, sde))
    assert torch.allclose(res.nll, closed, atol=1e-5, rtol=0)
    # the identity (1) piece by piece: prior term + integrated divergence
    assert torch.allclose(res.nll, -(res.prior_logp + res.delta_logp), atol=1e-12)


def _grid_gaussian():
    mu = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    return targets.Gaussian(mu, torch.tensor([0.2, 0.3, 0.25, 0.15], dtype=torch.float64))


@pytest.mark.parametrize("mode,levels,lo,hi,offset_bits", [
    ("uniform", 256, -1.0, 1.0, 7.0),           # score_sde, centred data: log2(256 / 2)
    ("uniform", 256, 0.0, 1.0, 8.0),            # score_sde, [0, 1] data: log2(256)
    ("uniform_centered", 17, 0.0, 1.0, 4.0),    # digits (pixel/16): bins of width 1/16 around k/16
])
def test_bits_per_dim_by_hand(mode, levels, lo, hi, offset_bits):
    sde = sdes.VPSDE()
    g = _grid_gaussian()
    D = 4
    k = torch.randint(0, levels, (5, D), generator=torch.Generator().manual_seed(0))
    x = lo + (hi - lo) * k.double() / (levels - 1)            # what the data pipeline feeds the model
    res = likelihood.nll(sde, g.score_fn(sde), x, eps=EPS, dequantize=mode, num_levels=levels,
                         data_range=(lo, hi), generator=torch.Generator().manual_seed(1),
                         prior_logp=_exact_prior(g, sde))
    # the dequantised point lies in k's bin
    if mode == "uniform":
        u = (res.y - lo) / (hi - lo) * levels
    else:
        u = (res.y - lo) / (hi - lo) * (levels - 1) + 0.5
    frac = u - k
    assert (frac >= 0).all() and (frac < 1).all()
    # bpd by hand from the closed-form density at the dequantised point
    logp = g.marginal_log_prob(sde)(res.y, _t(res.y, EPS))
    width = (hi - lo) / (levels if mode == "uniform" else levels - 1)
    assert math.isclose(-math.log2(width), offset_bits, rel_tol=1e-12)
    by_hand = -logp / (D * math.log(2)) + offset_bits
    assert torch.allclose(res.bpd, by_hand, atol=1e-4, rtol=0)
    assert torch.allclose(res.nll, -logp - D * math.log(width), atol=3e-4, rtol=0)
    assert torch.allclose(res.bpd, res.nll / (D * math.log(2)), atol=1e-12)
    # integer levels give the same answer with the same noise
    res_int = likelihood.nll(sde, g.score_fn(sde), k, eps=EPS, dequantize=mode, num_levels=levels,
                             data_range=(lo, hi), generator=torch.Generator().manual_seed(1),
                             prior_logp=_exact_prior(g, sde))
    assert torch.allclose(res_int.y.double(), res.y, atol=1e-6)


def test_input_validation():
    sde = sdes.VPSDE()
    g = _grid_gaussian()
    x = torch.full((2, 4), 0.123, dtype=torch.float64)
    with pytest.raises(ValueError, match="not on the 256-level grid"):
        likelihood.nll(sde, g.score_fn(sde), x, dequantize="uniform")
    with pytest.raises(ValueError, match="unknown solver"):
        likelihood.nll(sde, g.score_fn(sde), x, solver="dopri")
    with pytest.raises(ValueError, match="unknown dequantization"):
        likelihood.nll(sde, g.score_fn(sde), torch.zeros(2, 4, dtype=torch.float64), dequantize="logit")
    with pytest.raises(ValueError, match="integer data"):
        likelihood.nll(sde, g.score_fn(sde), torch.zeros(2, 4, dtype=torch.long))


def test_non_differentiable_score_is_refused():
    sde = sdes.VPSDE()
    g = _grid_gaussian()
    score = g.score_fn(sde)

    def detached(x, t):
        with torch.no_grad():
            return score(x, t)

    with pytest.raises(RuntimeError, match="differentiable score_fn"):
        likelihood.nll(sdes.VESDE(), detached, torch.zeros(2, 4, dtype=torch.float64), solver="euler", num_steps=2)
