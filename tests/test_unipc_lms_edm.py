"""UniPC, LMS and the EDM samplers against mathematics and against independent implementations.

* Measured convergence orders against the exact probability-flow map of a Gaussian target (in the eigenbasis of its
  covariance each coordinate moves by the ratio of standard deviations: x_s - a_s mu = sqrt(v_s / v_t)(x_t - a_t mu)
  with v = a^2 lam + sigma^2), on ladders of step counts where the local slopes have settled.
* Exactness: UniPC of order 1 without corrector is DDIM(eta = 0); for a point mass the prediction x0_hat (and eps_hat
  along the exact flow) is constant, so every one of these integrators is exact, in one step or many.
* Peers: diffusers' ``UniPCMultistepScheduler`` loop and k-diffusion's ``sample_heun`` / ``sample_lms``, fed the same
  exact model, nodes and x_T (skipped when the package is not installed; k-diffusion's sampling module is loaded alone,
  its package __init__ needs torchvision).
* EDM's stochastic sampler (S_churn > 0) lands on a 2-D Gaussian mixture; bad options raise ValueError.
"""
import math

import numpy as np
import pytest
import torch

import solvers
from sde_diffusion import sdes, targets
from sde_diffusion.prediction import Model

F64 = dict(dtype=torch.float64)
EPS = 1e-3


# ------------------------------------------------------------------------------------------------ helpers
def _rotated_gaussian():
    th = 0.6
    U = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], **F64)
    lam = torch.tensor([0.3, 2.0], **F64)
    mu = torch.tensor([1.0, -0.5], **F64)
    return targets.Gaussian(mu, U @ torch.diag(lam) @ U.T), U, lam, mu


def _exact_flow(sde, x_T, U, lam, mu, t_end=EPS):
    """The probability-flow map T -> t_end of N(mu, U diag(lam) U^T): per eigen-coordinate the std ratio."""
    a_T, s_T = sde.marginal_coeffs(sde.T)
    a_e, s_e = sde.marginal_coeffs(t_end)
    ratio = torch.sqrt((a_e ** 2 * lam + s_e ** 2) / (a_T ** 2 * lam + s_T ** 2))
    return a_e * mu + (((x_T - a_T * mu) @ U) * ratio) @ U.T


def _mixture():
    return targets.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], 0.5])


class _KarrasVE:
    """EDM's own path x = x0 + sigma eps (s(t) = 1, sigma(t) = t): what k-diffusion's samplers integrate."""

    def marginal_coeffs(self, t):
        t = torch.as_tensor(t, **F64)
        return torch.ones_like(t), t


def _karras_denoiser(target):
    """D(y; sigma) = E[x0 | x0 + sigma eps = y] = y + sigma^2 grad log p(y; sigma), exact for the target."""
    score = target.score_fn(_KarrasVE())

    def D(y, sigma):
        sigma = sigma.to(torch.float64)
        return y + sigma[:, None] ** 2 * score(y, sigma)
    return D


def _k_diffusion_sampling():
    """k-diffusion's sampling module (experiments.compare_peers loads it without the package's image extras)."""
    from experiments.compare_peers import load_k_diffusion_sampling
    mod = load_k_diffusion_sampling()
    if mod is None:
        pytest.skip("k-diffusion's sampling module is not importable (k-diffusion, torchsde or torchdiffeq missing)")
    return mod


def _slope(ladder, errs):
    return -np.polyfit(np.log(ladder), np.log(errs), 1)[0]


# ------------------------------------------------------------------------------------------------ orders
# (method, options, schedule, ladder, expected order).  The grid ends at eps (denoise=False), so the last step is
# an ordinary step; UniPC's lower_order_final would make it first order (local error O(h^2)) and cap the measured
# order at 2, so it is off here.  LMS's local slopes approach k from below (at 40 -> 80 -> 160 -> 320 steps on the
# edm grid: 1.88/1.94/1.97, 2.75/2.88/2.94, 3.57/3.79/3.89 for k = 2, 3, 4), hence its longer ladders.
ORDERS = [
    ("unipc", {"order": 1}, "logsnr", [10, 20, 40, 80], 2.0),
    ("unipc", {"order": 1, "corrector": False}, "logsnr", [10, 20, 40, 80], 1.0),
    ("unipc", {"order": 2, "lower_order_final": False}, "logsnr", [20, 40, 80, 160], 3.0),
    ("unipc", {"order": 2, "lower_order_final": False, "prediction": "noise"}, "logsnr", [20, 40, 80, 160], 3.0),
    ("unipc", {"order": 2, "lower_order_final": False, "variant": "bh1"}, "logsnr", [20, 40, 80, 160], 3.0),
    ("unipc", {"order": 2, "lower_order_final": False, "corrector": False}, "logsnr", [20, 40, 80, 160], 2.0),
    ("edm", {}, "edm", [10, 20, 40, 80], 2.0),
    ("lms", {"order": 2}, "edm", [40, 80, 160, 320], 2.0),
    ("lms", {"order": 3}, "edm", [40, 80, 160, 320], 3.0),
    ("lms", {"order": 4}, "edm", [80, 160, 320, 640], 4.0),
]


