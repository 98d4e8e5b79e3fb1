"""The adaptive SDE solver (Gotta Go Fast) and the torchsde backend, with exact scores, against closed forms.

* Both land on a 1-D Gaussian (moments) and a 2-D two-mode mixture (mode weights and means) within 5 standard errors.
* adaptive_sde: a tighter tolerance costs more calls; the NFE is exactly 2 per attempt (+1 for the final Tweedie jump);
  the rejection memory splits a Brownian increment by the exact Brownian bridge.
* torchsde with ``euler`` is Euler–Maruyama written out: given the same generator it equals our ``euler_maruyama``
  sampler to 1e-10 in float64; each torchsde method's declared calls per step are the measured ones.
* Seeded runs reproduce; bad options raise ValueError.
"""
import math

import pytest
import torch

import solvers
from sde_diffusion import sdes, targets

F64 = torch.float64
N = 20_000


def _exact_prior(sde, dist, n, gen):
    """x_T ~ p_T exactly (a x0 + sigma z): the prior mismatch at T stays out of the comparison."""
    a, s = sde.marginal_coeffs(sde.T)
    x0 = dist.sample(n, generator=gen)
    return float(a) * x0 + float(s) * torch.randn(x0.shape, generator=gen, dtype=F64)


def _sample(dist, method, steps=1, n=N, seed=0, **opts):
    sde = sdes.VPSDE()
    gen = torch.Generator().manual_seed(seed)
    x_T = _exact_prior(sde, dist, n, gen)
    return solvers.sample(sde, dist.score_fn(sde), x_T.shape, method, steps, generator=gen, x_init=x_T,
                          dtype=F64, **opts)


def _assert_gaussian_1d(x, mean, var, n_se=5.0):
    n = x.shape[0]
    m, v = float(x.mean()), float(x.var())
    assert abs(m - mean) < n_se * math.sqrt(var / n), (m, mean)
    assert abs(v - var) < n_se * var * math.sqrt(2.0 / (n - 1)), (v, var)     # var(s^2) = 2 sigma^4 / (n - 1)


MIX = targets.GaussianMixture([0.3, 0.7], [[-1.0, 0.0], [1.0, 0.5]], [0.2 ** 2, 0.2 ** 2])


def _assert_mixture(x, mix=MIX, n_se=5.0):
    """Mode weights within 5 s.e. sqrt(w (1 - w) / n); each mode's mean within 5 s.e. (the modes are 10 std apart, so
    nearest-mean labels are exact up to ~1e-20)."""
    n = x.shape[0]
    labels = torch.cdist(x, mix.means).argmin(1)
    for k in range(mix.num_components):
        w = float(mix.weights[k])
        w_hat = float((labels == k).double().mean())
        assert abs(w_hat - w) < n_se * math.sqrt(w * (1 - w) / n), (k, w_hat, w)
        xk = x[labels == k]
        sd = torch.sqrt(torch.diagonal(mix.covs[k]) / xk.shape[0])
        assert ((xk.mean(0) - mix.means[k]).abs() < n_se * sd).all(), (k, xk.mean(0), mix.means[k])


GAUSS_1D = targets.Gaussian(torch.tensor([0.5]), torch.tensor([[0.3]]))


# ================================================================================================ adaptive_sde
def test_adaptive_sde_registered():
    info = solvers.get_sampler("adaptive_sde")
    assert info.kind == "adaptive" and info.stochastic() and not info.fixed_steps()
    assert {"eps_abs", "eps_rel", "theta", "r", "h_init"} <= set(info.options)
    assert info.defaults["eps_abs"] == 0.0078 and info.defaults["eps_rel"] == 0.05


def test_adaptive_sde_lands_on_gaussian_1d():
    res = _sample(GAUSS_1D, "adaptive_sde")
    _assert_gaussian_1d(res.samples[:, 0], 0.5, 0.3)
    assert res.nfe == 2 * (res.stats["accepted"] + res.stats["rejected"]) + 1     # + the Tweedie jump at eps


def test_adaptive_sde_lands_on_mixture_2d():
    res = _sample(MIX, "adaptive_sde", n=10_000)
    _assert_mixture(res.samples)


def test_adaptive_sde_tighter_tolerance_costs_more_calls():
    nfes = []
    for tol in (0.2, 0.05, 0.01):
        res = _sample(GAUSS_1D, "adaptive_sde", n=500, eps_rel=tol, eps_abs=tol / 10, denoise=False)
        st = res.stats
        assert res.nfe == 2 * (st["accepted"] + st["rejected"])                 # 2 calls per attempt
        assert st["accepted"] >= 1
        nfes.append(res.nfe)
    assert nfes[0] < nfes[1] < nfes[2], nfes


