"""Inpainting and colourisation against exact conditional Gaussians.

A correlated Gaussian row of 6 "pixels" (AR(1) correlation 0.9) with a 2-pixel hole: the missing pixels given the known
ones are N(mu_u + S_uk S_kk^-1 (x_k - mu_k), S_uu - S_uk S_kk^-1 S_ku).  Samples are whitened with that exact answer;
their mean and covariance must be those of N(0, I) within sample-size tolerances (4.5 standard errors) plus a small
allowance for the time discretisation (``gaussian_errors``).  Colourisation: a 3-channel x 2-pixel Gaussian given its
grey image, checked in the orthogonal grey/colour basis.
"""
import math

import pytest
import torch

import solvers
from sde_diffusion import sdes, targets
from sde_diffusion.inpainting import Colorize, Inpaint, grey_basis, to_grey

F64 = torch.float64
D = 6
RHO = 0.9
MU = torch.linspace(-1.0, 1.0, D, dtype=F64)
SCALES = torch.tensor([1.0, 0.8, 1.2, 1.0, 0.7, 1.1], dtype=F64)
IDX = torch.arange(D)
COV = SCALES[:, None] * SCALES[None] * RHO ** (IDX[:, None] - IDX[None]).abs().to(F64)
MASK = torch.tensor([1, 1, 0, 0, 1, 1], dtype=F64)            # the hole: pixels 2 and 3
X_KNOWN = torch.tensor([0.3, 0.9, 0.0, 0.0, 0.2, -0.4], dtype=F64)

# VE with sigma_max = 100: the prior N(0, sigma_max^2) misses p_T(x | y) by |mean| / sigma_max ~ 1 % of a standard
# deviation, which the deterministic ODE carries to t = 0 (it would be 2 % with sigma_max = 50).
SDES = {"vp": lambda: sdes.VPSDE(), "ve": lambda: sdes.VESDE(sigma_min=0.01, sigma_max=100.0)}
METHODS = {"pc": dict(method="pc"), "ode": dict(method="ode", solver="heun")}


def conditional_gaussian(mu, cov, known, mask):
    """Exact law of the coordinates where mask = 0 given the others: (mean, cov)."""
    k, u = mask.bool(), ~mask.bool()
    gain = torch.linalg.solve(cov[k][:, k], cov[k][:, u]).T         # S_uk S_kk^-1
    return mu[u] + gain @ (known[k] - mu[k]), cov[u][:, u] - gain @ cov[k][:, u]


MEAN_ALLOWANCE, COV_ALLOWANCE = 0.02, 0.06


def gaussian_errors(x, mean, cov):
    """Whiten x: (n, d) with the exact (mean, cov); return the largest deviations of its mean from 0 and of its
    covariance from I, each divided by (4.5 standard errors + allowance): both must be < 1.  The allowance covers
    the samplers' time discretisation (measured with n = 40000 on this row: pc on VE is the worst, +5 % covariance at
    100 steps, +2 % at 200; the Heun ODE is within 1 %)."""
    n, d = x.shape
    w = (x - mean) @ torch.linalg.inv(torch.linalg.cholesky(cov)).T
    c = torch.cov(w.T)
    se_cov = torch.full_like(c, 1.0 / math.sqrt(n))                  # std of a whitened sample covariance entry
    se_cov.diagonal().fill_(math.sqrt(2.0 / n))
    err_mean = float((w.mean(0).abs() / (4.5 / math.sqrt(n) + MEAN_ALLOWANCE)).max())
    err_cov = float(((c - torch.eye(d, dtype=x.dtype)).abs() / (4.5 * se_cov + COV_ALLOWANCE)).max())
    return err_mean, err_cov