@pytest.mark.parametrize("method,opts,schedule,ladder,order", ORDERS,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for m, o, *_ in ORDERS])
def test_measured_order_against_the_exact_flow(method, opts, schedule, ladder, order):
    sde = sdes.VPSDE()
    target, U, lam, mu = _rotated_gaussian()
    x_T = 1.2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu)
    errs = []
    for n in ladder:
        res = solvers.sample(sde, target.score_fn(sde), x_T.shape, method, n, x_init=x_T, eps=EPS, denoise=False,
                             dtype=torch.float64, schedule=schedule, **opts)
        errs.append(float((res.samples - exact).abs().max()))
    slope = _slope(ladder, errs)
    assert abs(slope - order) < 0.3, (method, opts, slope, errs)


@pytest.mark.parametrize("sde_name", ["subvp", "ve"])
def test_edm_heun_is_second_order_on_other_paths(sde_name):
    """The scaled variable y = x/a makes every path EDM's x0 + sigma eps; sub-VP and VE as well as VP."""
    sde = sdes.get_sde(sde_name)
    target, U, lam, mu = _rotated_gaussian()
    x_T = 1.2 * sde.prior_std * torch.randn(32, 2, generator=torch.Generator().manual_seed(1), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu)
    ladder = [10, 20, 40, 80]
    errs = [float((solvers.sample(sde, target.score_fn(sde), x_T.shape, "edm", n, x_init=x_T, eps=EPS,
                                  denoise=False, dtype=torch.float64, schedule="edm").samples - exact).abs().max())
            for n in ladder]
    assert abs(_slope(ladder, errs) - 2.0) < 0.3, errs


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("schedule,denoise", [("uniform", True), ("logsnr", False), ("edm", True)])
def test_unipc_order_one_without_corrector_is_ddim(prediction, schedule, denoise):
    """UniP-1 is the first-order exponential integrator, i.e. DDIM(eta = 0), in both predictions; with the grid
    ending on the data both end with Tweedie's x0_hat at the last positive node."""
    sde = sdes.VPSDE()
    target = _mixture()
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), **F64)
    kw = dict(x_init=x_T, eps=EPS, denoise=denoise, dtype=torch.float64, schedule=schedule)
    ours = solvers.sample(sde, target.score_fn(sde), x_T.shape, "unipc", 12, order=1, corrector=False,
                          prediction=prediction, **kw)
    ddim = solvers.sample(sde, target.score_fn(sde), x_T.shape, "ddim", 12, **kw)
    assert ours.nfe == ddim.nfe == 12
    assert torch.allclose(ours.samples, ddim.samples, rtol=0, atol=1e-12), (ours.samples - ddim.samples).abs().max()


POINT_MASS_CASES = [("unipc", {"order": o, "prediction": p}) for o in (1, 2, 3) for p in ("data", "noise")] + \
                   [("unipc", {"order": 3, "variant": "bh1", "lower_order_final": False})] + \
                   [("lms", {"order": k}) for k in (1, 2, 3, 4)] + \
                   [("edm", {})]


@pytest.mark.parametrize("method,opts", POINT_MASS_CASES,
                         ids=[f"{m}-{'-'.join(str(v) for v in o.values())}" for m, o in POINT_MASS_CASES])
