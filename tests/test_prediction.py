"""The solvers-v2 contract: Gaussian paths (closed-form inverse log-SNR, derivatives, drift and diffusion derived from
(a, sigma)), the prediction object's conversions between model outputs, and discrete-time models sampled at their own
noise levels."""
import pytest
import torch

import solvers
from sde_diffusion import networks, sdes, targets
from sde_diffusion.prediction import Model
from sde_diffusion.sdes import SDE

F64 = dict(dtype=torch.float64)
ALL = [sdes.VPSDE(), sdes.SubVPSDE(), sdes.VESDE(), sdes.OUSDE(), sdes.BrownianSDE()]


def _times(sde, n=9):
    return torch.linspace(1e-4, 0.999 * sde.T, n, **F64)


@pytest.mark.parametrize("sde", ALL, ids=lambda s: type(s).__name__)
def test_path_closed_forms_against_generic_definitions(sde):
    """Closed-form t(lambda), a', sigma' against the base class's bisection and autograd; drift and diffusion derived
    from the path against each SDE's own f and g (written independently, from the SDE's definition)."""
    t = _times(sde)
    lam = sde.log_snr(t)
    assert (lam[1:] < lam[:-1]).all()
    a, s = sde.marginal_coeffs(t)
    assert torch.allclose(lam, torch.log(a / s), rtol=1e-12, atol=1e-12)
    assert torch.allclose(sde.t_from_log_snr(lam), t, rtol=1e-10, atol=1e-13)
    assert torch.allclose(SDE.t_from_log_snr(sde, lam), t, rtol=1e-10, atol=1e-13)
    for closed, generic in zip(sde.marginal_coeffs_dt(t), SDE.marginal_coeffs_dt(sde, t)):
        assert torch.allclose(closed, generic, rtol=1e-9, atol=1e-12)
    # central differences as a third, independent check of the derivatives
    h = 1e-5 * t                                   # relative steps: sigma ~ sqrt(t) is steep near 0
    (ap, sp), (am, sm) = sde.marginal_coeffs(t + h), sde.marginal_coeffs(t - h)
    da, ds = sde.marginal_coeffs_dt(t)
    assert torch.allclose(da, (ap - am) / (2 * h), rtol=1e-6, atol=1e-9)
    assert torch.allclose(ds, (sp - sm) / (2 * h), rtol=1e-6, atol=1e-9)
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(0), **F64)
    assert torch.allclose(sde.drift_from_path(x, t), sde.drift(x, t), rtol=1e-10, atol=1e-12)
    assert torch.allclose(sde.diffusion_from_path(t), sde.diffusion(t), rtol=1e-8, atol=1e-10)


def test_a_path_defined_by_a_and_sigma_alone_gets_drift_diffusion_and_every_sampler():
    """A subclass that defines only (a, sigma) — here VP's, written again — gets f, g, derivatives and t(lambda) from
    the base class, and samples its target as VP does."""
    vp = sdes.VPSDE()

    class PathOnly(SDE):
        T, prior_std = 1.0, 1.0

        def marginal_coeffs(self, t):
            return vp.marginal_coeffs(t)

    p = PathOnly()
    t = _times(p)
    assert torch.allclose(p.drift(torch.ones(9, 1, **F64), t)[:, 0], -0.5 * vp.beta(t), rtol=1e-8)
    assert torch.allclose(p.diffusion(t), vp.diffusion(t), rtol=1e-7)
    target = targets.Gaussian([1.0, -0.5], [[0.5, 0.1], [0.1, 0.2]])
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3), **F64)
    for method in ("ddim", "ode"):
        a = solvers.sample(p, target.score_fn(vp), (64, 2), method, 20, x_init=x_T, dtype=torch.float64,
                           schedule="logsnr").samples
        b = solvers.sample(vp, target.score_fn(vp), (64, 2), method, 20, x_init=x_T, dtype=torch.float64,
                           schedule="logsnr").samples
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-8), method


def _truth(sde, target, x, t):
    """Exact score, x0_hat, eps_hat at (x, t) from the target's exact score (Tweedie)."""
    score = target.score_fn(sde)(x, t)
    a, s = (v[:, None] for v in sde.marginal_coeffs(t))
    return score, (x + s ** 2 * score) / a, -s * score


