"""DPM-Solver(++) (``dpm_solver``), its SDE variant (``dpm_solver_sde``) and adaptive DPM-Solver-12/23
(``dpm_adaptive``) against mathematics (exact probability-flow maps of Gaussians, DDIM's closed form, point masses,
mixture moments) and against independent implementations (diffusers' ``DPMSolverMultistepScheduler``, k-diffusion's
``sample_dpmpp_2m`` / ``sample_dpmpp_2m_sde``).

The exact flow of a Gaussian N(mu, U diag(lam) U^T) moves each eigen-coordinate by the ratio of marginal standard
deviations: x_s - a_s mu = sqrt(v_s / v_t) (x_t - a_t mu), v = a^2 lam + sigma^2 (as in tests/test_solver_orders.py).
"""
import math

import numpy as np
import pytest
import torch

import solvers
from sde_diffusion import sdes, targets
from sde_diffusion.prediction import Model
from solvers.dpm_solver import dynamic_threshold

F64 = dict(dtype=torch.float64)
#: diffusers' scheduler warns about numpy 2's copy keyword and the deprecated 'dpmsolver' algorithm type
_DIFFUSERS_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def _rotated_gaussian(eig):
    th = 0.6
    U = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], **F64)
    lam = torch.tensor(eig, **F64)
    mu = torch.tensor([1.0, -0.5], **F64)
    return targets.Gaussian(mu, U @ torch.diag(lam) @ U.T), U, lam, mu


def _exact_flow(sde, x_T, U, lam, mu, eps):
    a_T, s_T = sde.marginal_coeffs(sde.T)
    a_e, s_e = sde.marginal_coeffs(eps)
    ratio = torch.sqrt((a_e ** 2 * lam + s_e ** 2) / (a_T ** 2 * lam + s_T ** 2))
    return a_e * mu + (((x_T - a_T * mu) @ U) * ratio) @ U.T


def _slope(ladder, errs):
    return -np.polyfit(np.log(ladder), np.log(errs), 1)[0]


# ================================================================================================ orders
ORDER_CASES = [
    ({"order": 1}, 1), ({"order": 2}, 2), ({"order": 3}, 3),
    ({"order": 2, "variant": "singlestep"}, 2), ({"order": 3, "variant": "singlestep"}, 3),
    ({"order": 1, "prediction": "eps"}, 1), ({"order": 2, "prediction": "eps"}, 2),
    ({"order": 3, "prediction": "eps"}, 3),
    pytest.param({"order": 2, "variant": "singlestep", "prediction": "eps"}, 2, marks=pytest.mark.slow),
    ({"order": 3, "variant": "singlestep", "prediction": "eps"}, 3),
]


def _case_id(case):
    opts = case.values[0] if hasattr(case, "values") else case[0]
    return "-".join(f"{v}" for v in opts.values())


@pytest.mark.parametrize("opts,order", ORDER_CASES, ids=[_case_id(c) for c in ORDER_CASES])
def test_measured_order_against_the_exact_flow(opts, order):
    """Steps uniform in lambda (logsnr grid), no final denoising, 32..256 steps: slope = order +- 0.3.

    Why eps = 0.05 and variances 0.05 / 0.1 (not test_solver_orders' 1e-3 and 0.3 / 2): for that smoother problem
    the multistep-3 error's h^3 term nearly cancels over the path (its weighted integral reduces to x0_hat'' at the
    ends, which is tiny when the path ends deep in the data regime), so 3M measures slope ~4 until, near 1e-8, the
    first-order warm-up step's O(e^{2 lambda_T} h^2) error takes over.  Here the h^3 term is clean for every method."""
    sde = sdes.VPSDE()
    eps = 0.05
    target, U, lam, mu = _rotated_gaussian([0.05, 0.1])
    x_T = 1.2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu, eps)
    ladder, errs = [32, 64, 128, 256], []
    for n in ladder:
        res = solvers.sample(sde, target.score_fn(sde), x_T.shape, "dpm_solver", n, x_init=x_T, eps=eps,
                             denoise=False, dtype=torch.float64, schedule="logsnr", lower_order_final=False, **opts)
        errs.append(float((res.samples - exact).abs().max()))
    slope = _slope(ladder, errs)
    assert abs(slope - order) < 0.3, (opts, slope, errs)


