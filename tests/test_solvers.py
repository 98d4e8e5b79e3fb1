"""Every sampler, with exact scores, lands on analytic targets; step formulas match DDPM/SMLD written out by hand."""
import math
import os
import sys

import pytest
import torch

import solvers
from sde_diffusion import sdes, targets

F64 = dict(dtype=torch.float64)
N_SAMPLES = 20_000

# (method, options, num_steps): enough steps that discretisation bias sits well below 5 standard errors
METHODS = [
    ("ancestral", {}, 500),
    ("ancestral", {"variance": "beta"}, 500),
    ("euler_maruyama", {}, 500),
    ("pc", {}, 300),
    ("pc", {"predictor": "euler_maruyama"}, 300),
    ("ode", {"solver": "heun"}, 100),
    ("rk45", {"rtol": 1e-6, "atol": 1e-6}, 1),
    ("ddim", {}, 500),
]


def _exact_prior_draw(sde, target, n, gen):
    """x_T ~ p_T exactly (a x0 + sigma z), so that prior mismatch does not blur the sampler's own error."""
    a, s = sde.marginal_coeffs(sde.T)
    x0 = target.sample(n, generator=gen)
    return a * x0 + s * torch.randn(x0.shape, generator=gen, **F64)


def _run(sde, target, method, opts, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_T = _exact_prior_draw(sde, target, N_SAMPLES, gen)
    res = solvers.sample(sde, target.score_fn(sde), x_T.shape, method, steps, generator=gen, x_init=x_T,
                         dtype=torch.float64, **opts)
    return res.samples


def _assert_gaussian_moments(x, mean, cov, n_se=5.0):
    """Mean within n_se standard errors sqrt(S_ii/n); covariance entries within n_se * sqrt((S_ii S_jj + S_ij^2)/n).
    Discretisation (and the Tweedie denoising at eps, which shrinks the variance by O(sigma(eps)^2)) must stay below
    this."""
    n = x.shape[0]
    d = torch.diag(cov)
    assert ((x.mean(0) - mean).abs() < n_se * torch.sqrt(d / n)).all(), (x.mean(0), mean)
    se = torch.sqrt((d[:, None] * d[None] + cov ** 2) / n)
    assert ((torch.cov(x.T) - cov).abs() < n_se * se).all(), (torch.cov(x.T), cov)


def _id(p):
    return p[0] + ("-" + "-".join(f"{v}" for v in p[1].values()) if p[1] else "")


@pytest.mark.parametrize("method,opts,steps", METHODS, ids=[_id(m) for m in METHODS])
def test_lands_on_1d_and_anisotropic_2d_gaussians(method, opts, steps):
    sde = sdes.VPSDE()
    g1 = targets.Gaussian([1.5], [[0.3]])
    x = _run(sde, g1, method, opts, steps)
    _assert_gaussian_moments(x, g1.mean, g1.cov)
    th = 0.5
    R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], **F64)
    cov = R @ torch.diag(torch.tensor([0.05, 1.5], **F64)) @ R.T
    g2 = targets.Gaussian([-1.0, 0.5], cov)
    x = _run(sde, g2, method, opts, steps, seed=1)
    _assert_gaussian_moments(x, g2.mean, g2.cov)


#: the default run takes every method on VP and the deterministic ones on sub-VP and VE; the stochastic samplers on
#: sub-VP and VE (hundreds of steps on 20 000 paths each) run with -m slow
MIXTURE_CASES = [pytest.param(sde_name, *m, id=f"{_id(m)}-{sde_name}",
                              marks=[pytest.mark.slow] if sde_name != "vp" and m[0] in ("ancestral", "euler_maruyama",
                                                                                         "pc") else [])
                 for m in METHODS for sde_name in ("vp", "subvp", "ve")]