def sample(sde, score_fn, constraint, shape, steps, method, seed=0, **opts):
    g = torch.Generator().manual_seed(seed)
    r = solvers.sample(sde, score_fn, shape, method, steps, generator=g, dtype=F64, constraint=constraint, **opts)
    return constraint.finalize(r.samples)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_inpainting_recovers_exact_conditional_gaussian(sde_name, method):
    sde = SDES[sde_name]()
    target = targets.Gaussian(MU, COV)
    inpaint = Inpaint(sde, X_KNOWN, MASK)
    n = 2000
    x = sample(sde, inpaint.conditional_score(target.score_fn(sde)), inpaint, (n, D), 100, **METHODS[method])
    assert torch.equal(x[:, MASK.bool()], X_KNOWN[MASK.bool()].expand(n, -1))     # known pixels kept exactly
    mean, cov = conditional_gaussian(MU, COV, X_KNOWN, MASK)
    err_mean, err_cov = gaussian_errors(x[:, ~MASK.bool()], mean, cov)
    assert err_mean < 1 and err_cov < 1, (err_mean, err_cov)


def test_replacement_alone_is_exact_for_independent_pixels_but_biased_for_correlated_ones():
    """The replacement constraint without the conditional score: exact when the hole is independent of the known
    pixels (block-diagonal covariance), far off on the correlated row (the documented bias)."""
    sde = sdes.VPSDE()
    inpaint = Inpaint(sde, X_KNOWN, MASK)
    n = 2000
    block = COV * (MASK[:, None] == MASK[None]).to(F64)             # no correlation between hole and known pixels
    for cov, biased in [(block, False), (COV, True)]:
        target = targets.Gaussian(MU, cov)
        x = sample(sde, target.score_fn(sde), inpaint, (n, D), 100, method="ode", solver="heun")
        err_mean, err_cov = gaussian_errors(x[:, ~MASK.bool()], *conditional_gaussian(MU, cov, X_KNOWN, MASK))
        if biased:
            assert err_mean > 5, err_mean
        else:
            assert err_mean < 1 and err_cov < 1, (err_mean, err_cov)


def test_constraint_noises_known_pixels_like_the_forward_process():
    """During sampling the known pixels are fresh draws of N(a(t) x0, sigma(t)^2)."""
    sde = sdes.VESDE(sigma_min=0.01, sigma_max=10.0)
    inpaint = Inpaint(sde, X_KNOWN, MASK)
    x = torch.zeros(20000, D, dtype=F64)
    t = torch.tensor(0.4, dtype=F64)
    g = torch.Generator().manual_seed(0)
    y = inpaint(x, t, g)
    a, s = (float(v) for v in sde.marginal_coeffs(t))
    k = MASK.bool()
    assert torch.equal(y[:, ~k], x[:, ~k])
    z = (y[:, k] - a * X_KNOWN[k]) / s
    assert z.mean(0).abs().max() < 4.5 / math.sqrt(20000)
    assert (z.var(0) - 1).abs().max() < 4.5 * math.sqrt(2 / 20000)
    assert not torch.equal(inpaint(x, t, g), y)                     # fresh noise at every call


@pytest.mark.parametrize("covariance", ["tweedie", "isotropic"])
def test_conditional_score_under_no_grad_and_shapes(covariance):
    sde = sdes.VPSDE()
    target = targets.Gaussian(torch.zeros(12, dtype=F64), 0.5 * torch.eye(12, dtype=F64))
    mask = torch.zeros(1, 3, 2, 2, dtype=F64)
    mask[..., 0, :] = 1
    inpaint = Inpaint(sde, torch.ones(1, 3, 2, 2, dtype=F64), mask)
    fn = inpaint.conditional_score(target.score_fn(sde), covariance=covariance, data_var=0.5)
    x = torch.randn(5, 3, 2, 2, dtype=F64)
    t = torch.full((5,), 0.3, dtype=F64)
    with torch.inference_mode():
        s = fn(x, t)
    assert s.shape == x.shape and not s.requires_grad and torch.isfinite(s).all()
    # isotropic data N(0, 0.5 I): both covariances are exact; pixels are independent, so the free pixels keep the
    # unconditional score and the observed ones get -(x - a x0) / sigma^2
    a, sig = (float(v) for v in sde.marginal_coeffs(torch.tensor(0.3, dtype=F64)))
    want = target.score_fn(sde)(x, t)
    want = torch.where(mask.bool(), -(x - a * 1.0) / sig ** 2, want)
    torch.testing.assert_close(s, want, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------- colourisation
P = 2                                                               # pixels
CH_COV = torch.tensor([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.0]], dtype=F64) \
    * torch.outer(torch.tensor([1.0, 0.8, 0.6], dtype=F64), torch.tensor([1.0, 0.8, 0.6], dtype=F64))