# ================================================================================================ exactness
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
@pytest.mark.parametrize("denoise", [True, False])
@pytest.mark.parametrize("opts", [{"prediction": "x0"}, {"prediction": "eps"},
                                  {"prediction": "x0", "variant": "singlestep"}])
def test_first_order_is_ddim(sde_name, denoise, opts):
    """DPM-Solver-1 = DPM-Solver++(1) = DDIM with eta = 0 (Lu et al. 2022, eq. 3.7; 2022b, sec. 4), on any grid,
    including the final step to sigma = 0."""
    sde = sdes.get_sde(sde_name)
    target = targets.GaussianMixture([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.2, 0.3])
    x_T = sde.prior_std * torch.randn(16, 2, generator=torch.Generator().manual_seed(3), **F64)
    common = dict(x_init=x_T, eps=1e-3, denoise=denoise, dtype=torch.float64, schedule="edm")
    ddim = solvers.sample(sde, target.score_fn(sde), x_T.shape, "ddim", 12, **common)
    ours = solvers.sample(sde, target.score_fn(sde), x_T.shape, "dpm_solver", 12, order=1, **common, **opts)
    assert ours.nfe == ddim.nfe == 12
    assert torch.allclose(ours.samples, ddim.samples, rtol=1e-12, atol=1e-12)


PM_CASES = [dict(order=o, variant=v, prediction=p) for o in (1, 2, 3) for v in ("multistep", "singlestep")
            for p in ("x0", "eps")]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_point_mass_is_exact_in_any_number_of_steps(steps):
    """For a point mass x0_hat = x0 everywhere and the flow is x_t = a_t x0 + sigma_t z with z fixed: every order and
    variant reproduces it exactly, ending at eps (denoise=False) or at x0 itself (denoise=True, no extra call)."""
    sde = sdes.VPSDE()
    x0 = torch.tensor([0.7, -1.3], **F64)
    pm = targets.PointMass(x0)
    x_T = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), **F64)
    a_T, s_T = sde.marginal_coeffs(sde.T)
    a_e, s_e = sde.marginal_coeffs(1e-3)
    z = (x_T - a_T * x0) / s_T
    for opts in PM_CASES:
        for denoise in (False, True):
            res = solvers.sample(sde, pm.score_fn(sde), x_T.shape, "dpm_solver", steps, x_init=x_T, eps=1e-3,
                                 denoise=denoise, dtype=torch.float64, schedule="logsnr", **opts)
            want = x0.expand_as(x_T) if denoise else a_e * x0 + s_e * z
            assert torch.allclose(res.samples, want, rtol=1e-10, atol=1e-10), (opts, denoise)
    res = solvers.sample(sde, pm.score_fn(sde), x_T.shape, "dpm_adaptive", 1, x_init=x_T, eps=1e-3, denoise=False,
                         dtype=torch.float64)
    assert torch.allclose(res.samples, a_e * x0 + s_e * z, rtol=1e-10, atol=1e-10)
    # the first step has length h_init; its error estimate is ~0, so the next one goes to the end
    assert res.stats["accepted"] == 2 and res.stats["rejected"] == 0


@pytest.mark.parametrize("opts,calls", [({}, lambda n: n), ({"order": 3}, lambda n: n),
                                        ({"order": 2, "variant": "singlestep"}, lambda n: 2 * n - 1),
                                        ({"order": 3, "variant": "singlestep"}, lambda n: 3 * n - 2)])
def test_calls_and_the_step_to_sigma_zero(opts, calls):
    """Multistep: n calls for n steps; singlestep order k: k per step, the final step to t = 0 being first order (one
    call).  The callback sees every grid step, ending at t = 0; declared calls per step match."""
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.0, 1.0], 0.5)
    seen = []
    res = solvers.sample(sde, target.score_fn(sde), (4, 2), "dpm_solver", 9, callback=lambda i: seen.append(i["t"]),
                         **opts)
    info = solvers.get_sampler("dpm_solver")
    assert info.lands_on_data and res.nfe == calls(9)
    assert info.calls_per_step(opts) == (opts.get("order", 2) if opts.get("variant") == "singlestep" else 1)
    assert len(seen) == 9 and seen[-1] == 0.0 and all(a > b for a, b in zip(seen, seen[1:]))
    res = solvers.sample(sde, target.score_fn(sde), (4, 2), "dpm_solver", 9, denoise=False, **opts)
    assert res.nfe == 9 * info.calls_per_step(opts)


