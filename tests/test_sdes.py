"""SDEs against mathematics: the DDPM chain, moment ODEs, Monte Carlo, and the reverse-time drifts."""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.stats import norm

from sde_diffusion import sdes

F64 = dict(dtype=torch.float64)

ALL_SDES = {
    "vp": lambda: sdes.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": lambda: sdes.SubVPSDE(beta_min=0.1, beta_max=20.0),
    "ve": lambda: sdes.VESDE(sigma_min=0.01, sigma_max=50.0),
    "ou": lambda: sdes.OUSDE(theta=0.7, sigma=1.3, T=3.0),
    "brownian": lambda: sdes.BrownianSDE(D=0.4, T=2.0),
}


def _ddpm_alphabar(beta_min, beta_max, N):
    """DDPM's chain written out by hand: beta_i = (beta_min + i/(N-1) (beta_max - beta_min)) / N."""
    out, prod = [], 1.0
    for i in range(N):
        beta_i = (beta_min + i / (N - 1) * (beta_max - beta_min)) / N
        prod *= 1.0 - beta_i
        out.append(prod)
    return np.array(out)


def test_vp_forward_chain_moments_equal_ddpm():
    """Propagating mean and variance through VPSDE.discretize on the grid t_i = i/(N-1), dt = 1/N gives
    mean sqrt(alphabar_i) x0 and variance 1 - alphabar_i of the DDPM chain (rtol 1e-12)."""
    N, x0 = 1000, 1.7
    sde = sdes.VPSDE(0.1, 20.0, N)
    abar = _ddpm_alphabar(0.1, 20.0, N)
    np.testing.assert_allclose(sde.alphas_cumprod.numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(sde.discrete_betas.numpy(), np.linspace(0.1 / N, 20.0 / N, N), rtol=1e-12)
    mean, var = torch.tensor([[x0]], **F64), torch.tensor(0.0, **F64)
    means, variances = [], []
    for i in range(N):
        t = i / (N - 1)
        f, G = sde.discretize(mean, t, 1.0 / N)
        unit_f, _ = sde.discretize(torch.ones(1, 1, **F64), t, 1.0 / N)
        gain = 1.0 + unit_f[0, 0]                 # f is linear in x: x + f(x) = gain * x
        mean = mean + f
        var = gain ** 2 * var + G ** 2
        means.append(float(mean))
        variances.append(float(var))
    np.testing.assert_allclose(means, np.sqrt(abar) * x0, rtol=1e-12)
    np.testing.assert_allclose(variances, 1.0 - abar, rtol=1e-12)


def test_vp_chain_samples_equal_ddpm_recursion():
    """The same noise through discretize and through x_i = sqrt(1-beta_i) x_{i-1} + sqrt(beta_i) z_i."""
    N = 200
    sde = sdes.VPSDE(0.1, 20.0, N)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=gen, **F64)
    y = x.clone()
    for i in range(N):
        z = torch.randn(16, 3, generator=gen, **F64)
        f, G = sde.discretize(x, i / (N - 1), 1.0 / N)
        x = x + f + G * z
        beta_i = (0.1 + i / (N - 1) * 19.9) / N
        y = math.sqrt(1 - beta_i) * y + math.sqrt(beta_i) * z
    assert torch.allclose(x, y, rtol=0, atol=1e-12)


def test_alphabar_converges_to_continuous_at_first_order():
    """alphabar_N (t = 1) -> exp(-int_0^1 beta) with error O(1/N): measured slope on a ladder of N."""
    exact = math.exp(-(0.1 + 0.5 * 19.9))
    Ns = np.array([100, 200, 400, 800, 1600, 3200])
    errs = np.array([abs(float(sdes.VPSDE(0.1, 20.0, int(n)).alphas_cumprod[-1]) - exact) for n in Ns])
    slope = np.polyfit(np.log(Ns), np.log(errs), 1)[0]
    assert abs(slope + 1.0) < 0.1, (slope, errs)
    # and the continuous marginal at t = 1 is that exact value
    a, _ = sdes.VPSDE().marginal_coeffs(1.0)
    assert abs(float(a) ** 2 - exact) < 1e-14


def test_ve_discretization_is_smld_chain():
    N = 50
    sde = sdes.VESDE(0.01, 50.0, N)
    sigmas = [0.01 * (50.0 / 0.01) ** (i / (N - 1)) for i in range(N)]
    np.testing.assert_allclose(sde.discrete_sigmas.numpy(), sigmas, rtol=1e-12)
    x = torch.zeros(1, 1, **F64)
    for i in range(1, N):
        f, G = sde.discretize(x, i / (N - 1), 1.0 / (N - 1))
        assert float(f.abs().max()) == 0.0
        assert abs(float(G) ** 2 - (sigmas[i] ** 2 - sigmas[i - 1] ** 2)) < 1e-9 * sigmas[i] ** 2


