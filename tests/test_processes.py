"""Processes beyond VP/VE (issue 13): the linear and cosine interpolants and EDM's path as Gaussian paths, every sampler
on each of them with exact models, the model outputs x0 / v / velocity, EDM's preconditioning, and the flow-matching
and EDM losses against their analytic minima."""
import itertools
import math

import pytest
import torch
from scipy import integrate

import solvers
from sde_diffusion import configs, losses, networks, prediction, sdes, targets

F64 = dict(dtype=torch.float64)
PATHS = ["linear", "cosine", "edm"]


# ------------------------------------------------------------------------------------------------ the paths
def _hand_coeffs(name, t):
    """(a, sigma, a', sigma') written out: x_t = (1-t) x0 + t eps; cos/sin(pi t/2); x0 + t eps."""
    if name == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if name == "cosine":
        h = math.pi / 2
        return torch.cos(h * t), torch.sin(h * t), -h * torch.sin(h * t), h * torch.cos(h * t)
    return torch.ones_like(t), t, torch.zeros_like(t), torch.ones_like(t)


@pytest.mark.parametrize("name", PATHS)
def test_path_closed_forms_drift_and_diffusion(name):
    sde = sdes.get_sde(name)
    t = torch.linspace(1e-4, 1, 201, **F64) * sde.T
    a, s, da, ds = _hand_coeffs(name, t)
    a_, s_ = sde.marginal_coeffs(t)
    da_, ds_ = sde.marginal_coeffs_dt(t)
    for u, v in ((a_, a), (s_, s), (da_, da), (ds_, ds)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    # derivatives against central differences, lambda against log(a / sigma), the inverse of lambda
    h = 1e-6 * sde.T
    tc = t[1:-1]
    fd = [(c1 - c0) / (2 * h) for c1, c0 in zip(sde.marginal_coeffs(tc + h), sde.marginal_coeffs(tc - h))]
    torch.testing.assert_close(fd[0], da_[1:-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fd[1], ds_[1:-1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sde.log_snr(t), torch.log(a / s), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sde.t_from_log_snr(sde.log_snr(t)), t, rtol=1e-10, atol=1e-12)
    # drift and diffusion of the base class: f = (a'/a) x, g^2 = d(sigma^2)/dt - 2 (a'/a) sigma^2, written out per path
    x = torch.ones(t.numel(), 1, **F64)
    g2 = {"linear": 2 * t / (1 - t), "cosine": math.pi * torch.tan(math.pi * t / 2), "edm": 2 * t}[name]
    f = {"linear": -1 / (1 - t), "cosine": -math.pi / 2 * torch.tan(math.pi * t / 2), "edm": 0 * t}[name]
    torch.testing.assert_close(sde.drift(x, t).flatten(), f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sde.diffusion(t) ** 2, g2, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(sde.drift(x, t)).all() and torch.isfinite(sde.diffusion(t)).all()   # finite up to T
    assert sde.prior_std == pytest.approx(float(s[-1]), rel=1e-12) and sde.t_min == 0.0


def test_unit_time_interpolants_stop_short_of_the_degenerate_end():
    for name in ("linear", "cosine"):
        sde = sdes.get_sde(name)
        assert sde.T == pytest.approx(0.999)
        assert float(sde.marginal_coeffs(sde.T)[0]) < 2e-3
        with pytest.raises(ValueError, match="t_max"):
            sdes.get_sde(name, t_max=1.0)
    assert sdes.get_sde("edm").T == 80.0 and sdes.get_sde("edm").prior_std == 80.0
    assert {"linear", "cosine", "edm"} <= set(sdes.available_sdes())


# ------------------------------------------------------------------------------------------------ exact models
MIX = targets.GaussianMixture([0.3, 0.7], [[-2.0, 0.0], [2.0, 1.0]], [[[0.3, 0.1], [0.1, 0.2]], 0.5])
MIX_MEAN = torch.tensor([0.3 * -2 + 0.7 * 2, 0.7 * 1.0], **F64)
# P(x_1 > 0): each component's first coordinate is N(mu, var) with var 0.3 / 0.5
MIX_RIGHT = 0.3 * 0.5 * math.erfc(2 / math.sqrt(2 * 0.3)) + 0.7 * 0.5 * math.erfc(-2 / math.sqrt(2 * 0.5))
_m2 = [0.3 * (torch.tensor([[0.3, 0.1], [0.1, 0.2]], **F64) + torch.outer(*(2 * [torch.tensor([-2.0, 0.0], **F64)]))),
       0.7 * (0.5 * torch.eye(2, **F64) + torch.outer(*(2 * [torch.tensor([2.0, 1.0], **F64)])))]
MIX_VAR = torch.diag(_m2[0] + _m2[1]) - MIX_MEAN ** 2


def exact_model(name, sde, target=MIX):
    """linear: the exact velocity u = a' x0_hat + sigma' eps_hat = -(x + t s) / (1 - t) written out from the score;
    cosine: the exact x0 = (x + sigma^2 s) / a (Tweedie); edm: the exact score."""
    score = target.score_fn(sde)
    if name == "linear":
        def velocity(x, t):
            tt = t.reshape(-1, *([1] * (x.dim() - 1)))
            return -(x + tt * score(x, t)) / (1 - tt)
        return prediction.Model(velocity, "velocity")
    if name == "cosine":
        def x0(x, t):
            tt = t.reshape(-1, *([1] * (x.dim() - 1)))
            a, s = torch.cos(math.pi * tt / 2), torch.sin(math.pi * tt / 2)
            return (x + s ** 2 * score(x, t)) / a
        return prediction.Model(x0, "x0")
    return prediction.Model(score, "score")


def _assert_lands_on_mixture(x, n_se=5.0):
    """Weight of the right mode within n_se binomial SEs; mean and per-coordinate variance within n_se SEs (the
    variance's SE from the samples' fourth central moment)."""
    n = x.shape[0]
    w = float((x[:, 0] > 0).double().mean())
    assert abs(w - MIX_RIGHT) < n_se * math.sqrt(MIX_RIGHT * (1 - MIX_RIGHT) / n), (w, MIX_RIGHT)
    assert ((x.mean(0) - MIX_MEAN).abs() < n_se * torch.sqrt(MIX_VAR / n)).all(), (x.mean(0), MIX_MEAN)
    c = x - x.mean(0)
    se_var = torch.sqrt(((c ** 4).mean(0) - (c ** 2).mean(0) ** 2) / n)
    assert ((x.var(0) - MIX_VAR).abs() < n_se * se_var).all(), (x.var(0), MIX_VAR)


def _sample(name, method, steps, n, seed=0, **opts):
    sde = sdes.get_sde(name)
    gen = torch.Generator().manual_seed(seed)
    res = solvers.sample(sde, exact_model(name, sde), (n, 2), method, steps, generator=gen, dtype=torch.float64,
                         schedule="logsnr", **opts)
    return res.samples


# the reverse SDE is stiff near T (rate 1/(1 - t)): the logsnr grid (steps t(1 - t) dlambda near T) serves every
# sampler; first-order methods take 100 steps (ancestral 300: its Gaussian reverse step is biased at 100 on the
# interpolants, 7 % in variance), higher-order ones 30
ALL = list(itertools.product(PATHS, solvers.available()))


def _steps(method):
    return 30 if method in HIGHER_ORDER else 300 if method == "ancestral" else 100
HIGHER_ORDER = ("dpm_solver", "unipc", "lms", "edm", "ode")


@pytest.mark.parametrize("name,method", ALL, ids=[f"{p}-{m}" for p, m in ALL])
def test_every_sampler_samples_every_path(name, method):
    _assert_lands_on_mixture(_sample(name, method, _steps(method), 1000))


@pytest.mark.slow
@pytest.mark.parametrize("name,method", ALL, ids=[f"{p}-{m}" for p, m in ALL])
def test_every_sampler_samples_every_path_4000(name, method):
    _assert_lands_on_mixture(_sample(name, method, _steps(method), 4000, seed=1))


def test_dpm_solver_pp_and_euler_sample_the_same_flow():
    """The exact-velocity linear-interpolant flow: DPM-Solver++(2M) at 20 steps and Euler at 300 (independent prior
    draws) agree in mean and variance within 5 two-sample standard errors, and each is on the target."""
    n = 3000
    a = _sample("linear", "dpm_solver", 20, n, seed=3)
    b = _sample("linear", "ode", 300, n, seed=4, solver="euler")
    for x in (a, b):
        _assert_lands_on_mixture(x)
    se_mean = torch.sqrt((a.var(0) + b.var(0)) / n)
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se_mean).all()
    ca, cb = a - a.mean(0), b - b.mean(0)
    se_var = torch.sqrt(((ca ** 4).mean(0) - a.var(0) ** 2 + (cb ** 4).mean(0) - b.var(0) ** 2) / n)
    assert ((a.var(0) - b.var(0)).abs() < 5 * se_var).all()


# ------------------------------------------------------------------------------------------------ model outputs
class _Exact(torch.nn.Module):
    """A 'network' returning the exact output of ``param`` for a Gaussian target on the path."""

    def __init__(self, sde, target, param):
        super().__init__()
        self.sde, self.target, self.parameterization = sde, target, param
        self.score = target.score_fn(sde)

    def forward(self, x, t, y=None):
        a, s = (c.reshape(-1, 1) for c in self.sde.marginal_coeffs(t.double()))
        da, ds = (c.reshape(-1, 1) for c in self.sde.marginal_coeffs_dt(t.double()))
        sc = self.score(x, t)
        x0, eps = (x + s ** 2 * sc) / a, -s * sc                # Tweedie; eps = -sigma score
        r = torch.sqrt(a ** 2 + s ** 2)
        return {"noise": eps, "score": -eps, "direct": sc, "x0": x0, "v": (a * eps - s * x0) / r,
                "velocity": da * x0 + ds * eps}[self.parameterization]


@pytest.mark.parametrize("param", networks.PARAMETERIZATIONS)
@pytest.mark.parametrize("name", ["linear", "edm"])
def test_every_parameterization_gives_the_exact_score(param, name):
    sde = sdes.get_sde(name)
    g = targets.Gaussian([0.5, -1.0], [[0.4, 0.1], [0.1, 0.3]])
    net = _Exact(sde, g, param)
    model = networks.get_model(sde, net)
    assert model.output == networks.utils.OUTPUT_OF[param]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, generator=gen, **F64)
    t = (0.05 + 0.9 * torch.rand(64, generator=gen, **F64)) * sde.T
    torch.testing.assert_close(model.score_fn(sde)(x, t), g.score_fn(sde)(x, t), rtol=1e-9, atol=1e-9)


def test_discrete_losses_refuse_data_and_velocity_outputs():
    with pytest.raises(ValueError, match="ddpm / smld"):
        networks.get_noise_fn(_Exact(sdes.VPSDE(), targets.Gaussian([0.0], [[1.0]]), "velocity"))


def test_edm_preconditioning_coefficients_and_wrapper():
    sd = 0.5
    sig = torch.logspace(-3, 2, 50, **F64)
    c_skip, c_out, c_in, c_noise = networks.edm_coefficients(sig, sd)
    # Karras et al. 2022, sec. B.6: the network input c_in (x0 + sigma n) and its target (x0 - c_skip y) / c_out have
    # unit variance for data of variance sigma_data^2
    torch.testing.assert_close(c_in ** 2 * (sd ** 2 + sig ** 2), torch.ones_like(sig))
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sig ** 2) / c_out ** 2,
                               torch.ones_like(sig))
    torch.testing.assert_close(c_noise, torch.log(sig) / 4)

    class Probe(torch.nn.Module):      # F returns its input plus its time input: exposes c_in y and c_noise
        def forward(self, x, t, y=None):
            self.seen = (x.clone(), t.clone())
            return torch.full_like(x, 2.0)

    for name in ("edm", "linear"):
        sde = sdes.get_sde(name)
        wrapped = networks.EDMPrecond(Probe(), sde, sigma_data=sd)
        t = torch.tensor([0.1, 0.5, 0.9], **F64) * sde.T
        a, s = sde.marginal_coeffs(t)
        r = s / a                                              # sigma~ = sigma / a (EDM sec. 4)
        x = torch.randn(3, 4, **F64)
        D = wrapped(x, t)
        k = networks.edm_coefficients(r, sd)
        y = x / a[:, None]
        torch.testing.assert_close(D, k[0][:, None] * y + k[1][:, None] * 2.0)          # eq. 7
        torch.testing.assert_close(wrapped.net.seen[0], k[2][:, None] * y)
        torch.testing.assert_close(wrapped.net.seen[1], torch.log(r) / 4)