def test_dynamic_thresholding():
    """Saharia et al. 2022: s = clamp(quantile(|x0|, ratio), 1, max) per sample, x0 <- clip(x0, -s, s) / s; and a
    sampler with thresholding on a point mass at (3, -0.5) lands on the thresholded point (1, -1/6)."""
    x0 = torch.tensor([[0.2, -0.5, 0.9, 0.1], [4.0, -2.0, 0.5, 1.5], [30.0, 0.0, -1.0, 2.0]], **F64)
    got = dynamic_threshold(x0, 0.75, 5.0)
    for row, out in zip(x0.numpy(), got.numpy()):
        s = min(max(np.quantile(np.abs(row), 0.75), 1.0), 5.0)
        np.testing.assert_allclose(out, np.clip(row, -s, s) / s, rtol=1e-12)
    sde = sdes.VPSDE()
    pm = targets.PointMass([3.0, -0.5])
    for opts in ({}, {"prediction": "eps"}, {"order": 3, "variant": "singlestep"}):
        res = solvers.sample(sde, pm.score_fn(sde), (5, 2), "dpm_solver", 6, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0), thresholding=True, threshold_ratio=1.0,
                             threshold_max=10.0, **opts)
        assert torch.allclose(res.samples, torch.tensor([1.0, -1 / 6], **F64).expand(5, 2), atol=1e-12), opts
    sde_res = solvers.sample(sde, pm.score_fn(sde), (5, 2), "dpm_solver_sde", 6, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0), thresholding=True, threshold_ratio=1.0,
                             threshold_max=10.0)
    assert torch.allclose(sde_res.samples, torch.tensor([1.0, -1 / 6], **F64).expand(5, 2), atol=1e-12)


# ================================================================================================ diffusers
def _diffusers_setup(algorithm_type, order, final_sigmas_type, lower_order_final, spacing="trailing"):
    """A diffusers scheduler on our VP's DDPM betas and a discrete eps model whose (a_i, sigma_i) table is the
    scheduler's own (its float32 sigmas_i = sqrt((1 - abar_i) / abar_i), a_i = 1/sqrt(1 + sigmas_i^2)), so that both
    sides see the same noise levels at the nodes."""
    diffusers = pytest.importorskip("diffusers")
    sde = sdes.VPSDE()
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=sde.N, trained_betas=sde.discrete_betas.numpy(), algorithm_type=algorithm_type,
        solver_order=order, solver_type="midpoint", lower_order_final=lower_order_final,
        final_sigmas_type=final_sigmas_type, timestep_spacing=spacing, thresholding=False)
    abar = sched.alphas_cumprod.numpy()
    sig = torch.from_numpy(np.sqrt((1 - abar) / abar).astype(np.float32)).to(torch.float64)
    a_tab = 1 / torch.sqrt(1 + sig ** 2)
    lam_tab = -torch.log(sig)
    mix = targets.GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.1])
    score = mix.score_fn(sde)

    def eps_fn(x, idx):                # exact eps at the (fractional) level idx: -sigma * score at t(lambda_idx)
        idx = torch.as_tensor(idx, dtype=torch.float64).expand(x.shape[0])
        j = torch.clamp(idx.floor().long(), 0, sde.N - 2)
        lam = lam_tab[j] + (idx - j) * (lam_tab[j + 1] - lam_tab[j])
        t = sde.t_from_log_snr(lam)
        return -sde.marginal_coeffs(t)[1][:, None] * score(x, t)

    model = Model(eps_fn, "eps", discrete=(a_tab, sig * a_tab))
    return sde, sched, model, eps_fn


def _diffusers_loop(sched, eps_fn, x, noises=None):
    for k, t in enumerate(sched.timesteps):
        kw = {} if noises is None else {"variance_noise": noises[k]}
        x = sched.step(eps_fn(x, float(t)), t, x, **kw).prev_sample
    return x