@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_marginal_matches_moment_odes(name):
    """For dx = -k(t) x dt + g(t) dW: dm/dt = -k m, dv/dt = -2 k v + g^2 (integrated by scipy at rtol 1e-11)."""
    sde = ALL_SDES[name]()
    x0 = 1.3

    def k(t):
        return -float(sde.drift(torch.ones(1, 1, **F64), torch.tensor([t], **F64))[0, 0])

    def rhs(t, y):
        m, v = y
        return [-k(t) * m, -2 * k(t) * v + float(sde.diffusion(torch.tensor(t, **F64))) ** 2]

    ts = [0.05 * sde.T, 0.3 * sde.T, 0.7 * sde.T, sde.T]
    sol = solve_ivp(rhs, (0.0, sde.T), [x0, 0.0], t_eval=ts, rtol=1e-11, atol=1e-13, method="DOP853")
    mean, std = sde.marginal(torch.full((len(ts), 1), x0, **F64), torch.tensor(ts, **F64))
    np.testing.assert_allclose(mean[:, 0].numpy(), sol.y[0], rtol=1e-7)
    np.testing.assert_allclose(std.numpy() ** 2, sol.y[1], rtol=1e-7)


@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_marginal_matches_euler_maruyama_monte_carlo(name):
    """Fine Euler–Maruyama from a point mass, n = 20 000 paths, 2 000 steps to t = T/2.  Tolerance: 5 Monte Carlo
    standard errors (std/sqrt(n) for the mean, var*sqrt(2/(n-1)) for the variance) plus 1 % of the value for the
    O(dt) bias of Euler–Maruyama."""
    sde = ALL_SDES[name]()
    n, steps, x0 = 20_000, 2_000, 0.8
    t_end = 0.5 * sde.T
    dt = t_end / steps
    gen = torch.Generator().manual_seed(1)
    x = torch.full((n, 1), x0, **F64)
    for i in range(steps):
        t = torch.tensor(i * dt, **F64)
        x = x + sde.drift(x, t) * dt + sde.diffusion(t) * math.sqrt(dt) * torch.randn(n, 1, generator=gen, **F64)
    mean, std = sde.marginal(torch.tensor([[x0]], **F64), t_end)
    m, v = float(mean), float(std) ** 2
    tol_m = 5 * math.sqrt(v / n) + 0.01 * abs(m)
    tol_v = 5 * v * math.sqrt(2 / (n - 1)) + 0.01 * v
    assert abs(float(x.mean()) - m) < tol_m
    assert abs(float(x.var()) - v) < tol_v


def test_reverse_and_probability_flow_drifts():
    """Reverse drift f - g^2 s and probability-flow drift f - 1/2 g^2 s, written out by hand for VP and VE."""
    def score(x, t):
        return torch.sin(x) - t[:, None] * x

    x = torch.linspace(-2, 2, 12, **F64).reshape(6, 2)
    t = torch.linspace(0.1, 0.9, 6, **F64)
    beta = 0.1 + t * 19.9
    f_vp = -0.5 * beta[:, None] * x
    s = score(x, t)
    vp = sdes.VPSDE()
    assert torch.allclose(vp.reverse(score).drift(x, t), f_vp - beta[:, None] * s, atol=1e-12)
    assert torch.allclose(vp.reverse(score, probability_flow=True).drift(x, t), f_vp - 0.5 * beta[:, None] * s,
                          atol=1e-12)
    assert torch.allclose(vp.reverse(score).diffusion(t), beta.sqrt())
    assert float(vp.reverse(score, True).diffusion(t).abs().max()) == 0.0
    ve = sdes.VESDE(0.01, 50.0)
    g2 = (0.01 * (5000.0 ** t)) ** 2 * 2 * math.log(5000.0)
    assert torch.allclose(ve.reverse(score).drift(x, t), -g2[:, None] * s, rtol=1e-12)
    assert torch.allclose(ve.reverse(score, True).drift(x, t), -0.5 * g2[:, None] * s, rtol=1e-12)
    # the reversed discretisation: rev_f = f - G^2 s with (f, G) the forward step that ended at t
    f, G = vp.discretize(x, t, 0.01)
    rev_f, rev_G = vp.reverse(score).discretize(x, t, 0.01)
    assert torch.allclose(rev_f, f - G[:, None] ** 2 * s, atol=1e-12) and torch.allclose(rev_G, G)


@pytest.mark.parametrize("name", sorted(ALL_SDES))
def test_prior_logp_is_gaussian_density(name):
    sde = ALL_SDES[name]()
    z = sde.prior_sample((5, 3, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = norm(scale=sde.prior_std).logpdf(z.numpy()).reshape(5, -1).sum(1)
    np.testing.assert_allclose(sde.prior_logp(z).numpy(), expected, rtol=1e-12)


def test_vp_is_time_changed_ou():
    """With constant beta = 2 theta, VP is the OU process with theta and sigma = sqrt(2 theta)."""
    vp = sdes.VPSDE(beta_min=1.2, beta_max=1.2)
    ou = sdes.OUSDE(theta=0.6, sigma=math.sqrt(1.2), T=1.0)
    t = torch.linspace(0.01, 1, 7, **F64)
    for u, v in zip(vp.marginal_coeffs(t), ou.marginal_coeffs(t)):
        assert torch.allclose(u, v, rtol=1e-12)


def test_get_sde_and_bad_input():
    assert isinstance(sdes.get_sde("vp", beta_max=10.0), sdes.VPSDE)
    assert isinstance(sdes.get_sde("VESDE"), sdes.VESDE)
    assert set(sdes.available_sdes()) == {"vpsde", "subvpsde", "vesde", "ou", "brownian", "linear", "cosine", "edm"}
    with pytest.raises(ValueError, match="available"):
        sdes.get_sde("vpp")
    with pytest.raises(ValueError):
        sdes.VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        sdes.VPSDE(beta_max=2000.0, N=1000)
    with pytest.raises(ValueError):
        sdes.OUSDE(theta=-1.0)