def test_get_network_wraps_edm_preconditioning_and_validates_it():
    cfg = configs.get_config("edm_digits")
    net = networks.get_network(cfg)
    assert isinstance(net, networks.EDMPrecond) and net.parameterization == "x0" and net.sigma_data == 0.5
    bad = configs.get_config("edm_digits")
    configs.apply_overrides(bad, ["model.parameterization=noise"])
    with pytest.raises(configs.ConfigError, match="parameterization"):
        configs.validate(bad, "train")
    bad = configs.get_config("fm_digits")
    configs.apply_overrides(bad, ["training.P_std=0"])
    with pytest.raises(configs.ConfigError, match="P_std"):
        configs.validate(bad, "train")


# ------------------------------------------------------------------------------------------------ losses
def _gauss_1d(mu=0.7, s2=0.36):
    return targets.Gaussian([mu, -mu], torch.diag(torch.tensor([s2, s2], **F64))), s2


def test_flow_matching_loss_equals_its_analytic_minimum_and_a_perturbation_raises_it():
    """Minimum at the exact velocity: E_t (a' sigma - sigma' a)^2 / sigma^2 Var(x0 | x_t) = E_t s2 / ((1-t)^2 s2 + t^2)
    on the linear path (a' sigma - sigma' a = -1, Var(x0 | x_t) = s2 t^2 / ((1-t)^2 s2 + t^2)), t ~ U(eps, T)."""
    g, s2 = _gauss_1d()
    sde = sdes.get_sde("linear")
    eps = 1e-3
    model = exact_model("linear", sde, g)
    gen = torch.Generator().manual_seed(0)
    x0 = g.sample(40_000, generator=gen)
    t = eps + (sde.T - eps) * torch.rand(x0.shape[0], generator=gen, **F64)
    z = torch.randn(x0.shape, generator=gen, **F64)
    per = losses.fm_loss(sde, model, x0, t=t, z=z)
    expected = integrate.quad(lambda u: s2 / ((1 - u) ** 2 * s2 + u ** 2), eps, sde.T)[0] / (sde.T - eps)
    se = float(per.std()) / math.sqrt(per.numel())
    assert abs(float(per.mean()) - expected) < 5 * se, (float(per.mean()), expected, se)
    # a perturbation delta of the velocity raises the loss by delta^2 (the cross term vanishes in expectation)
    shifted = prediction.Model(lambda x, tt: model.fn(x, tt) + 0.3, "velocity")
    diff = losses.fm_loss(sde, shifted, x0, t=t, z=z) - per
    assert float(diff.mean()) > 0
    assert abs(float(diff.mean()) - 0.09) < 5 * float(diff.std()) / math.sqrt(diff.numel())


