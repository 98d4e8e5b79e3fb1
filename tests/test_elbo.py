"""Variational bounds (``sde_diffusion.elbo``), learned reverse variances and the ``elbo`` eval stage, against
mathematics: closed-form Gaussian KLs and reverse kernels, Monte Carlo, exact discrete probabilities by integrating a
Gaussian over each bin, exact mixture log-densities.

The identities behind the Gaussian tests.  For data x0 ~ N(mu, s^2 I) every variable of the forward chain is
jointly Gaussian, so the *true* reverse kernels q(x_{k-1} | x_k) (the data-marginal ones, not q(. | x_k, x0)) are
isotropic Gaussians: mean E[x_{k-1} | x_k] = c0 E[x0 | x_k] + ct x_k (the tower rule on Ho et al.'s posterior mean) and
variance V_k = Var(x_{k-1} | x_k) = P_{k-1} - alpha_k P_{k-1}^2 / P_k, P_k = abar_k s^2 + 1 - abar_k.  V_k lies between
beta-tilde_k and beta_k, so a learned-variance model with v_k = (log V_k - log beta-tilde_k) / (log beta_k - log
beta-tilde_k) has exactly these kernels.  With the prior q(x_T) and the decoder q(x0 | x_1) (a continuous Gaussian)
the model's joint is q(x_T) prod q(x_{k-1} | x_k) = q(x_{0:T}) (a Markov chain's time reversal), hence
p(x_{1:T} | x0) = q(x_{1:T} | x0) and

    E_q[bound(x0)] = -log p(x0) + KL(q(x_{1:T} | x0) || p(x_{1:T} | x0)) = -log q(x0)      exactly, for every x0.

With the fixed variances beta or beta-tilde (and the exact means) the model differs from q, and only the expectation
over the data is ordered: E_x0[bound] = H(q) + KL(q(x0) || p(x0)) + E KL(paths) >= H(q) = E_x0[-log q(x0)].
"""
import math
import os
import shutil

import numpy as np
import pytest
import scipy.stats
import torch

from sde_diffusion import configs, elbo
from sde_diffusion.losses import ddpm_hybrid_loss
from sde_diffusion.prediction import Model
from sde_diffusion.sdes import VESDE, VPSDE
from sde_diffusion.targets import GaussianMixture

F64 = torch.float64
MU, S2 = 0.3, 0.25            # data N(MU, S2 I) of the Gaussian tests


def chain(sde, S):
    """(abar, abar_prev, beta, beta_tilde) of the (strided) chain on levels S, written out from Ho et al. eq. 7."""
    abar = sde.alphas_cumprod.to(F64)[S]
    prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    beta = 1 - abar / prev
    return abar, prev, beta, (1 - prev) / (1 - abar) * beta


def level_lookup(sde, abar):
    """Map the path time the bound asks at back to the chain's level (nearest log-SNR)."""
    q = -0.5 * (torch.log(abar) - torch.log1p(-abar))            # increasing

    def idx(t):
        a, s = sde.marginal_coeffs(t.to(F64))
        lam = torch.log(a) - torch.log(s)
        k = torch.searchsorted(q, -lam).clamp(0, len(q) - 1)
        km = (k - 1).clamp(min=0)
        return torch.where((q[km] + lam).abs() < (q[k] + lam).abs(), km, k)
    return idx


def gaussian_data_model(sde, S, learned=True):
    """x0_hat = E[x0 | x_t] of N(MU, S2 I) at the path time t; with ``learned`` also the v that makes every reverse
    kernel (and the decoder) the true q(x_{k-1} | x_k) of the chain on levels S."""
    abar, prev, beta, bt = chain(sde, S)
    P, Pp = abar * S2 + 1 - abar, prev * S2 + 1 - prev
    V = Pp - (abar / prev) * Pp ** 2 / P                         # Var(x_{k-1} | x_k); k = 1: Var(x0 | x_{S_1})
    log_bt = torch.log(bt)
    log_bt[0] = log_bt[1]                                          # the decoder's clipped beta-tilde
    vfrac = (torch.log(V) - log_bt) / (torch.log(beta) - log_bt)
    idx = level_lookup(sde, abar)

    def fn(x, t):
        a, s = (c.to(F64)[:, None] for c in sde.marginal_coeffs(t.to(F64)))
        x0_hat = MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)
        return (x0_hat, vfrac[idx(t)][:, None].expand_as(x)) if learned else x0_hat
    return Model(fn, "x0", learned_variance=learned)