@_DIFFUSERS_WARNINGS
@pytest.mark.parametrize("n", [8, 20])
def test_dpmpp_2m_equals_diffusers(n):
    """Same exact-score eps model, same levels (diffusers 'trailing' = our 'trailing' schedule), same x_T, final
    step to sigma = 0 (final_sigmas_type='zero'): DPM-Solver++(2M) agrees to 1e-5.  The remainder (~1e-6) is
    diffusers' float32: it stores sigmas in float32 and upcasts the sample to float32 inside each step."""
    sde, sched, model, eps_fn = _diffusers_setup("dpmsolver++", 2, "zero", True)
    sched.set_timesteps(n)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), **F64)
    theirs = _diffusers_loop(sched, eps_fn, x_T.clone())
    ours = solvers.sample(sde, model, x_T.shape, "dpm_solver", n, x_init=x_T, schedule="trailing",
                          dtype=torch.float64)
    assert ours.nfe == n
    assert float((ours.samples - theirs).abs().max()) < 1e-5


@_DIFFUSERS_WARNINGS
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_2m_noise_prediction_equals_diffusers(lower_order_final):
    """DPM-Solver-2M with noise prediction vs diffusers' 'dpmsolver', which cannot step to sigma = 0: both end at
    level 0 (ours: the 'linspace' levels 999..0 with denoise=False; diffusers: those timesteps and
    final_sigmas_type='sigma_min'), 8 steps, so lower_order_final decides the last step's order on both sides."""
    sde, sched, model, eps_fn = _diffusers_setup("dpmsolver", 2, "sigma_min", lower_order_final)
    n = 8
    levels = torch.linspace(sde.N - 1, 0, n + 1, dtype=torch.float64).round().long()
    sched.set_timesteps(timesteps=levels[:-1].tolist())
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(6), **F64)
    theirs = _diffusers_loop(sched, eps_fn, x_T.clone())
    ours = solvers.sample(sde, model, x_T.shape, "dpm_solver", n, x_init=x_T, schedule="linspace", denoise=False,
                          dtype=torch.float64, prediction="eps", lower_order_final=lower_order_final)
    assert float((ours.samples - theirs).abs().max()) < 1e-5


@_DIFFUSERS_WARNINGS
def test_dpmpp_2m_sde_equals_diffusers_with_the_same_noise():
    """SDE-DPM-Solver++(2M), eta = 1, vs diffusers' 'sde-dpmsolver++' fed our noise stream (ctx.noise draws one z per
    step after the call, none on the step to sigma = 0) through ``variance_noise``."""
    sde, sched, model, eps_fn = _diffusers_setup("sde-dpmsolver++", 2, "zero", True)
    n = 12
    sched.set_timesteps(n)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(7), **F64)
    g = torch.Generator().manual_seed(8)
    noises = [torch.randn(x_T.shape, generator=g, **F64) for _ in range(n - 1)] + [torch.zeros_like(x_T)]
    theirs = _diffusers_loop(sched, eps_fn, x_T.clone(), noises)
    ours = solvers.sample(sde, model, x_T.shape, "dpm_solver_sde", n, x_init=x_T, schedule="trailing",
                          dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert float((ours.samples - theirs).abs().max()) < 1e-5


# ================================================================================================ k-diffusion
def _k_diffusion_sampling():
    """k-diffusion's sampling module (experiments.compare_peers loads it without the package's image extras)."""
    from experiments.compare_peers import load_k_diffusion_sampling
    mod = load_k_diffusion_sampling()
    if mod is None:
        pytest.skip("k-diffusion's sampling module is not importable (k-diffusion, torchsde or torchdiffeq missing)")
    return mod


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_dpmpp_2m_and_2m_sde_equal_k_diffusion_on_ve(eta):
    """On the VE path (a = 1, k-diffusion's own parametrisation) k-diffusion's float64 DPM-Solver++(2M)
    (eta = 0: ``sample_dpmpp_2m``) and 2M SDE (eta = 1, our noise stream through ``noise_sampler``) agree to 1e-12,
    on an edm grid ending at sigma = 0."""
    kd = _k_diffusion_sampling()
    sde = sdes.VESDE()
    mix = targets.GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.0, 0.5]], [0.2, 0.1])
    score = mix.score_fn(sde)
    x_T = sde.prior_std * torch.randn(32, 2, generator=torch.Generator().manual_seed(9), **F64)
    method, extra = ("dpm_solver", {}) if eta == 0 else ("dpm_solver_sde", {"eta": eta})
    ours = solvers.sample(sde, score, x_T.shape, method, 15, x_init=x_T, dtype=torch.float64, schedule="edm",
                          generator=torch.Generator().manual_seed(10), **extra)
    sigmas = sde.marginal_coeffs(ours.timesteps)[1]

    def denoiser(x, sigma):
        t = sde.t_from_log_snr(-torch.log(sigma))
        return x + sigma[:, None] ** 2 * score(x, t)

    if eta == 0:
        theirs = kd.sample_dpmpp_2m(denoiser, x_T.clone(), sigmas, disable=True)
    else:
        g = torch.Generator().manual_seed(10)
        theirs = kd.sample_dpmpp_2m_sde(denoiser, x_T.clone(), sigmas, disable=True, eta=eta,
                                        noise_sampler=lambda s, s_next: torch.randn(x_T.shape, generator=g, **F64))
    assert float((ours.samples - theirs).abs().max()) < 1e-12