PIX_COV = torch.tensor([[1.0, 0.7], [0.7, 1.0]], dtype=F64)
COL_COV = torch.kron(CH_COV, PIX_COV)                               # x flattened as (channel, pixel)
COL_MU = torch.tensor([0.5, 0.5, -0.2, -0.2, 0.1, 0.3], dtype=F64)


def test_grey_basis_is_orthogonal_with_grey_first_row():
    Q = grey_basis()
    torch.testing.assert_close(Q @ Q.T, torch.eye(3, dtype=F64))
    torch.testing.assert_close(Q[0], torch.full((3,), 1 / math.sqrt(3), dtype=F64))
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    c = Colorize.from_color(sdes.VPSDE(), x)
    torch.testing.assert_close(c.inverse(c.transform(x)), x)
    torch.testing.assert_close(c.transform(x)[:, :1], math.sqrt(3) * to_grey(x))


@pytest.mark.parametrize("sde_name,method", [("vp", "pc"), ("ve", "ode")])
def test_colourisation_recovers_exact_colour_given_grey(sde_name, method):
    sde = SDES[sde_name]()
    target = targets.Gaussian(COL_MU, COL_COV)
    x_ref = target.sample(1, torch.Generator().manual_seed(3)).reshape(1, 3, P)
    grey = to_grey(x_ref)
    colorize = Colorize(sde, grey)
    n = 2000
    x = sample(sde, colorize.conditional_score(target.score_fn(sde)), colorize, (n, 3, P), 100, **METHODS[method])
    torch.testing.assert_close(to_grey(x), grey.expand(n, 1, P), rtol=0, atol=1e-12)   # grey kept exactly
    # exact answer in the basis z = (Q kron I) x: the colour coordinates z[P:] given the grey ones z[:P]
    Qf = torch.kron(grey_basis(), torch.eye(P, dtype=F64))
    z_mu, z_cov = Qf @ COL_MU, Qf @ COL_COV @ Qf.T
    z_obs = torch.cat([math.sqrt(3) * grey.reshape(P), torch.zeros(2 * P, dtype=F64)])
    z_mask = torch.cat([torch.ones(P), torch.zeros(2 * P)]).to(F64)
    mean, cov = conditional_gaussian(z_mu, z_cov, z_obs, z_mask)
    z = x.reshape(n, 3 * P) @ Qf.T
    err_mean, err_cov = gaussian_errors(z[:, P:], mean, cov)
    assert err_mean < 1 and err_cov < 1, (err_mean, err_cov)


def test_conditional_score_with_per_sample_masks_matches_one_sample_at_a_time():
    """Different masks (and numbers of observed pixels, none included) in one batch: the padded batched solve agrees
    with each sample done alone."""
    sde = sdes.VPSDE()
    target = targets.Gaussian(MU, COV)
    masks = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 0, 1, 0, 0], [0] * 6, [1, 0, 1, 0, 1, 0]], dtype=F64)
    known = torch.randn(4, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    x = torch.randn(4, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.7, 0.05], dtype=F64)
    batched = Inpaint(sde, known, masks).conditional_score(target.score_fn(sde))(x, t)
    for i in range(4):
        alone = Inpaint(sde, known[i:i + 1], masks[i:i + 1]).conditional_score(target.score_fn(sde))(x[i:i + 1],
                                                                                                 t[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(batched[2:3], target.score_fn(sde)(x[2:3], t[2:3]))   # nothing observed