def test_ot_coupling_is_the_optimal_permutation():
    gen = torch.Generator().manual_seed(0)
    x0, z = torch.randn(6, 3, generator=gen, **F64), torch.randn(6, 3, generator=gen, **F64)
    zc = losses.ot_coupling(x0, z)
    best = min(float(((x0 - z[list(p)]) ** 2).sum()) for p in itertools.permutations(range(6)))
    assert float(((x0 - zc) ** 2).sum()) == pytest.approx(best, rel=1e-12)
    assert torch.equal(torch.sort(zc, 0).values, torch.sort(z, 0).values)          # the same noise, re-paired


@pytest.mark.parametrize("name,sd", [("edm", 0.6), ("edm", 0.3), ("linear", 0.6)])
def test_edm_loss_equals_its_analytic_minimum_and_a_perturbation_raises_it(name, sd):
    """At the exact denoiser the loss is E_sigma lambda(sigma) Var(x0 | x) = E_sigma (sigma^2 + sd^2) s2 /
    (sd^2 (s2 + sigma^2)) over ln sigma ~ N(-1.2, 1.2^2): exactly 1 when sd^2 = s2 (Karras et al.'s unit loss)."""
    g, s2 = _gauss_1d()
    sde = sdes.get_sde(name)
    score = g.score_fn(sde)

    def x0_fn(x, t):
        a, s = (c.reshape(-1, 1) for c in sde.marginal_coeffs(t))
        return (x + s ** 2 * score(x, t)) / a
    model = prediction.Model(x0_fn, "x0")
    gen = torch.Generator().manual_seed(1)
    n = 40_000
    x0 = g.sample(n, generator=gen)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(n, generator=gen, **F64))
    z = torch.randn(x0.shape, generator=gen, **F64)
    per = losses.edm_loss(sde, model, x0, sigma_data=sd, sigma=sigma, z=z)

    def integrand(u):     # u = ln sigma
        sg2 = math.exp(2 * u)
        return (sg2 + sd ** 2) * s2 / (sd ** 2 * (s2 + sg2)) * math.exp(-0.5 * ((u + 1.2) / 1.2) ** 2) / (
            1.2 * math.sqrt(2 * math.pi))
    expected = integrate.quad(integrand, -12, 10)[0]
    if sd ** 2 == s2:
        assert expected == pytest.approx(1.0, rel=1e-9)
    se = float(per.std()) / math.sqrt(n)
    assert abs(float(per.mean()) - expected) < 5 * se, (float(per.mean()), expected, se)
    shifted = prediction.Model(lambda x, t: x0_fn(x, t) + 0.1, "x0")
    diff = losses.edm_loss(sde, shifted, x0, sigma_data=sd, sigma=sigma, z=z) - per
    assert float(diff.mean()) > 0