def exact_prior(sde, S):
    aT = sde.alphas_cumprod.to(F64)[S[-1]]
    return aT.sqrt() * MU, aT * S2 + 1 - aT


def gaussian_nll(x0):
    return (0.5 * math.log(2 * math.pi * S2) + (x0 - MU) ** 2 / (2 * S2)).sum(1)


# ------------------------------------------------------------------------------------------------ pieces
def test_normal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.4, math.log(1.7)
    x = m1 + math.exp(0.5 * lv1) * torch.randn(400_000, generator=g, dtype=F64)
    mc = elbo.gaussian_log_likelihood(x, m1, lv1) - elbo.gaussian_log_likelihood(x, m2, lv2)
    kl = float(elbo.normal_kl(m1, lv1, m2, lv2))
    assert abs(float(mc.mean()) - kl) < 4 * float(mc.std()) / math.sqrt(x.numel())
    assert float(elbo.normal_kl(m1, lv1, m1, lv1)) == 0.0


@pytest.mark.parametrize("levels,data_range", [(17, (-1.0, 1.0)), (256, (0.0, 1.0))])
def test_discretized_decoder_sums_to_one_and_integrates_the_gaussian_over_each_bin(levels, data_range):
    lo, hi = data_range
    grid = torch.linspace(lo, hi, levels, dtype=F64)
    h = (hi - lo) / (2 * (levels - 1))
    for mean, std in [(0.2, 0.05), (lo - 0.3, 0.01), (hi, 1e-4), (0.5 * (lo + hi), 30.0), (0.1, 1e-3)]:
        logp = elbo.discretized_gaussian_log_likelihood(grid, torch.full_like(grid, mean),
                                                        torch.full_like(grid, 2 * math.log(std)), levels, data_range)
        assert abs(float(torch.logsumexp(logp, 0))) < 1e-9
        edges_lo = np.where(np.arange(levels) == 0, -np.inf, grid.numpy() - h)
        edges_hi = np.where(np.arange(levels) == levels - 1, np.inf, grid.numpy() + h)
        above = edges_lo > mean                     # upper tail: difference of survival functions (no cancellation)
        p = np.where(above, scipy.stats.norm.sf(edges_lo, mean, std) - scipy.stats.norm.sf(edges_hi, mean, std),
                     scipy.stats.norm.cdf(edges_hi, mean, std) - scipy.stats.norm.cdf(edges_lo, mean, std))
        big = p > 1e-12
        np.testing.assert_allclose(np.exp(logp.numpy()[big]), p[big], rtol=1e-6)
    # a level far in the tail keeps a finite, accurate log-probability (scipy's logcdf of the same bin)
    x = torch.tensor([hi], dtype=F64)
    lp = float(elbo.discretized_gaussian_log_likelihood(x, torch.tensor([lo]), torch.tensor([2 * math.log(0.05)]),
                                                        levels, data_range))
    assert math.isfinite(lp) and abs(lp - scipy.stats.norm.logsf(hi - h, lo, 0.05)) < 1e-6 * abs(lp)