def test_exact_for_a_point_mass(method, opts):
    """For p_0 = delta(x0): x0_hat = x0 everywhere and the flow is x_t = a_t x0 + sigma_t eps with eps constant, so
    eps_hat = dy/dsigma~ is constant along it.  Exponential integrators (UniPC, data or noise), Adams–Bashforth in
    sigma~ (LMS) and Heun (EDM) integrate a constant exactly: one step or many, to eps or onto x0.  (1e-9: a derivative
    evaluated at sigma~(eps) ~ 0.01 after a step from sigma~(T) ~ 150 sees the rounding of y ~ 150 amplified
    1e4-fold.)"""
    sde = sdes.VPSDE()
    x0 = torch.tensor([0.7, -0.2], **F64)
    score = targets.PointMass(x0).score_fn(sde)
    x_T = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), **F64)
    a_T, s_T = sde.marginal_coeffs(1.0)
    a_e, s_e = sde.marginal_coeffs(EPS)
    flow = a_e * x0 + s_e * (x_T - a_T * x0) / s_T
    for n in (1, 7):
        res = solvers.sample(sde, score, (6, 2), method, n, x_init=x_T, denoise=False, dtype=torch.float64, eps=EPS,
                             schedule="logsnr", **opts)
        assert torch.allclose(res.samples, flow, rtol=0, atol=1e-9), (n, (res.samples - flow).abs().max())
        res = solvers.sample(sde, score, (6, 2), method, n, x_init=x_T, dtype=torch.float64, **opts)
        assert torch.allclose(res.samples, x0.expand(6, 2), rtol=0, atol=1e-9), (n, res.samples)
    assert solvers.sample(sde, score, (6, 2), method, 1, x_init=x_T, dtype=torch.float64, **opts).nfe == 1


# ------------------------------------------------------------------------------------------------ NFE, callback
@pytest.mark.parametrize("method,opts,calls", [
    ("unipc", {"order": 3}, lambda n, d: n), ("unipc", {"corrector": False}, lambda n, d: n),
    ("lms", {}, lambda n, d: n),
    ("edm", {}, lambda n, d: 2 * n - 1 if d else 2 * n),        # Algorithm 1: no correction on the step to 0
    ("edm", {"S_churn": 5.0}, lambda n, d: 2 * n - 1 if d else 2 * n)])
@pytest.mark.parametrize("denoise", [True, False])
def test_nfe_is_exact_and_callback_sees_every_step(method, opts, calls, denoise):
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.0, 1.0], 0.5)
    count, seen = [0], []

    def counted(x, t):
        count[0] += 1
        return target.score_fn(sde)(x, t)

    res = solvers.sample(sde, counted, (8, 2), method, 25, callback=lambda info: seen.append(info["t"]),
                         denoise=denoise, eps=1e-3, generator=torch.Generator().manual_seed(0), **opts)
    info = solvers.get_sampler(method)
    assert info.lands_on_data and info.calls_per_step(opts) == (2 if method == "edm" else 1)
    assert res.nfe == count[0] == calls(25, denoise) == solvers.get_sampler(method).nfe(25, opts, denoise)
    assert len(seen) == 25 and all(a > b for a, b in zip(seen, seen[1:]))
    assert seen[-1] == (0.0 if denoise else pytest.approx(1e-3, abs=1e-15))


# ------------------------------------------------------------------------------------------------ diffusers
def _exact_discrete_model(sde, target, abar, output):
    """An exact eps- or x0-model of ``target`` on the VP path, as a discrete-time model with diffusers' levels:
    fn(x, index) evaluates at the log-SNR of the (fractional) training level ``index``."""
    a_tab, s_tab = torch.sqrt(abar), torch.sqrt(1 - abar)
    lam_tab = torch.log(a_tab) - torch.log(s_tab)
    score = target.score_fn(sde)

    def fn(x, idx):
        idx = idx.to(torch.float64)
        j = torch.clamp(idx.floor().long(), 0, len(abar) - 2)
        lam = lam_tab[j] + (idx - j) * (lam_tab[j + 1] - lam_tab[j])
        t = sde.t_from_log_snr(lam)
        a, s = sde.marginal_coeffs(t)
        sc = score(x, t)
        return -s[:, None] * sc if output == "eps" else (x + s[:, None] ** 2 * sc) / a[:, None]
    return fn, Model(fn, output, discrete=(a_tab, s_tab))


