"""Losses against mathematics: with the exact score of a Gaussian target the DSM / DDPM / SMLD losses equal their
analytic minima within Monte Carlo error, and any perturbation of the score raises them.

Target N(mu, c^2 I) in D dims, x_t = a x0 + sigma z.  With v = a^2 c^2 + sigma^2 the exact score is
-(x - a mu) / v and  E|| sigma s* + z ||^2 = D a^2 c^2 / v  (so the uniform-weighted minimum at time t);
the likelihood weighting multiplies by g^2 / sigma^2.
"""
import math

import pytest
import torch
from scipy.integrate import quad

from sde_diffusion import configs, losses, targets
from sde_diffusion.sdes import SubVPSDE, VESDE, VPSDE

MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
C = 0.6
D = 2
N = 200_000


def uniform_min(sde, t):
    a, s = (float(v) for v in sde.marginal_coeffs(torch.tensor(t, dtype=torch.float64)))
    return D * a * a * C * C / (a * a * C * C + s * s)


def likelihood_min(sde, t):
    tt = torch.tensor(t, dtype=torch.float64)
    s = float(sde.marginal_coeffs(tt)[1])
    return float(sde.diffusion(tt)) ** 2 / s ** 2 * uniform_min(sde, t)


def analytic(fn, sde, eps):
    val, _ = quad(lambda t: fn(sde, t), eps, sde.T, limit=200, points=[eps * 10, eps * 100])
    return val / (sde.T - eps)


def draw(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = targets.Gaussian(MU, C ** 2).sample(n, generator=g)
    return x0, g


@pytest.mark.parametrize("sde,weighting,eps", [
    (VPSDE(), "uniform", 1e-5), (SubVPSDE(), "uniform", 1e-5), (VESDE(), "uniform", 1e-5),
    (VPSDE(), "likelihood", 1e-2), (VESDE(), "likelihood", 1e-2)])
def test_dsm_loss_with_exact_score_equals_analytic_minimum(sde, weighting, eps):
    x0, g = draw()
    score = targets.Gaussian(MU, C ** 2).score_fn(sde)
    per = losses.dsm_loss(sde, score, x0, eps=eps, weighting=weighting, reduce="sum", generator=g)
    fn = uniform_min if weighting == "uniform" else likelihood_min
    want = analytic(fn, sde, eps)
    se = float(per.std()) / math.sqrt(N)
    assert abs(float(per.mean()) - want) < 4 * se + 1e-9, (float(per.mean()), want, se)
    # mean reduction divides by the dimension
    per_mean = losses.dsm_loss(sde, score, x0[:1000], eps=eps, weighting=weighting, reduce="mean",
                               generator=torch.Generator().manual_seed(3))
    per_sum = losses.dsm_loss(sde, score, x0[:1000], eps=eps, weighting=weighting, reduce="sum",
                              generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(per_mean * D, per_sum)


@pytest.mark.parametrize("weighting", ["uniform", "likelihood"])
@pytest.mark.parametrize("perturb", [
    lambda s, x, t: 1.1 * s,                                 # wrong scale
    lambda s, x, t: s + 0.05,                                # constant shift
    lambda s, x, t: s + 0.2 * torch.sin(3 * x),              # x-dependent error
])
def test_any_perturbation_of_the_score_raises_the_loss(weighting, perturb):
    sde = VPSDE()
    x0, _ = draw(50_000, seed=1)
    exact = targets.Gaussian(MU, C ** 2).score_fn(sde)
    t = 1e-2 + (1 - 1e-2) * torch.rand(x0.shape[0], generator=torch.Generator().manual_seed(5), dtype=x0.dtype)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6), dtype=x0.dtype)
    base = losses.dsm_loss(sde, exact, x0, weighting=weighting, t=t, z=z)
    worse = losses.dsm_loss(sde, lambda x, tt: perturb(exact(x, tt), x, tt), x0, weighting=weighting, t=t, z=z)
    diff = worse - base                                       # common random numbers: paired difference
    assert float(diff.mean()) > 4 * float(diff.std()) / math.sqrt(diff.numel())