@pytest.mark.parametrize("sde", ALL[:3], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("output", ["score", "eps", "x0", "v", "velocity"])
def test_every_model_output_converts_to_the_same_prediction(sde, output):
    """A model declaring any output, fed the exact answer in that output, yields the exact score, x0_hat, eps_hat and
    the probability-flow velocity f - 1/2 g^2 score (computed from the SDE's own f and g)."""
    target = targets.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.5]], 0.3)
    gen = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(16, 2, generator=gen, **F64)
    t = 0.05 + 0.9 * torch.rand(16, generator=gen, **F64)
    score, x0, eps = _truth(sde, target, x, t)
    a, s = (v[:, None] for v in sde.marginal_coeffs(t))
    da, ds = (v[:, None] for v in sde.marginal_coeffs_dt(t))
    r = torch.sqrt(a ** 2 + s ** 2)
    native = {"score": score, "eps": eps, "x0": x0, "v": (a * eps - s * x0) / r, "velocity": da * x0 + ds * eps}
    pred = Model(lambda y, tt: native[output], output).predict(sde, x, t)
    flow = sde.drift(x, t) - 0.5 * sde.diffusion(t)[:, None] ** 2 * score
    for got, want in ((pred.score, score), (pred.x0, x0), (pred.eps, eps), (pred.velocity, flow)):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-9)


def test_bad_model_declarations_are_refused():
    with pytest.raises(ValueError, match="unknown model output"):
        Model(lambda x, t: x, "noise")
    with pytest.raises(ValueError, match="increasing noise"):
        Model(lambda x, t: x, "eps", discrete=([0.9, 0.99], [0.4, 0.1]))
    with pytest.raises(ValueError, match="must return x's shape"):
        solvers.sample(sdes.VPSDE(), Model(lambda x, t: x[:, :1], "eps"), (4, 2), "ddim", 3)
    with pytest.raises(ValueError, match="continuous-time"):
        solvers.sample(sdes.VPSDE(), lambda x, t: -x, (4, 2), "ddim", 3, schedule="trailing")


def _discrete_exact_eps_model(sde, target, seen):
    """A stand-in for a perfectly trained DDPM network: fed level i (as the network time t_i = i T / (N - 1)), it
    returns the exact eps of the target at the *discrete* noise level sqrt(1 - abar_i)."""
    abar = sde.alphas_cumprod
    scale = sde.T / (sde.N - 1)

    def fn(x, t_in):
        seen.append(t_in.clone())
        i = t_in / scale
        frac = i - i.floor()
        lo = i.floor().long().clamp(0, sde.N - 1)
        hi = (lo + 1).clamp(max=sde.N - 1)
        ab = torch.exp((1 - frac) * torch.log(abar[lo]) + frac * torch.log(abar[hi]))   # only used off the nodes
        a, s = ab.sqrt()[:, None], (1 - ab).sqrt()[:, None]
        mean, cov = target.mean, target.cov
        # exact eps of N(mean, cov) noised to N(a mean, a^2 cov + s^2 I): eps = -s * score
        prec = torch.linalg.inv(a[:, :, None] ** 2 * cov + s[:, :, None] ** 2 * torch.eye(2, **F64))
        score = -torch.einsum("bij,bj->bi", prec, x - a * mean)
        return -s * score
    return Model(fn, "eps", discrete=(abar.sqrt(), (1 - abar).sqrt()), model_time=lambda idx: idx * scale)