@pytest.mark.parametrize("sde_name,method,opts,steps", MIXTURE_CASES)
def test_lands_on_2d_mixture(sde_name, method, opts, steps):
    """Mixture weights within 5 binomial standard errors; each mode's mean within 5 standard errors."""
    if sde_name != "vp" and opts.get("variance") == "beta":
        pytest.skip("variance='beta' is DDPM's choice; covered on VP")
    sde = sdes.get_sde(sde_name)
    mix = targets.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], 0.5])
    if sde_name == "ve" and method in ("ancestral", "euler_maruyama", "pc"):
        steps = 2 * steps    # VE's sigma spans 3.7 decades: stochastic samplers need finer grids
    x = _run(sde, mix, method, opts, steps, seed=2)
    n = x.shape[0]
    right = x[:, 0] > 0
    w = right.double().mean()
    assert abs(float(w) - 0.7) < 5 * math.sqrt(0.21 / n), float(w)
    for sel, mu, var in ((right, [2.0, 1.0], [0.5, 0.5]), (~right, [-2.0, 0.0], [0.3, 0.2])):
        m = x[sel].mean(0)
        se = torch.sqrt(torch.tensor(var, **F64) / int(sel.sum()))
        assert ((m - torch.tensor(mu, **F64)).abs() < 5 * se + 0.01).all(), (m, mu)   # 0.01: the other mode's tail


def test_ancestral_step_is_ddpm_posterior_mean_formula():
    """One VP ancestral step t -> s equals 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) + sigma_t z with
    abar(t) = exp(-int_0^t beta), alpha_t = abar_t/abar_s, beta_t = 1 - alpha_t, eps = -sqrt(1-abar_t) * score, and
    sigma_t^2 = beta_t (1 - abar_s)/(1 - abar_t) ('posterior') or beta_t ('beta')."""
    sde = sdes.VPSDE(0.1, 20.0)
    target = targets.Gaussian([0.4, -0.3], [[0.5, 0.1], [0.1, 0.2]])
    t, s = 0.6, 0.55

    def abar(u):
        return math.exp(-(0.1 * u + 0.5 * u ** 2 * 19.9))

    alpha = abar(t) / abar(s)
    beta = 1 - alpha
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(7, 2, generator=gen, **F64)
    eps_pred = -math.sqrt(1 - abar(t)) * target.score_fn(sde)(x_t, torch.full((7,), t, **F64))
    for variance, var in (("posterior", beta * (1 - abar(s)) / (1 - abar(t))), ("beta", beta)):
        gen.manual_seed(11)
        z = torch.randn(7, 2, generator=gen, **F64)
        expected = (x_t - beta / math.sqrt(1 - abar(t)) * eps_pred) / math.sqrt(alpha) + math.sqrt(var) * z
        gen.manual_seed(11)
        # a one-step grid from t to s: treat [0, t] as the SDE's time range by starting from x_init at T = t
        sub = _Truncated(sde, t)
        res = solvers.sample(sub, target.score_fn(sde), (7, 2), "ancestral", 1, generator=gen, eps=s,
                             x_init=x_t, denoise=False, dtype=torch.float64, variance=variance)
        assert torch.allclose(res.samples, expected, rtol=1e-12, atol=1e-12)
        assert res.nfe == 1


def test_ancestral_step_is_smld_on_ve():
    """VE ancestral: x_s = x_t + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_s^2 (sigma_t^2 - sigma_s^2)/sigma_t^2) z,
    with sigma_t^2 the exact marginal variance sigma_min^2 ((sigma_max/sigma_min)^{2t} - 1)."""
    sde = sdes.VESDE(0.01, 50.0)
    target = targets.GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], 0.1)
    t, s = 0.5, 0.45

    def var(u):
        return 0.01 ** 2 * ((50.0 / 0.01) ** (2 * u) - 1)

    gen = torch.Generator().manual_seed(3)
    x_t = 3 * torch.randn(9, 1, generator=gen, **F64)
    score = target.score_fn(sde)(x_t, torch.full((9,), t, **F64))
    gen.manual_seed(5)
    z = torch.randn(9, 1, generator=gen, **F64)
    expected = x_t + (var(t) - var(s)) * score + math.sqrt(var(s) * (var(t) - var(s)) / var(t)) * z
    gen.manual_seed(5)
    res = solvers.sample(_Truncated(sde, t), target.score_fn(sde), (9, 1), "ancestral", 1, generator=gen, eps=s,
                         x_init=x_t, denoise=False, dtype=torch.float64)
    assert torch.allclose(res.samples, expected, rtol=1e-12, atol=1e-12)