def _gaussian_noise_fn(a_of, var_of):
    """eps* = std * (x - a mu) / v: the exact noise prediction for the Gaussian target."""
    def noise_fn(x, t, std):
        a, std_t = a_of(t)[:, None], torch.as_tensor(std, dtype=x.dtype)[:, None]
        v = a ** 2 * C ** 2 + std_t ** 2
        return std_t * (x - a * MU) / v
    return noise_fn


def test_ddpm_loss_with_exact_noise_equals_analytic_minimum():
    sde = VPSDE(N=1000)
    abar = sde.alphas_cumprod
    idx_of = lambda t: torch.round(t * (sde.N - 1)).long()
    noise_fn = _gaussian_noise_fn(lambda t: abar[idx_of(t)].sqrt(), None)
    x0, g = draw()
    per = losses.ddpm_loss(sde, noise_fn, x0, reduce="sum", generator=g)
    want = float((D * abar * C ** 2 / (abar * C ** 2 + 1 - abar)).mean())
    se = float(per.std()) / math.sqrt(N)
    assert abs(float(per.mean()) - want) < 4 * se
    worse = losses.ddpm_loss(sde, lambda x, t, s: noise_fn(x, t, s) * 1.1, x0, reduce="sum",
                             generator=torch.Generator().manual_seed(0))
    assert float(worse.mean()) > want + 4 * se


def test_smld_loss_with_exact_noise_equals_analytic_minimum():
    sde = VESDE(N=1000)
    noise_fn = _gaussian_noise_fn(lambda t: torch.ones_like(t), None)
    x0, g = draw()
    per = losses.smld_loss(sde, noise_fn, x0, reduce="sum", generator=g)
    s2 = sde.discrete_sigmas ** 2
    want = float((D * C ** 2 / (C ** 2 + s2)).mean())
    se = float(per.std()) / math.sqrt(N)
    assert abs(float(per.mean()) - want) < 4 * se


def test_discrete_losses_check_the_sde():
    x0 = torch.randn(4, 2)
    with pytest.raises(ValueError, match="VP"):
        losses.ddpm_loss(VESDE(), lambda x, t, s: x, x0)
    with pytest.raises(ValueError, match="VE"):
        losses.smld_loss(VPSDE(), lambda x, t, s: x, x0)
    with pytest.raises(ValueError, match="weighting"):
        losses.dsm_loss(VPSDE(), lambda x, t: x, x0, weighting="nope")
    with pytest.raises(ValueError, match="reduce"):
        losses.dsm_loss(VPSDE(), lambda x, t: x, x0, reduce="max")


class _Recorder(torch.nn.Module):
    parameterization = "noise"

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.labels = []

    def forward(self, x, t, y=None):
        self.labels.append(None if y is None else y.clone())
        return x * self.w


@pytest.mark.parametrize("kind", ["dsm", "ddpm"])
def test_get_loss_fn_drops_labels_with_p_uncond(kind):
    c = configs.get_config("toy_2d")
    configs.apply_overrides(c, {"model.num_classes": 5, "training.p_uncond": 0.3, "training.loss": kind})
    loss_fn = losses.get_loss_fn(c, configs.build_sde(c))
    model = _Recorder()
    y = torch.randint(0, 5, (20_000,), generator=torch.Generator().manual_seed(0))
    loss = loss_fn(model, torch.randn(20_000, 2), y, train=True, generator=torch.Generator().manual_seed(1))
    assert loss.dim() == 0
    seen = model.labels[-1]
    dropped = seen == 5
    assert abs(float(dropped.float().mean()) - 0.3) < 0.02
    assert torch.equal(seen[~dropped], y[~dropped])
    loss_fn(model, torch.randn(8, 2), y[:8], train=False)        # evaluation never drops labels
    assert torch.equal(model.labels[-1], y[:8])
    loss_fn(model, torch.randn(8, 2), None)                       # no labels -> the null label
    assert (model.labels[-1] == 5).all()