def test_chain_steps_and_bad_inputs_raise_one_clear_value_error():
    sde = VPSDE(0.1, 20.0, 50)
    assert elbo.chain_steps(sde).tolist() == list(range(50))
    S = elbo.chain_steps(sde, num_steps=5)
    assert S.tolist() == [0, 12, 24, 37, 49]
    x0 = torch.zeros(2, 3, dtype=F64)
    model = gaussian_data_model(sde, S, learned=False)
    with pytest.raises(ValueError, match="VP SDE"):
        elbo.discrete_elbos(VESDE(N=50), model, x0, decoder="gaussian")
    with pytest.raises(ValueError, match="num_steps must be in"):
        elbo.discrete_elbos(sde, model, x0, num_steps=51, decoder="gaussian")
    with pytest.raises(ValueError, match="strictly increasing"):
        elbo.discrete_elbos(sde, model, x0, steps=[3, 2, 10], decoder="gaussian")
    with pytest.raises(ValueError, match="learned"):
        elbo.discrete_elbos(sde, model, x0, variances=("learned",), decoder="gaussian")
    with pytest.raises(ValueError, match="num_levels"):
        elbo.discrete_elbos(sde, model, x0)
    with pytest.raises(ValueError, match="level grid|not on the"):
        elbo.discrete_elbos(sde, model, x0 + 0.01, num_levels=17)
    with pytest.raises(ValueError, match="importance"):
        elbo.continuous_elbo(sde, model, x0, importance="none", decoder="gaussian")
    with pytest.raises(ValueError, match="t_min < t_max"):
        elbo.continuous_elbo(sde, model, x0, t_min=0.5, t_max=0.2, decoder="gaussian")


# ------------------------------------------------------------------------------------------------ discrete bound
@pytest.mark.parametrize("N,K", [(20, None), (60, 6)])
def test_exact_reverse_kernels_give_the_exact_nll(N, K):
    """Full chain and an Improved-DDPM strided chain: E_q[bound(x0)] = -log q(x0) at fixed x0 (module doc)."""
    sde = VPSDE(0.1, 10.0, N)
    S = elbo.chain_steps(sde, num_steps=K)
    R = 20_000
    x0 = torch.tensor([[0.7, -0.2]], dtype=F64).repeat(R, 1)
    b = elbo.discrete_elbo(sde, gaussian_data_model(sde, S), x0, num_steps=K, variance="learned",
                           decoder="gaussian", prior=exact_prior(sde, S),
                           generator=torch.Generator().manual_seed(N))
    exact = float(gaussian_nll(x0[:1]))
    se = float(b.total.std()) / math.sqrt(R)
    assert abs(float(b.total.mean()) - exact) < 4 * se, (float(b.total.mean()), exact, se)
    assert b.terms.shape == (R, len(S) - 1)


def test_fixed_variances_bound_the_nll_and_the_gap_shrinks_with_n():
    """E_x0[bound] >= H(q) for beta and beta-tilde; the gap measured against the exact-kernel bound (same draws, so
    the difference has a small variance).  Measured (D = 4): beta 0.18, 0.09, 0.05 nats at N = 25, 50, 100 (O(1/N)),
    beta-tilde 13.3, 7.9, 4.9 — beta-tilde's gap shrinks more slowly and tends to a positive constant: near the data
    the true reverse variance is ~ beta_k and beta_k / beta-tilde_k ~ (k + 1) / k for the first k, whatever N."""
    D, B = 4, 4000
    gaps = {"beta": [], "posterior": []}
    for N in (25, 50, 100):
        sde = VPSDE(0.1, 20.0, N)
        S = elbo.chain_steps(sde)
        g = torch.Generator().manual_seed(N)
        x0 = MU + math.sqrt(S2) * torch.randn(B, D, generator=g, dtype=F64)
        res = elbo.discrete_elbos(sde, gaussian_data_model(sde, S), x0, decoder="gaussian",
                                  prior=exact_prior(sde, S), generator=g)
        nll = gaussian_nll(x0)
        exact_gap = res["learned"].total - nll
        assert abs(float(exact_gap.mean())) < 4 * float(exact_gap.std()) / math.sqrt(B)
        for name in gaps:
            d = res[name].total - nll
            assert float(d.mean()) > -4 * float(d.std()) / math.sqrt(B)          # >= H(q)
            paired = res[name].total - res["learned"].total
            se = float(paired.std()) / math.sqrt(B)
            assert float(paired.mean()) > 4 * se
            gaps[name].append((float(paired.mean()), se))
    for name, g in gaps.items():
        for (a, sa), (b, sb) in zip(g, g[1:]):
            assert a - b > 4 * math.hypot(sa, sb), (name, g)
    ratios = [a[0] / b[0] for a, b in zip(gaps["beta"], gaps["beta"][1:])]
    assert all(1.6 < r < 2.5 for r in ratios), ratios                            # beta: O(1/N)