def test_ddim_eta_one_is_the_ancestral_posterior_step():
    """DDIM(eta = 1) and the ancestral step compute the same mean by different formulas (a_s x0_hat + ... versus
    Tweedie on the transition) and the same variance; given the same noise they agree to round-off."""
    from solvers.ancestral import ancestral_step
    from solvers.ddim import ddim_step
    target = targets.GaussianMixture([0.4, 0.6], [[-1.0, 0.0], [1.0, 0.5]], 0.2)
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(32, 2, generator=gen, **F64)
    z = torch.randn(32, 2, generator=gen, **F64)
    for sde in (sdes.VPSDE(), sdes.VESDE(), sdes.SubVPSDE()):
        t, s = 0.4, 0.3
        a_t, s_t = sde.marginal_coeffs(t)
        a_s, s_s = sde.marginal_coeffs(s)
        score = target.score_fn(sde)(x, torch.full((32,), t, **F64))
        x0_hat, eps_hat = (x + s_t ** 2 * score) / a_t, -s_t * score
        v_ts = s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
        assert torch.allclose(ddim_step(x, x0_hat, eps_hat, a_s, s_s, v_ts, s_t, z, eta=1.0),
                              ancestral_step(x, score, a_t, s_t, a_s, s_s, z), rtol=1e-10, atol=1e-10)


def test_ddim_eta_zero_is_exact_for_a_point_mass():
    """For a point mass x0 the probability-flow map is x_s = a_s x0 + sigma_s (x_T - a_T x0)/sigma_T; deterministic
    DDIM reproduces it in a single step, and with the grid ending on the data it returns x0 itself."""
    sde = sdes.VPSDE()
    x0 = torch.tensor([0.7, -0.2], **F64)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), **F64)
    res = solvers.sample(sde, targets.PointMass(x0).score_fn(sde), (6, 2), "ddim", 1, x_init=x_T, denoise=False,
                         dtype=torch.float64, eps=1e-3)
    a_T, s_T = sde.marginal_coeffs(1.0)
    a_e, s_e = sde.marginal_coeffs(1e-3)
    assert torch.allclose(res.samples, a_e * x0 + s_e * (x_T - a_T * x0) / s_T, rtol=1e-12, atol=1e-12)
    res = solvers.sample(sde, targets.PointMass(x0).score_fn(sde), (6, 2), "ddim", 1, x_init=x_T,
                         dtype=torch.float64)
    assert res.nfe == 1 and torch.allclose(res.samples, x0.expand(6, 2), rtol=1e-12, atol=1e-12)


class _Truncated:
    """The same SDE seen on [0, T'] (to start a sampler at an interior time)."""

    def __init__(self, sde, T):
        self._sde, self._T = sde, T

    def __getattr__(self, name):
        return getattr(self._sde, name)

    @property
    def T(self):
        return self._T

    def reverse(self, score_fn, probability_flow=False):
        return sdes.ReverseSDE(self, score_fn, probability_flow)


@pytest.mark.parametrize("method,opts,per_step", [
    ("ancestral", {}, 1), ("euler_maruyama", {}, 1), ("pc", {"n_corrector_steps": 2}, 3),
    ("ode", {"solver": "euler"}, 1), ("ode", {"solver": "heun"}, 2), ("ode", {"solver": "rk4"}, 4),
    ("ddim", {"eta": 0.5}, 1)])