# (solver_order, model output, UniPC prediction, B(h), our schedule, denoise, corrector, lower_order_final)
DIFFUSERS_CASES = [
    (2, "eps", "data", "bh2", "trailing", True, True, True),
    (3, "x0", "data", "bh2", "trailing", True, True, True),
    (3, "eps", "data", "bh2", "leading", True, False, True),
    (1, "eps", "data", "bh2", "linspace", True, True, True),
    (3, "eps", "data", "bh2", "linspace", False, True, False),
    (2, "eps", "noise", "bh2", "trailing", False, True, True),
    (3, "x0", "noise", "bh1", "leading", False, True, False),
    (2, "eps", "data", "bh1", "trailing", False, True, True),
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("order,output,prediction,variant,schedule,denoise,corrector,lof", DIFFUSERS_CASES)
def test_unipc_matches_diffusers(order, output, prediction, variant, schedule, denoise, corrector, lof):
    """Same exact model, same nodes (diffusers' timesteps set to our grid's levels; its sigma table recomputed in
    float64 from the same alphas_cumprod), same x_T: diffusers' scheduler loop and ours agree to 1e-10 in float64
    (measured: 2e-15 to 4e-14).  diffusers keeps its sigmas in float32 by default: left
    that way (its own trailing timesteps, float32 sigmas) the difference is 4e-7 to 1e-6: that rounding.
    diffusers' final_sigmas_type='zero' is a grid ending on the data; its bh1 and noise-prediction branches give
    nan on that step (0 * inf), so those run to a positive last level (denoise=False)."""
    diffusers = pytest.importorskip("diffusers")
    n = 10
    kind = {"eps": "epsilon", "x0": "sample"}[output]
    sched = diffusers.UniPCMultistepScheduler(
        solver_order=order, prediction_type=kind, predict_x0=prediction == "data", solver_type=variant,
        lower_order_final=lof, disable_corrector=[] if corrector else list(range(n)), thresholding=False,
        timestep_spacing=schedule, final_sigmas_type="zero" if denoise else "sigma_min")
    abar = sched.alphas_cumprod.to(torch.float64)
    sde = sdes.VPSDE()
    target = _mixture()
    fn, model = _exact_discrete_model(sde, target, abar, output)
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(5), **F64)
    ours = solvers.sample(sde, model, x_T.shape, "unipc", n, x_init=x_T, schedule=schedule, denoise=denoise,
                          dtype=torch.float64, order=order, prediction=prediction, variant=variant,
                          corrector=corrector, lower_order_final=lof)
    t_pos = ours.timesteps[ours.timesteps > 0]
    idx = model.fractional_index(sde.log_snr(t_pos))
    levels = idx.round().long()
    assert torch.allclose(idx, levels.to(torch.float64), atol=1e-6)
    calls = levels if denoise else levels[:-1]                  # the nodes where the model is called
    sched.set_timesteps(n)
    if schedule == "trailing" and denoise:                      # diffusers' own trailing spacing is ours
        assert torch.equal(sched.timesteps, calls)
    sig = torch.sqrt((1 - abar[levels]) / abar[levels])         # diffusers' sigma = sqrt((1 - abar)/abar)
    sched.timesteps = calls.clone()
    sched.sigmas = torch.cat([sig, sig.new_zeros(1)]) if denoise else sig
    sched.num_inference_steps = len(calls)
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(fn(x, torch.full((x.shape[0],), float(t), **F64)), t, x).prev_sample
    assert ours.nfe == len(calls) == n
    assert torch.isfinite(x).all()
    assert torch.allclose(ours.samples, x, rtol=0, atol=1e-10), (ours.samples - x).abs().max()