def discrete_posterior_model(sde, levels_y, probs):
    """E[x0 | x_t] for 1-D data on the points levels_y with probabilities probs (a mixture of point masses)."""
    logw = torch.log(torch.as_tensor(probs, dtype=F64))
    y = torch.as_tensor(levels_y, dtype=F64)

    def fn(x, t):
        a, s = (c.to(F64)[:, None] for c in sde.marginal_coeffs(t.to(F64)))
        logits = logw[None] - (x - a * y[None]) ** 2 / (2 * s ** 2)                  # (B, L) for x: (B, 1)
        return (torch.softmax(logits, 1) * y[None]).sum(1, keepdim=True)
    return Model(fn, "x0")


def test_discretized_bound_on_quantised_gaussian_data_bounds_the_exact_discrete_entropy():
    """Data: N(0.1, 0.3^2) quantised to the 17 levels of [-1, 1] (P(k) = the Gaussian's mass on bin k, end bins to
    +-inf).  The model with the exact E[x0 | x_t] of those discrete data and the discretised decoder: for both fixed
    variances E_P[bound] = sum_k P(k) E[bound(k)] >= H(P) (the cross-entropy of the model's discrete distribution),
    summed exactly over the levels.  Measured: H(P) = 2.30 nats; at N = 100 beta is 0.16 above it, beta-tilde 1.27
    (its coarse first steps); at N = 1000 0.28 and 0.15."""
    L, m, sd = 17, 0.1, 0.3
    grid = np.linspace(-1, 1, L)
    h = 1.0 / (L - 1)
    lo = np.where(np.arange(L) == 0, -np.inf, grid - h)
    hi = np.where(np.arange(L) == L - 1, np.inf, grid + h)
    P = scipy.stats.norm.cdf(hi, m, sd) - scipy.stats.norm.cdf(lo, m, sd)
    H = float(-(P * np.log(P)).sum())
    sde = VPSDE(0.1, 20.0, 100)
    R = 400
    x0 = torch.as_tensor(grid, dtype=F64).repeat_interleave(R)[:, None]
    res = elbo.discrete_elbos(sde, discrete_posterior_model(sde, grid, P), x0, num_levels=L,
                              generator=torch.Generator().manual_seed(3))
    w = torch.as_tensor(P, dtype=F64).repeat_interleave(R) / R
    for name, b in res.items():
        per_level = b.total.reshape(L, R)
        mean = float((w * b.total).sum())
        se = math.sqrt(float((torch.as_tensor(P) ** 2 * per_level.var(1) / R).sum()))
        assert mean > H - 4 * se, (name, mean, H, se)
        assert mean - H < {"beta": 0.3, "posterior": 1.5}[name], (name, mean, H)


# ------------------------------------------------------------------------------------------------ continuous bound
MIX = GaussianMixture([0.3, 0.7], [[-0.5, 0.2], [0.4, -0.1]], [0.05, 0.1])