@pytest.mark.parametrize("denoise", [True, False])
def test_nfe_is_exact_and_callback_sees_every_step(method, opts, per_step, denoise):
    """n steps cost n * calls-per-step network calls.  With denoise the grid ends at t = 0: samplers that land on the
    data take that step themselves, for the others the last step is the one-call jump to x0_hat."""
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.0, 1.0], 0.5)
    calls, seen = [0], []

    def counted(x, t):
        calls[0] += 1
        assert t.shape == (x.shape[0],)
        return target.score_fn(sde)(x, t)

    res = solvers.sample(sde, counted, (8, 2), method, 25, callback=lambda info: seen.append(info["t"]),
                         denoise=denoise, eps=1e-3, **opts)
    info = solvers.get_sampler(method)
    assert info.calls_per_step(opts) == per_step
    lands = info.lands_on_data or not denoise
    assert res.nfe == calls[0] == (25 * per_step if lands else 24 * per_step + 1) == info.nfe(25, opts, denoise)
    assert len(seen) == 25 and all(a > b for a, b in zip(seen, seen[1:]))
    assert seen[-1] == (0.0 if denoise else pytest.approx(1e-3, abs=1e-15))
    if denoise:
        assert abs(seen[-2] - 1e-3) < 1e-15 and float(res.timesteps[-1]) == 0.0


def test_adaptive_nfe_counts_every_evaluation():
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.0], 1.0)
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return target.score_fn(sde)(x, t)

    x_T = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))      # one start: the same adaptive path twice
    res = solvers.sample(sde, counted, (4, 1), "rk45", 1, denoise=False, x_init=x_T)
    assert res.nfe == calls[0] > 6
    st = res.stats
    # Dormand–Prince: 2 calls to choose the first step, then 6 per attempted step
    assert st["nfev"] == res.nfe == 2 + 6 * (st["accepted"] + st["rejected"]) and st["accepted"] >= 1
    assert solvers.sample(sde, counted, (4, 1), "rk45", 1, x_init=x_T).nfe == res.nfe + 1   # + the jump to x0_hat


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["ancestral", "euler_maruyama", "pc", "ode", "ddim", "rk45"])
def test_any_shape_and_dtype(method, dtype):
    """Image-shaped (B, C, H, W) batches in both precisions: a 12-dim isotropic Gaussian N(0.5, 0.2 I)."""
    sde = sdes.VPSDE()
    target = targets.Gaussian(torch.full((12,), 0.5, **F64), 0.2)
    gen = torch.Generator().manual_seed(0)
    steps = 300 if method == "ancestral" else 100        # ancestral's O(1/N) variance bias has a large constant
    res = solvers.sample(sde, target.score_fn(sde), (4000, 3, 2, 2), method, steps, generator=gen, dtype=dtype)
    x = res.samples
    assert x.shape == (4000, 3, 2, 2) and x.dtype == dtype
    assert abs(float(x.mean()) - 0.5) < 5 * math.sqrt(0.2 / x.numel()) + 0.01
    assert abs(float(x.var()) - 0.2) < 0.02


def test_reproducible_with_generator():
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.0], 1.0)
    a = solvers.sample(sde, target.score_fn(sde), (5, 1), "pc", 30, generator=torch.Generator().manual_seed(4))
    b = solvers.sample(sde, target.score_fn(sde), (5, 1), "pc", 30, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.samples, b.samples)


def test_schedules_are_decreasing_and_pinned():
    for sde in (sdes.VPSDE(), sdes.VESDE(), sdes.SubVPSDE()):
        for name in ("uniform", "quadratic", "edm", "logsnr"):
            ts = solvers.get_timesteps(sde, 20, eps=1e-3, schedule=name)
            assert ts.shape == (21,) and float(ts[0]) == sde.T and abs(float(ts[-1]) - 1e-3) < 1e-15
            assert (ts[1:] < ts[:-1]).all()
    # edm: noise-to-signal ratios follow Karras et al.'s rho spacing (7 by default, passable)
    sde = sdes.VESDE()
    for rho, opts in ((7, {}), (3, {"rho": 3})):
        ts = solvers.get_timesteps(sde, 10, eps=1e-5, schedule="edm", **opts)
        a, s = sde.marginal_coeffs(ts)
        r = (s / a) ** (1 / rho)
        assert torch.allclose(r[1:] - r[:-1], (r[1:] - r[:-1]).mean().expand(10), rtol=1e-8)
    # logsnr: equal steps in lambda = log(a / sigma)
    sde = sdes.VPSDE()
    lam = sde.log_snr(solvers.get_timesteps(sde, 12, eps=1e-4, schedule="logsnr"))
    assert torch.allclose(lam[1:] - lam[:-1], (lam[1:] - lam[:-1]).mean().expand(12), rtol=1e-9)