# ================================================================================================ SDE variant
def test_sde_first_step_is_the_ddpm_posterior():
    """With eta = 1 the first (first-order) step is DDIM with eta = 1, i.e. a draw from q(x_s | x_t, x0_hat): same
    noise, same result."""
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.5, -0.2], [[0.3, 0.1], [0.1, 0.2]])
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(11), **F64)
    kw = dict(x_init=x_T, eps=0.3, denoise=False, dtype=torch.float64)
    ddim = solvers.sample(sde, target.score_fn(sde), x_T.shape, "ddim", 1, generator=torch.Generator().manual_seed(1),
                          eta=1.0, **kw)
    ours = solvers.sample(sde, target.score_fn(sde), x_T.shape, "dpm_solver_sde", 1,
                          generator=torch.Generator().manual_seed(1), **kw)
    assert torch.allclose(ours.samples, ddim.samples, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts", [{"order": 2}, {"order": 3}, pytest.param({"order": 2, "eta": 0.5},
                                                                           marks=pytest.mark.slow)])
def test_sde_lands_on_a_2d_mixture(opts):
    """Mixture weight within 5 binomial standard errors, each mode's mean within 5 standard errors (+0.01 for the
    other mode's tail), 6000 samples from an exact p_T draw, 60 steps on the edm grid."""
    sde = sdes.VPSDE()
    mix = targets.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], 0.5])
    gen = torch.Generator().manual_seed(12)
    n = 6000
    a_T, s_T = sde.marginal_coeffs(sde.T)
    x_T = a_T * mix.sample(n, generator=gen) + s_T * torch.randn(n, 2, generator=gen, **F64)
    res = solvers.sample(sde, mix.score_fn(sde), x_T.shape, "dpm_solver_sde", 60, generator=gen, x_init=x_T,
                         dtype=torch.float64, schedule="edm", **opts)
    x = res.samples
    assert res.nfe == 60 and solvers.get_sampler("dpm_solver_sde").stochastic(opts)
    right = x[:, 0] > 0
    assert abs(float(right.double().mean()) - 0.7) < 5 * math.sqrt(0.21 / n)
    for sel, mu, var in ((right, [2.0, 1.0], [0.5, 0.5]), (~right, [-2.0, 0.0], [0.3, 0.2])):
        se = torch.sqrt(torch.tensor(var, **F64) / int(sel.sum()))
        assert ((x[sel].mean(0) - torch.tensor(mu, **F64)).abs() < 5 * se + 0.01).all(), (opts, x[sel].mean(0))