def test_continuous_bound_is_above_the_exact_nll_of_a_mixture_and_importance_sampling_cuts_its_variance():
    """Exact score of a 2-D mixture, continuous Gaussian decoder: E_x0[bound] >= E_x0[-log p(x0)] (cross-entropy >=
    entropy) and close to it (measured: 0.08 nats above, D = 2); uniform-t and log-SNR sampling agree in the mean,
    the latter with a much smaller variance (measured: per-example variance of the diffusion term 295 vs 16 nats^2
    for 8 draws of t)."""
    sde = VPSDE(0.1, 20.0, 1000)
    g = torch.Generator().manual_seed(5)
    B = 3000
    x0 = MIX.sample(B, g).to(F64)
    model = Model(MIX.score_fn(sde), "score")
    nll = -MIX.log_prob(x0)
    res = {imp: elbo.continuous_elbo(sde, model, x0, num_t=8, importance=imp, decoder="gaussian", generator=g)
           for imp in elbo.IMPORTANCE}
    for imp, b in res.items():
        d = b.total - nll
        se = float(d.std()) / math.sqrt(B)
        assert -4 * se < float(d.mean()) < 0.1 + 4 * se, (imp, float(d.mean()), se)
    a, u = res["logsnr"].total, res["uniform"].total
    assert abs(float(a.mean() - u.mean())) < 4 * math.sqrt(float(a.var() + u.var()) / B)
    assert float((res["uniform"].diffusion).var()) > 5 * float(res["logsnr"].diffusion.var())


def test_discrete_bound_tends_to_the_continuous_bound_as_the_chain_is_refined():
    """On a fixed log-SNR interval (levels of a 20000-step chain, K of them spaced evenly in lambda), the discrete
    bound's diffusion term with the posterior variance, sum 1/2 (SNR_{k-1} - SNR_k) ||x0 - x0_hat||^2 (VDM eq. 13),
    tends to L_inf of the same interval (the prior terms are identical; the decoders differ and are not compared).
    The gap is O(1/K) (a Riemann sum; measured with B = 1500: 0.96, 0.23, 0.08 nats at K = 32, 128, 512), and its
    Richardson extrapolation (4 gap(4K) - gap(K)) / 3 is within the Monte Carlo error of 0."""
    sde = VPSDE(0.1, 20.0, 20_000)
    abar = sde.alphas_cumprod.to(F64)
    lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
    j0 = 200                                                           # t ~ 0.01: lambda ~ 3.45
    g = torch.Generator().manual_seed(11)
    B = 600
    x0 = MIX.sample(B, g).to(F64)
    model = Model(MIX.score_fn(sde), "score")
    t_of = lambda j: float(sde.t_from_log_snr(lam[j]))                 # noqa: E731
    cont = elbo.continuous_elbo(sde, model, x0, t_min=t_of(j0), t_max=t_of(-1), num_t=32, decoder="gaussian",
                                generator=g)
    disc = {}
    for K in (16, 64, 256):
        targets = torch.linspace(float(lam[j0]), float(lam[-1]), K, dtype=F64)
        S = torch.searchsorted(-lam, -targets).clamp(max=len(lam) - 1)
        S[0] = j0
        b = elbo.discrete_elbo(sde, model, x0, steps=S, variance="posterior", decoder="gaussian", generator=g)
        assert torch.allclose(b.prior, cont.prior, rtol=1e-9, atol=1e-12)
        disc[K] = b.diffusion
    gap = {K: float((d - cont.diffusion).mean()) for K, d in disc.items()}
    assert gap[16] > gap[64] > gap[256] > 0, gap
    assert 2.5 < gap[16] / gap[64] < 6, gap                              # O(1/K)
    extrapolated = (4 * disc[256] - disc[64]) / 3 - cont.diffusion
    se = float(extrapolated.std()) / math.sqrt(B)
    assert abs(float(extrapolated.mean())) < 4 * se, (float(extrapolated.mean()), se, gap)


# ------------------------------------------------------------------------------------------------ learned variance
def test_ancestral_step_with_learned_variance_interpolates_beta_and_posterior():
    from solvers.ancestral import ancestral_step
    g = torch.Generator().manual_seed(0)
    x, score, z = (torch.randn(3, 4, generator=g, dtype=F64) for _ in range(3))
    a_t, s_t, a_s, s_s = (torch.tensor(v, dtype=F64) for v in (0.6, 0.8, 0.9, math.sqrt(1 - 0.81)))
    beta = s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2                 # 1 - alpha_t on VP
    post = beta * s_s ** 2 / s_t ** 2
    mean = (x + beta * score) / (a_t / a_s)
    for v, var in ((0.0, post), (1.0, beta), (0.3, post ** 0.7 * beta ** 0.3)):
        out = ancestral_step(x, score, a_t, s_t, a_s, s_s, z, "learned", log_variance_frac=torch.full_like(x, v))
        torch.testing.assert_close(out, mean + var.sqrt() * z)
    with pytest.raises(ValueError, match="learned"):
        ancestral_step(x, score, a_t, s_t, a_s, s_s, z, "learned")