def test_schedule_options_pass_through_sample():
    sde = sdes.VPSDE()
    score = targets.Gaussian([0.0], 1.0).score_fn(sde)
    a = solvers.sample(sde, score, (3, 1), "ddim", 8, schedule="edm", rho=3.0)
    b = solvers.get_timesteps(sde, 7, eps=sde.sampling_eps, schedule="edm", rho=3.0)
    assert torch.equal(a.timesteps[:-1], b) and float(a.timesteps[-1]) == 0.0
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rho'\].*schedule 'uniform' accepts \[\]|"
                                         r"unknown option\(s\) \['rho'\]"):
        solvers.sample(sde, score, (3, 1), "ddim", 8, rho=3.0)


def _rotated_spectrum_gaussian(d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    var = torch.logspace(-4, 0, d, **F64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, **F64))
    return targets.Gaussian(torch.zeros(d, **F64), Q @ torch.diag(var) @ Q.T), Q, var


def test_optimized_schedule_beats_the_fixed_grids_and_is_cached():
    """The grid fitted to the model and the sampler beats the uniform-lambda and EDM grids at the same NFE on an
    image-like spectrum, measured on fresh draws (not the pilots) against the exact probability-flow map in the data's
    whitened metric; the fit runs once per model, sampler and settings (its calls are not the sample's)."""
    sde = sdes.VPSDE()
    target, Q, var = _rotated_spectrum_gaussian()
    x_T = torch.randn(128, 16, generator=torch.Generator().manual_seed(1), **F64)
    eps = 1e-5
    (a_T, s_T), (a_e, s_e) = sde.marginal_coeffs(1.0), sde.marginal_coeffs(eps)
    # the exact flow x_T -> x_eps of N(0, Q diag(var) Q^T): per eigendirection scaled by C_eps / C_T,
    # C_t = sqrt(a_t^2 var + sigma_t^2)
    exact = ((x_T @ Q) * torch.sqrt((a_e ** 2 * var + s_e ** 2) / (a_T ** 2 * var + s_T ** 2))) @ Q.T
    scale = torch.sqrt(a_e ** 2 * var + s_e ** 2)
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return target.score_fn(sde)(x, t)

    def whitened_rms(x):
        return float((((x - exact) @ Q) / scale).pow(2).sum(1).mean().sqrt())

    model = solvers.base.as_model(counted)
    fit = {"pilot_samples": 64, "max_evals": 150}
    for method, opts, n, gain in (("ddim", {}, 6, 0.8), ("dpm_solver", {"order": 2}, 6, 0.3)):
        errs = {}
        for sched in ("logsnr", "edm", "optimized"):
            calls[0] = 0
            r = solvers.sample(sde, model, x_T.shape, method, n, x_init=x_T, eps=eps, denoise=False,
                               dtype=torch.float64, schedule=sched, **opts, **(fit if sched == "optimized" else {}))
            assert r.nfe == n
            if sched == "optimized":
                assert calls[0] > 100 * n                      # the fit's pilot runs
            errs[sched] = whitened_rms(r.samples)
        assert errs["optimized"] < gain * min(errs["logsnr"], errs["edm"]), (method, errs)
        calls[0] = 0
        again = solvers.sample(sde, model, x_T.shape, method, n, x_init=x_T, eps=eps, denoise=False,
                               dtype=torch.float64, schedule="optimized", **opts, **fit)
        assert calls[0] == n and whitened_rms(again.samples) == errs["optimized"]     # cached: no second fit
    with pytest.raises(ValueError, match="deterministic fixed-grid sampler"):
        solvers.sample(sde, model, x_T.shape, "ancestral", 5, schedule="optimized")
    with pytest.raises(ValueError, match="pilot_samples >= 2"):
        solvers.sample(sde, model, x_T.shape, "ddim", 5, schedule="optimized", pilot_samples=1)
    with pytest.raises(ValueError, match="unknown option"):
        solvers.sample(sde, model, x_T.shape, "ddim", 5, schedule="optimized", solver="ddim")