# ================================================================================================ adaptive
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prediction", ["x0", pytest.param("eps", marks=pytest.mark.slow)])
def test_adaptive_meets_its_tolerance(order, prediction):
    """Against the exact flow: the global error stays within 5x the tolerance (rtol = atol), tighter tolerances cost
    more calls and give smaller errors; the call count is 1 + (accepted + rejected)(order - 1) + (accepted - 1)."""
    sde = sdes.VPSDE()
    target, U, lam, mu = _rotated_gaussian([0.3, 2.0])
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu, 1e-3)
    runs = []
    for tol in ((1e-2, 1e-4, 1e-6) if order == 3 else (1e-2, 1e-3, 1e-4)):
        res = solvers.sample(sde, target.score_fn(sde), x_T.shape, "dpm_adaptive", 1, x_init=x_T, eps=1e-3,
                             denoise=False, dtype=torch.float64, order=order, rtol=tol, atol=tol,
                             prediction=prediction)
        st = res.stats
        assert st["accepted"] >= 1 and st["rejected"] >= 0
        assert res.nfe == 1 + (st["accepted"] + st["rejected"]) * (order - 1) + st["accepted"] - 1
        runs.append((tol, float((res.samples - exact).abs().max()), res.nfe))
    for tol, err, _ in runs[1:]:
        assert err < 5 * tol, runs
    assert runs[0][2] < runs[1][2] < runs[2][2] and runs[0][1] > runs[1][1] > runs[2][1], runs
    with_jump = solvers.sample(sde, target.score_fn(sde), x_T.shape, "dpm_adaptive", 1, x_init=x_T, eps=1e-3,
                               dtype=torch.float64, order=order, prediction=prediction)
    assert with_jump.nfe == with_jump.stats["nfe"] + 1          # denoise: one call for the jump to x0_hat


# ================================================================================================ options
def test_registration_and_variants():
    for name in ("dpm_solver", "dpm_solver_sde", "dpm_adaptive"):
        assert name in solvers.available()
    info = solvers.get_sampler("dpm_solver")
    assert info.defaults["order"] == 2 and info.defaults["variant"] == "multistep"
    assert info.defaults["prediction"] == "x0" and info.defaults["thresholding"] is False
    assert not info.stochastic({}) and info.lands_on_data
    assert solvers.get_sampler("dpm_solver_sde").lands_on_data
    assert not solvers.get_sampler("dpm_solver_sde").stochastic({"eta": 0.0})
    assert solvers.get_sampler("dpm_adaptive").kind == "adaptive"
    sde = sdes.VPSDE()
    score = targets.Gaussian([0.0], 1.0).score_fn(sde)
    for method in ("dpm_solver", "dpm_solver_sde", "dpm_adaptive"):
        for variant in solvers.get_sampler(method).variants:
            res = solvers.sample(sde, score, (3, 1), method, 6, generator=torch.Generator().manual_seed(0), **variant)
            assert torch.isfinite(res.samples).all()


@pytest.mark.parametrize("method,opts", [
    ("dpm_solver", {"order": 4}), ("dpm_solver", {"order": 0}), ("dpm_solver", {"order": True}),
    ("dpm_solver", {"order": 2.5}), ("dpm_solver", {"variant": "twostep"}), ("dpm_solver", {"prediction": "v"}),
    ("dpm_solver", {"lower_order_final": "yes"}), ("dpm_solver", {"thresholding": 1}),
    ("dpm_solver", {"thresholding": True, "threshold_ratio": 0.0}), ("dpm_solver", {"threshold_ratio": 1.5}),
    ("dpm_solver", {"threshold_max": 0.5}), ("dpm_solver", {"threshold_max": float("inf")}),
    ("dpm_solver", {"ordr": 2}),
    ("dpm_solver_sde", {"order": 1}), ("dpm_solver_sde", {"eta": -0.1}), ("dpm_solver_sde", {"eta": float("nan")}),
    ("dpm_solver_sde", {"prediction": "x0"}),
    ("dpm_adaptive", {"order": 1}), ("dpm_adaptive", {"rtol": -1.0}), ("dpm_adaptive", {"atol": 0.0}),
    ("dpm_adaptive", {"h_init": 0.0}), ("dpm_adaptive", {"safety": 1.5}), ("dpm_adaptive", {"prediction": "score"}),
])
def test_bad_options_raise_value_error(method, opts):
    sde = sdes.VPSDE()
    with pytest.raises(ValueError):
        solvers.sample(sde, targets.Gaussian([0.0], 1.0).score_fn(sde), (2, 1), method, 4, **opts)