def toy_learned_config(**extra):
    c = configs.get_config("toy_1d")
    over = {"training.loss": "ddpm", "model.learned_variance": True, "model.num_scales": 50, "model.nf": 16,
            "model.num_layers": 1}
    over.update(extra)
    return configs.apply_overrides(c, over)


def test_learned_variance_network_model_and_sampler():
    import solvers
    from sde_diffusion.networks import get_model, get_network, get_noise_fn
    c = toy_learned_config()
    sde, net = configs.build_sde(c), get_network(c)
    with torch.no_grad():
        net.out.bias.copy_(torch.tensor([0.0, 1.0]))          # eps_hat = 0, v = 1 (the beta variance)
    x = torch.randn(5, 1)
    out = net(x, torch.rand(5))
    assert out.shape == (5, 2)
    eps, v = get_noise_fn(net, with_variance=True)(x, torch.rand(5), torch.ones(5))
    assert eps.shape == v.shape == x.shape and torch.allclose(v, torch.ones_like(v), atol=1e-6)
    model = get_model(sde, net)
    assert model.learned_variance and model.predict(sde, x, 0.5).log_variance_frac.shape == x.shape
    # auto = learned: with v = 1 that is the beta variance, so it draws what variance="beta" draws
    r = {var: solvers.sample(sde, model, (6, 1), "ancestral", 10, generator=torch.Generator().manual_seed(1),
                             variance=var).samples for var in ("auto", "beta", "posterior")}
    torch.testing.assert_close(r["auto"], r["beta"], rtol=1e-4, atol=1e-5)      # exp(1 * log beta) in float32
    assert not torch.allclose(r["auto"], r["posterior"])
    with pytest.raises(ValueError, match="training.loss = ddpm|ddpm"):
        get_network(toy_learned_config(**{"training.loss": "dsm"}))
    with pytest.raises(configs.ConfigError, match="learned_variance"):
        configs.validate(toy_learned_config(**{"training.loss": "dsm"}), "train")


def test_hybrid_loss_is_l_simple_plus_lambda_n_l_t_and_stops_the_gradient_of_the_mean():
    """Written out by hand at fixed levels (i = 3: Ho et al.'s KL; i = 0: the discretised decoder, scipy's CDF)."""
    sde = VPSDE(0.1, 20.0, 40)
    N, lam = sde.N, 1e-3
    x0 = torch.tensor([[-1.0, 0.25, 1.0]], dtype=F64).repeat(2, 1)
    z = torch.tensor([[0.3, -1.2, 0.5], [1.1, 0.2, -0.7]], dtype=F64)
    i = torch.tensor([3, 0])
    eps_hat = torch.tensor([[0.1, -1.0, 0.4], [0.9, 0.3, -0.5]], dtype=F64, requires_grad=True)
    v = torch.tensor([[0.2, 0.5, 0.9], [0.4, 0.1, 0.6]], dtype=F64, requires_grad=True)
    loss = ddpm_hybrid_loss(sde, lambda x, t, std: (eps_hat, v), x0, vlb_weight=lam, reduce="mean", num_levels=9,
                            i=i, z=z)
    ab = sde.alphas_cumprod.to(F64).numpy()
    e, vv, x, zz = eps_hat.detach().numpy(), v.detach().numpy(), x0.numpy(), z.numpy()
    expected = []
    for row, k in enumerate(i.tolist()):
        a, ap = ab[k], (ab[k - 1] if k > 0 else 1.0)
        xt = math.sqrt(a) * x[row] + math.sqrt(1 - a) * zz[row]
        x0h = (xt - math.sqrt(1 - a) * e[row]) / math.sqrt(a)
        beta = 1 - a / ap
        bt = (1 - ap) / (1 - a) * beta if k > 0 else (1 - ab[0]) / (1 - ab[1]) * (1 - ab[1] / ab[0])
        var = np.exp(vv[row] * np.log(beta) + (1 - vv[row]) * np.log(bt))
        if k > 0:
            c0, ct = math.sqrt(ap) * beta / (1 - a), math.sqrt(a / ap) * (1 - ap) / (1 - a)
            mq, mp = c0 * x[row] + ct * xt, c0 * x0h + ct * xt
            term = 0.5 * (np.log(var / bt) + bt / var + (mq - mp) ** 2 / var - 1)
        else:
            hw = 1.0 / 8
            up = np.where(x[row] >= 1, np.inf, x[row] + hw)
            dn = np.where(x[row] <= -1, -np.inf, x[row] - hw)
            sd = np.sqrt(var)
            term = -np.log(scipy.stats.norm.cdf(up, x0h, sd) - scipy.stats.norm.cdf(dn, x0h, sd))
        expected.append(np.mean((e[row] - zz[row]) ** 2) + lam * N * np.mean(term))
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-9)
    simple = ((eps_hat - z) ** 2).mean(1)
    (loss - simple).sum().backward()                              # the vlb part alone
    assert torch.all(eps_hat.grad == 0) and torch.all(v.grad != 0)