def test_loss_registry_builds_every_loss_from_a_config():
    assert set(losses.available_losses()) == {"dsm", "ddpm", "smld", "fm", "edm"}
    for name, extra in (("fm_digits", ["training.fm_ot=true"]), ("edm_digits", []), ("vp_digits", [])):
        cfg = configs.get_config(name)
        configs.apply_overrides(cfg, extra + ["model.nf=8"])
        sde = configs.build_sde(cfg)
        net = networks.get_network(cfg)
        loss = losses.get_loss_fn(cfg, sde)(net, torch.rand(4, 1, 8, 8) * 2 - 1,
                                             generator=torch.Generator().manual_seed(0))
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
    cfg = configs.get_config("fm_digits")
    configs.apply_overrides(cfg, ["training.loss=nope"])
    with pytest.raises(ValueError, match="available: ddpm, dsm, edm, fm, smld"):
        losses.get_loss_fn(cfg, configs.build_sde(cfg))


# ------------------------------------------------------------------------------------------------ configs end to end
@pytest.mark.slow
def test_fm_digits_trains_and_samples_through_the_cli(tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=root)
    wd = str(tmp_path / "fm")
    common = ["--workdir", wd]
    train = ["--mode", "train", "--config", "fm_digits", "--config.training.n_iters=3",
             "--config.training.batch_size=8",
             "--config.training.checkpoint_freq=3", "--config.training.snapshot_freq=0", "--config.training.fm_ot=true",
             "--config.model.nf=8"]
    for args in (train, ["--mode", "sample", "--config.sampling.num_steps=3", "--config.sampling.num_samples=4",
                         "--config.sampling.batch_size=4"]):
        proc = subprocess.run([sys.executable, os.path.join(root, "main.py"), *args, *common], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    x = np.load(os.path.join(wd, "samples", "step_00000003", "samples.npz"))["samples"]
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


@pytest.mark.parametrize("name,evaluate", [("fm_digits", False), ("edm_digits", False),
                                           pytest.param("edm_digits", True, marks=pytest.mark.slow)])
def test_digits_configs_train_and_sample(tmp_path, name, evaluate):
    import numpy as np

    from sde_diffusion.run import train as train_lib
    from sde_diffusion.run.sampling import sample
    c = configs.apply_overrides(configs.get_config(name), {
        "training.n_iters": 3, "training.batch_size": 8, "training.checkpoint_freq": 3, "training.snapshot_freq": 0,
        "training.progress": False, "model.nf": 8, "sampling.num_steps": 3, "sampling.num_samples": 4,
        "sampling.batch_size": 4, "eval.enable_bpd": False, "eval.num_generated": 4})
    wd = str(tmp_path)
    out = train_lib.train(c, wd, device="cpu")
    assert out["step"] == 3 and np.isfinite(out["loss"])
    x = np.load(sample(c, wd, device="cpu")["npz"])["samples"]
    assert x.shape == (4, 1, 8, 8) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    if evaluate:
        from sde_diffusion.run.evaluate import evaluate as run_eval
        assert np.isfinite(run_eval(c, wd, device="cpu")["test_loss"])