def test_adaptive_sde_rejection_memory_is_a_brownian_bridge():
    """A rejected increment dW over h is kept: retrying with h/3 takes dW_a from the bridge (mean dW/3, variance
    h (1/3)(2/3)) and the rest sums back to dW exactly."""
    from solvers.adaptive_sde import _BrownianQueue

    class Ctx:
        gen = torch.Generator().manual_seed(3)

        def noise(self, x):
            return torch.randn(x.shape, generator=self.gen, dtype=x.dtype)

    like = torch.zeros(200_000, dtype=F64)
    q = _BrownianQueue(Ctx(), like)
    h = 0.3
    dW, used = q.take(h)
    assert abs(float(dW.var()) - h) < 5 * h * math.sqrt(2 / like.numel())
    q.give_back(used)
    a, _ = q.take(h / 3)
    b, _ = q.take(2 * h / 3)
    torch.testing.assert_close(a + b, dW, rtol=0, atol=1e-14)
    resid = a - dW / 3
    v = h * (1 / 3) * (2 / 3)
    assert abs(float(resid.mean())) < 5 * math.sqrt(v / like.numel())
    assert abs(float(resid.var()) - v) < 5 * v * math.sqrt(2 / like.numel())
    assert abs(float((resid * dW).mean())) < 5 * math.sqrt(v * h / like.numel())     # independent of dW
    c, _ = q.take(h)                                   # past the memory: a fresh increment
    assert abs(float(c.var()) - h) < 5 * h * math.sqrt(2 / like.numel())


def test_adaptive_sde_reproducible():
    a = _sample(GAUSS_1D, "adaptive_sde", n=200, seed=5, eps_rel=0.1)
    b = _sample(GAUSS_1D, "adaptive_sde", n=200, seed=5, eps_rel=0.1)
    c = _sample(GAUSS_1D, "adaptive_sde", n=200, seed=6, eps_rel=0.1)
    assert torch.equal(a.samples, b.samples) and a.nfe == b.nfe
    assert not torch.equal(a.samples, c.samples)


@pytest.mark.parametrize("opts", [{"eps_rel": -0.1}, {"eps_abs": -1.0}, {"eps_rel": 0.0, "eps_abs": 0.0},
                                  {"theta": 0.0}, {"theta": 1.5}, {"r": 0.0}, {"h_init": 0.0},
                                  {"h_init": float("nan")}, {"max_steps": 0}, {"bogus": 1}])
def test_adaptive_sde_bad_options(opts):
    with pytest.raises(ValueError):
        _sample(GAUSS_1D, "adaptive_sde", n=4, **opts)


def test_adaptive_sde_max_steps():
    with pytest.raises(RuntimeError, match="max_steps"):
        _sample(GAUSS_1D, "adaptive_sde", n=4, max_steps=3)


# ================================================================================================ torchsde
def test_torchsde_euler_equals_euler_maruyama():
    """Same generator, same draws: torchsde's Euler step y + f ds + g dW on s = -t is our EM step to rounding."""
    dist = targets.Gaussian(torch.tensor([0.5, -0.2]), torch.tensor([[0.3, 0.1], [0.1, 0.2]]))
    for steps, schedule in ((30, "uniform"), (20, "edm")):
        a = _sample(dist, "euler_maruyama", steps, n=500, seed=2, schedule=schedule)
        b = _sample(dist, "torchsde", steps, n=500, seed=2, schedule=schedule, sde_method="euler")
        assert a.nfe == b.nfe == steps
        torch.testing.assert_close(b.samples, a.samples, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["euler", "milstein", "srk", "reversible_heun", "midpoint", "heun",
                                    "euler_heun"])
def test_torchsde_calls_per_step(method):
    info = solvers.get_sampler("torchsde")
    nfe = [_sample(GAUSS_1D, "torchsde", k, n=8, sde_method=method, denoise=False).nfe for k in (6, 7)]
    assert nfe[1] - nfe[0] == info.calls_per_step({"sde_method": method})


def test_torchsde_srk_lands_on_gaussian_1d():
    res = _sample(GAUSS_1D, "torchsde", 100, sde_method="srk", schedule="logsnr")
    _assert_gaussian_1d(res.samples[:, 0], 0.5, 0.3)


def test_torchsde_srk_lands_on_mixture_2d():
    res = _sample(MIX, "torchsde", 100, n=10_000, sde_method="srk", schedule="logsnr")
    _assert_mixture(res.samples)


def test_torchsde_reversible_heun_lands_on_gaussian_1d():
    """(On the two-mode mixture reversible Heun is still biased at 1000 steps — mode weight 0.37 for 0.3: its
    leapfrog-like recursion is not stable on the contracting reverse drift near the data.)"""
    res = _sample(GAUSS_1D, "torchsde", 200, sde_method="reversible_heun", schedule="logsnr")
    _assert_gaussian_1d(res.samples[:, 0], 0.5, 0.3)


def test_torchsde_reproducible():
    a = _sample(GAUSS_1D, "torchsde", 10, n=100, seed=5, sde_method="srk")
    b = _sample(GAUSS_1D, "torchsde", 10, n=100, seed=5, sde_method="srk")
    c = _sample(GAUSS_1D, "torchsde", 10, n=100, seed=6, sde_method="srk")
    assert torch.equal(a.samples, b.samples)
    assert not torch.equal(a.samples, c.samples)


def test_torchsde_bad_options():
    with pytest.raises(ValueError, match="sde_method"):
        _sample(GAUSS_1D, "torchsde", 5, n=4, sde_method="rk4")
    with pytest.raises(ValueError):
        _sample(GAUSS_1D, "torchsde", 5, n=4, dt=0.1)