@pytest.mark.parametrize("schedule", ["linspace", "leading", "trailing"])
def test_discrete_model_is_sampled_at_its_own_levels(schedule):
    """At the discrete schedules' nodes the network sees integer levels, and its eps is converted with that level's
    sigma: sampling the discrete stand-in equals sampling the exact continuous score on the same grid (the grid's
    node t_i has exactly the level's (a_i, sigma_i)); the nodes are diffusers' timestep spacings."""
    sde = sdes.VPSDE()
    target = targets.Gaussian([0.5, -1.0], [[1e-3, 0.0], [0.0, 0.5]])
    seen = []
    model = _discrete_exact_eps_model(sde, target, seen)
    x_T = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), **F64)
    n = 50
    res = solvers.sample(sde, model, x_T.shape, "ddim", n, x_init=x_T, dtype=torch.float64, schedule=schedule)
    ref = solvers.sample(sde, target.score_fn(sde), x_T.shape, "ddim", n, x_init=x_T, dtype=torch.float64,
                         schedule=res.timesteps[:-1])              # the same grid, given explicitly
    assert torch.equal(res.timesteps, ref.timesteps)
    assert torch.allclose(res.samples, ref.samples, rtol=1e-9, atol=1e-9)
    levels = torch.stack([s[0] for s in seen]) / (sde.T / (sde.N - 1))
    assert torch.allclose(levels, levels.round(), atol=1e-6)
    N = sde.N
    want = {"linspace": torch.linspace(N - 1, 0, n).round(),
            "leading": torch.arange(n - 1, -1, -1) * (N // n),
            "trailing": torch.round(N - torch.arange(n) * (N / n)) - 1}[schedule]
    assert torch.equal(levels.round().long(), want.long())


def test_discrete_network_from_get_model_uses_the_discrete_sigma():
    """networks.get_model reads a DDPM-loss network as discrete: at the level-i node its score is -eps / sqrt(1 -
    abar_i), not -eps / sigma(t_i) of the continuous path (the two differ by 0.707 at i = 1)."""
    from sde_diffusion import configs
    cfg = configs.apply_overrides(configs.get_config("toy_2d"), {"training.loss": "ddpm"})
    net = networks.get_network(cfg)
    sde = configs.build_sde(cfg)
    model = networks.get_model(sde, net)
    assert model.is_discrete
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    for i in (1, 10, 500):
        abar = sde.alphas_cumprod[i]
        t = sde.t_from_log_snr(0.5 * torch.log(abar / (1 - abar)))
        with torch.no_grad():
            pred = model.predict(sde, x, t)
            eps = net(x, torch.full((4,), i * sde.T / (sde.N - 1)))
        assert torch.allclose(pred.score, -eps / torch.sqrt(1 - abar).float(), rtol=1e-4, atol=1e-6)


def test_config_sampling_options_reach_the_sampler_and_unknown_ones_are_refused():
    """``--config.sampling.options.K=V`` passes a sampler's and its schedule's own options (here DPM-Solver's order
    and the edm grid's rho) through ``generate``: the samples equal a direct ``solvers.sample`` call with them and
    differ from the defaults'; a misspelt option is one error naming what is accepted, never dropped."""
    from sde_diffusion import configs
    from sde_diffusion.run.sampling import SamplingError, generate, sampler_options
    base = ["sampling.method=dpm_solver", "sampling.schedule=edm", "sampling.num_steps=6", "sampling.num_samples=5",
            "sampling.batch_size=5", "sampling.seed=3"]
    cfg = configs.apply_overrides(configs.get_config("toy_2d"),
                                  base + ["sampling.options.order=3", "sampling.options.rho=5.0"])
    assert sampler_options(cfg) == {"order": 3, "rho": 5.0}
    torch.manual_seed(0)
    net = networks.get_network(cfg)
    sde = configs.build_sde(cfg)
    out = generate(cfg, sde, net)
    assert out["nfe"] == 6
    with torch.no_grad():
        direct = solvers.sample(sde, networks.get_model(sde, net), (5, 2), "dpm_solver", 6,
                                generator=torch.Generator().manual_seed(3), eps=float(cfg.sampling.eps),
                                schedule="edm", order=3, rho=5.0).samples
        default = solvers.sample(sde, networks.get_model(sde, net), (5, 2), "dpm_solver", 6,
                                 generator=torch.Generator().manual_seed(3), eps=float(cfg.sampling.eps),
                                 schedule="edm").samples
    from sde_diffusion.data import get_data_inverse_scaler
    inv = get_data_inverse_scaler(cfg)
    assert torch.allclose(out["samples"], inv(direct), atol=1e-6)
    assert not torch.allclose(out["samples"], inv(default), atol=1e-4)
    bad = configs.apply_overrides(configs.get_config("toy_2d"), base + ["sampling.options.ordr=3"])
    with pytest.raises(SamplingError, match=r"sampling.options \['ordr'\] not accepted by method 'dpm_solver'.*order"):
        sampler_options(bad)
    with pytest.raises(configs.ConfigError, match="unknown config key 'sampling.optoins.order'"):
        configs.apply_overrides(configs.get_config("toy_2d"), ["sampling.optoins.order=3"])