# ------------------------------------------------------------------------------------------------ eval stage
def test_eval_stage_writes_every_bound_and_resumes_exactly(tmp_path, monkeypatch):
    """A 4-step vp_digits_learned_var U-Net on a 50-level chain: ``--mode eval`` with ``eval.enable_elbo`` records
    the beta / posterior / learned discrete bounds and the continuous one, per batch, in the summary JSON and
    TensorBoard; interrupted after its first batch, the resumed run computes only the second and ends with the
    numbers of an uninterrupted run."""
    from sde_diffusion.run import evaluate as ev
    from sde_diffusion.run import train as train_lib
    c = configs.apply_overrides(configs.get_config("vp_digits_learned_var"), {
        "training.n_iters": 4, "training.batch_size": 8, "training.checkpoint_freq": 4, "training.snapshot_freq": 0,
        "training.progress": False, "model.nf": 8, "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "model.num_scales": 50, "eval.enable_bpd": False, "eval.enable_sampling": False, "eval.enable_elbo": True,
        "eval.elbo_num_examples": 6, "eval.elbo_batch_size": 4, "eval.elbo_num_t": 4, "eval.progress": False})
    train_lib.train(c, str(tmp_path / "a"), device="cpu")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    full = ev.evaluate(c, str(tmp_path / "a"), device="cpu")
    bounds = full["elbo"]["bounds"]
    assert set(bounds) == {"beta", "posterior", "learned", "continuous"}
    for b in bounds.values():
        assert math.isfinite(b["bpd"]) and b["bpd_stderr"] > 0
        assert abs(b["prior_bpd"] + b["diffusion_bpd"] + b["decoder_bpd"] - b["bpd"]) < 1e-9
    calls = {"n": 0}
    real = elbo.discrete_elbos

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("killed")
        return real(*a, **k)
    monkeypatch.setattr(elbo, "discrete_elbos", failing)
    with pytest.raises(RuntimeError, match="killed"):
        ev.evaluate(c, str(tmp_path / "b"), device="cpu")
    calls["n"] = 10
    resumed = ev.evaluate(c, str(tmp_path / "b"), device="cpu")
    assert calls["n"] == 11                                        # only the missing batch
    assert resumed["elbo"]["bounds"] == bounds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(str(tmp_path / "a"), "tensorboard"))
    acc.Reload()
    assert {"eval/elbo_learned_bpd", "eval/elbo_continuous_bpd_stderr"} <= set(acc.Tags()["scalars"])
    assert "bounds" in ev.summary_line(full)