def test_sampler_files_are_discovered(tmp_path, monkeypatch):
    """Registration is one file and one decorator: a new module in the solvers package appears in available()."""
    import importlib
    import shutil
    pkg = tmp_path / "solvers"
    shutil.copytree(os.path.dirname(solvers.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "my_sampler.py").write_text(
        "from .base import register_sampler\n\n"
        "@register_sampler('my_sampler')\n"
        "def my_sampler(ctx, x, grid, gain: float = 1.0):\n"
        "    \"\"\"Euler on the probability flow.\"\"\"\n"
        "    for i in range(grid.num_steps):\n"
        "        x = x + gain * float(grid.t[i + 1] - grid.t[i]) * ctx.predict(x, grid.t[i]).velocity\n"
        "        x = ctx.step_done(i, grid.t[i + 1], x)\n"
        "    return x\n")
    saved = {k: v for k, v in sys.modules.items() if k == "solvers" or k.startswith("solvers.")}
    for k in saved:
        monkeypatch.delitem(sys.modules, k)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        fresh = importlib.import_module("solvers")
        assert "my_sampler" in fresh.available() and set(saved["solvers"].available()) <= set(fresh.available())
        assert fresh.get_sampler("my_sampler").options == ["gain"]
        sde = sdes.VPSDE()
        res = fresh.sample(sde, targets.Gaussian([0.0], 1.0).score_fn(sde), (4, 1), "my_sampler", 5, gain=1.0)
        assert res.nfe == 5
        with pytest.raises(ValueError, match="unknown option"):
            fresh.sample(sde, targets.Gaussian([0.0], 1.0).score_fn(sde), (4, 1), "my_sampler", 5, gian=1.0)
    finally:
        for k in [k for k in sys.modules if k == "solvers" or k.startswith("solvers.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_available_lists_at_least_the_wave_one_methods():
    assert {"ancestral", "ddim", "euler_maruyama", "pc", "ode", "rk45"} <= set(solvers.available())
    for m in solvers.available():
        info = solvers.get_sampler(m)
        assert info.kind in ("fixed", "adaptive") and info.description
        assert (info.calls_per_step() is None) == (info.kind == "adaptive")


def test_bad_input_raises_clear_errors():
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.0, 0.0], 1.0)
    score = target.score_fn(sde)
    with pytest.raises(ValueError, match="unknown sampling method 'heun'; available: .*ancestral, .*ddim, "):
        solvers.sample(sde, score, (4, 2), "heun", 10)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            solvers.sample(sde, score, (4, 2), "ode", bad)
    with pytest.raises(ValueError, match="must return x's shape"):
        solvers.sample(sde, lambda x, t: x[:, :1], (4, 2), "euler_maruyama", 10)
    with pytest.raises(ValueError, match="unknown option"):
        solvers.sample(sde, score, (4, 2), "ode", 10, snr=0.1)
    with pytest.raises(ValueError, match="eps"):
        solvers.sample(sde, score, (4, 2), "ode", 10, eps=1.5)
    with pytest.raises(ValueError, match="DDPM step needs"):      # reverse-diffusion predictor: beta_max * dt = 2
        solvers.sample(sde, score, (4, 2), "pc", 10)

    def nan_late(x, t):
        s = score(x, t)
        return s if float(t[0]) > 0.5 else s * float("nan")

    for method in solvers.available():
        with pytest.raises(solvers.NonFiniteError, match="non-finite"):
            solvers.sample(sde, nan_late, (4, 2), method, 30)

    def explode(x, t):
        return score(x, t) * 1e300

    with pytest.raises(solvers.NonFiniteError, match="non-finite"):
        solvers.sample(sde, explode, (4, 2), "euler_maruyama", 10, dtype=torch.float64)