# ------------------------------------------------------------------------------------------------ k-diffusion
@pytest.mark.parametrize("schedule,denoise", [("edm", True), ("logsnr", False), ("uniform", True)])
@pytest.mark.parametrize("method", ["edm", "lms"])
def test_edm_heun_and_lms_match_k_diffusion(method, schedule, denoise):
    """k-diffusion integrates EDM's x = x0 + sigma eps; ours runs on VP and converts (y = x/a, sigma~ = sigma/a).
    Fed the exact denoiser of the target and the same sigma~ nodes, Heun agrees to 1e-12 and LMS to 1e-10 (measured:
    2e-15 to 2.5e-14; k-diffusion integrates the Lagrange polynomials with scipy's quad at epsrel=1e-4, but its
    21-point Gauss–Kronrod rule is exact for cubics, as is our Gauss–Legendre rule)."""
    kd = _k_diffusion_sampling()
    sde = sdes.VPSDE()
    target = _mixture()
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(7), **F64)
    n = 12
    ours = solvers.sample(sde, target.score_fn(sde), x_T.shape, method, n, x_init=x_T, eps=EPS, denoise=denoise,
                          dtype=torch.float64, schedule=schedule)
    a, s = sde.marginal_coeffs(ours.timesteps)
    r = s / a                                                       # k-diffusion's sigmas
    D = _karras_denoiser(target)
    if method == "edm":
        y = kd.sample_heun(D, x_T / a[0], r, disable=True)
    else:
        y = kd.sample_lms(D, x_T / a[0], r, disable=True, order=4)
    x = a[-1] * y
    tol = 1e-12 if method == "edm" else 1e-10
    assert torch.allclose(ours.samples, x, rtol=0, atol=tol), (ours.samples - x).abs().max()


# ------------------------------------------------------------------------------------------------ stochastic EDM
def test_edm_stochastic_lands_on_a_2d_mixture():
    """Algorithm 2 with churn: mixture weight within 5 binomial standard errors, each mode's mean within 5 standard
    errors (+ 0.01 for the other mode's tail), and the churn really adds noise (samples differ from Algorithm 1's)."""
    sde = sdes.VPSDE()
    mix = _mixture()
    n = 20_000
    gen = torch.Generator().manual_seed(2)
    a_T, s_T = sde.marginal_coeffs(sde.T)
    x_T = a_T * mix.sample(n, generator=gen) + s_T * torch.randn(n, 2, generator=gen, **F64)
    res = solvers.sample(sde, mix.score_fn(sde), x_T.shape, "edm", 40, generator=gen, x_init=x_T, schedule="edm",
                         dtype=torch.float64, S_churn=20.0, S_tmin=0.01, S_tmax=50.0)
    det = solvers.sample(sde, mix.score_fn(sde), x_T[:100].shape, "edm", 40, x_init=x_T[:100], schedule="edm",
                         dtype=torch.float64)
    assert (res.samples[:100] - det.samples).abs().max() > 1e-2
    x = res.samples
    right = x[:, 0] > 0
    w = right.double().mean()
    assert abs(float(w) - 0.7) < 5 * math.sqrt(0.21 / n), float(w)
    for sel, mu, var in ((right, [2.0, 1.0], [0.5, 0.5]), (~right, [-2.0, 0.0], [0.3, 0.2])):
        m = x[sel].mean(0)
        se = torch.sqrt(torch.tensor(var, **F64) / int(sel.sum()))
        assert ((m - torch.tensor(mu, **F64)).abs() < 5 * se + 0.01).all(), (m, mu)
    assert solvers.get_sampler("edm").stochastic({"S_churn": 20.0})
    assert not solvers.get_sampler("edm").stochastic({})


# ------------------------------------------------------------------------------------------------ bad options
@pytest.mark.parametrize("method,opts,match", [
    ("unipc", {"order": 0}, "order"), ("unipc", {"order": 4}, "order"), ("unipc", {"order": 2.5}, "order"),
    ("unipc", {"order": True}, "order"), ("unipc", {"prediction": "v"}, "prediction"),
    ("unipc", {"variant": "bh3"}, "variant"), ("unipc", {"corrector": "yes"}, "corrector"),
    ("unipc", {"lower_order_final": 1}, "lower_order_final"), ("unipc", {"predict_x0": True}, "unknown option"),
    ("lms", {"order": 0}, "order"), ("lms", {"order": 5}, "order"), ("lms", {"order": "4"}, "order"),
    ("edm", {"S_churn": -1.0}, "S_churn"), ("edm", {"S_churn": float("inf")}, "S_churn"),
    ("edm", {"S_tmin": 2.0, "S_tmax": 1.0}, "S_tmin"), ("edm", {"S_tmin": -1.0}, "S_tmin"),
    ("edm", {"S_noise": -0.5}, "S_noise"), ("edm", {"s_churn": 1.0}, "unknown option"),
])
def test_bad_options_raise(method, opts, match):
    sde = sdes.VPSDE()
    score = targets.Gaussian([0.0, 0.0], 1.0).score_fn(sde)
    with pytest.raises(ValueError, match=match):
        solvers.sample(sde, score, (4, 2), method, 5, **opts)
