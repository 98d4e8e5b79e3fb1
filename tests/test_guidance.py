"""Classifier-free and classifier guidance against exact answers.

* A Gaussian mixture whose classes are its components: the conditional score is component k's diffused score, the
  exact classifier is the posterior p(k | x_t) (closed form).  CFG with w = 1 is the conditional score; CFG with any w
  is classifier guidance with the exact posterior at scale w (Bayes); guidance with scale 1 samples the component.
* Sharpening, measured: for a Gaussian conditional N(mu_c, S_c) and a Gaussian unconditional N(mu_u, S_u), the guided
  score s_u + w (s_c - s_u) is linear in x, so the reverse SDE and the probability-flow ODE driven by it are linear and
  their laws at t = eps follow from the mean / Lyapunov ODEs (integrated here by scipy).  The samplers must land on
  those laws; both are sharper than the conditional for w > 1, and *not* equal to the tilted density
  p(x)^(1-w) p(x | y)^w that the guided score describes at each t (the ODE sharpens far more than the SDE).
"""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import solvers
from sde_diffusion import sdes, targets
from sde_diffusion.guidance import cfg_score, cfg_score_batched, classifier_score

F64 = torch.float64
SDES = {"vp": lambda: sdes.VPSDE(), "ve": lambda: sdes.VESDE(sigma_min=0.01, sigma_max=50.0)}

# three classes; class 2 is rare (weight 0.1) and overlaps class 0 a little
MIX = targets.GaussianMixture([0.5, 0.4, 0.1], [[-1.0, 0.0], [2.0, 1.0], [0.5, -2.5]],
                              [[[0.3, 0.1], [0.1, 0.2]], 0.25, [0.2, 0.3]])


def mixture_log_posterior(mix, sde):
    """(x, t, y) -> log p(y | x_t) = log w_y + log N_y,t(x) - log p_t(x), from the targets' exact log-densities."""
    comps = [mix.component(k).marginal_log_prob(sde) for k in range(mix.num_components)]
    marginal = mix.marginal_log_prob(sde)

    def fn(x, t, y):
        logp = torch.stack([c(x, t) for c in comps], dim=1) + torch.log(mix.weights.to(x))[None]
        return logp.gather(1, y.reshape(-1, 1))[:, 0] - marginal(x, t)
    return fn


def random_state(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.5 * torch.randn(n, 2, generator=g, dtype=F64)
    t = 1e-3 + (1 - 1e-3) * torch.rand(n, generator=g, dtype=F64)
    return x, t


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_cfg_with_w1_is_the_exact_conditional_score(sde_name):
    sde = SDES[sde_name]()
    x, t = random_state(500)
    for k in range(MIX.num_components):
        cond = MIX.component(k).score_fn(sde)
        guided = cfg_score(cond, MIX.score_fn(sde), 1.0)
        torch.testing.assert_close(guided(x, t), cond(x, t), rtol=1e-12, atol=1e-12)
    # and w = 0 is the unconditional score
    torch.testing.assert_close(cfg_score(cond, MIX.score_fn(sde), 0.0)(x, t), MIX.score_fn(sde)(x, t),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("w", [0.5, 1.0, 2.0, 5.0])
def test_cfg_is_classifier_guidance_with_the_exact_posterior(sde_name, w):
    """s(x) + w (s(x | k) - s(x)) = s(x) + w grad log p(k | x_t)  (Bayes), with autograd's gradient of the posterior."""
    sde = SDES[sde_name]()
    x, t = random_state(400, seed=1)
    k = 2
    cfg = cfg_score(MIX.component(k).score_fn(sde), MIX.score_fn(sde), w)(x, t)
    cg = classifier_score(MIX.score_fn(sde), mixture_log_posterior(MIX, sde), k, w)
    with torch.no_grad():                                           # callers sample under no_grad
        out = cg(x, t)
    assert not out.requires_grad
    torch.testing.assert_close(out, cfg, rtol=1e-9, atol=1e-9)
    with torch.inference_mode():
        out = cg(x, t)
    torch.testing.assert_close(out, cfg, rtol=1e-9, atol=1e-9)
    # per-sample labels
    y = torch.tensor([k] * 400)
    torch.testing.assert_close(classifier_score(MIX.score_fn(sde), mixture_log_posterior(MIX, sde), y, w)(x, t), cfg,
                               rtol=1e-9, atol=1e-9)


def test_cfg_batched_matches_cfg_on_a_label_model():
    """A 'class-conditional model' that returns component scores for labels < K and the mixture's for the null label."""
    sde = sdes.VPSDE()
    K = MIX.num_components
    fns = [MIX.component(k).score_fn(sde) for k in range(K)] + [MIX.score_fn(sde)]
    calls = []

    def label_score_fn(x, t, labels):
        calls.append(x.shape[0])
        out = torch.empty_like(x)
        for lab in labels.unique().tolist():
            sel = labels == lab
            out[sel] = fns[lab](x[sel], t[sel])
        return out

    x, t = random_state(300, seed=2)
    y = torch.randint(0, K, (300,), generator=torch.Generator().manual_seed(0))
    got = cfg_score_batched(label_score_fn, y, null_label=K, w=3.0)(x, t)
    assert calls == [600]                                           # one batched call
    want = torch.stack([cfg_score(fns[int(y[i])], fns[K], 3.0)(x[i:i + 1], t[i:i + 1])[0] for i in range(300)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def nearest_component(x, means):
    return torch.cdist(x, means.to(x)).argmin(1)


@pytest.mark.parametrize("sde_name,method,opts", [("vp", "pc", {}), ("ve", "ode", {"solver": "heun"})])
def test_classifier_guidance_with_exact_posterior_samples_the_chosen_component(sde_name, method, opts):
    sde = SDES[sde_name]()
    k = 2
    score = classifier_score(MIX.score_fn(sde), mixture_log_posterior(MIX, sde), k, 1.0)
    g = torch.Generator().manual_seed(0)
    x = solvers.sample(sde, score, (2000, 2), method, 100, generator=g, dtype=F64, **opts).samples
    frac = float((nearest_component(x, MIX.means) == k).to(F64).mean())
    assert frac >= 0.99, frac
    # the guided samples have component k's moments
    comp = MIX.component(k)
    assert (x.mean(0) - comp.mean).abs().max() < 4.5 * math.sqrt(0.3 / 2000) + 0.02
    torch.testing.assert_close(torch.cov(x.T), comp.cov, rtol=0, atol=0.05)


def test_guidance_scale_moves_mass_toward_the_chosen_mode_of_overlapping_components():
    """Two overlapping 1-D components N(-0.5, 1), N(+0.5, 1): at scale 1 the fraction of samples nearer to the chosen
    mode is exactly Phi(0.5) = 0.691 (the component's own mass); larger scales move mass toward the chosen mode."""
    sde = sdes.VPSDE()
    mix = targets.GaussianMixture([0.5, 0.5], [[-0.5], [0.5]], 1.0)
    n = 4000
    fracs = {}
    for scale in (1.0, 3.0):
        score = classifier_score(mix.score_fn(sde), mixture_log_posterior(mix, sde), 1, scale)
        g = torch.Generator().manual_seed(0)
        x = solvers.sample(sde, score, (n, 1), "pc", 100, generator=g, dtype=F64).samples
        fracs[scale] = float((x[:, 0] > 0).to(F64).mean())
    exact = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
    assert abs(fracs[1.0] - exact) < 4.5 * math.sqrt(exact * (1 - exact) / n) + 0.01, fracs
    assert fracs[3.0] > fracs[1.0] + 0.1, fracs


# ---------------------------------------------------------------------- sharpening on Gaussians, in closed form
MU_U, S_U = np.zeros(2), np.array([[2.0, 0.6], [0.6, 1.5]])
MU_C, S_C = np.array([1.0, -0.5]), np.array([[0.5, 0.2], [0.2, 0.3]])


def guided_gaussian_law(sde, w, eps, probability_flow):
    """(mean, cov) at t = eps of the reverse SDE (or probability-flow ODE) driven by s_u + w (s_c - s_u), started at
    the prior N(0, prior_std^2 I) at T.  With s = -Lam (x - m), reverse time tau = T - t, k = 1 (SDE) or 1/2 (ODE):
        dmu/dtau = A mu + k g^2 Lam m,   dP/dtau = A P + P A^T + [SDE] g^2 I,   A = -f I - k g^2 Lam."""
    I = np.eye(2)
    k = 0.5 if probability_flow else 1.0

    def rhs(t, y):
        tt = torch.tensor(t, dtype=F64)
        a, s = (float(v) for v in sde.marginal_coeffs(tt))
        f = float(sde.drift(torch.ones(1, 1, dtype=F64), tt))      # the SDEs here have drift f(t) x
        g2 = float(sde.diffusion(tt)) ** 2
        Pc, Pu = np.linalg.inv(a * a * S_C + s * s * I), np.linalg.inv(a * a * S_U + s * s * I)
        lam = w * Pc + (1 - w) * Pu
        lam_m = w * Pc @ (a * MU_C) + (1 - w) * Pu @ (a * MU_U)
        mu, P = y[:2], y[2:].reshape(2, 2)
        A = -f * I - k * g2 * lam
        dP = A @ P + P @ A.T + (0.0 if probability_flow else g2) * I
        return -np.concatenate([A @ mu + k * g2 * lam_m, dP.ravel()])   # d/dt = -d/dtau

    y0 = np.concatenate([np.zeros(2), (sde.prior_std ** 2 * I).ravel()])
    sol = solve_ivp(rhs, (sde.T, eps), y0, method="DOP853", rtol=1e-10, atol=1e-12)
    assert sol.success
    return sol.y[:2, -1], sol.y[2:, -1].reshape(2, 2)


def tilted_gaussian(w):
    """p(x)^(1-w) p(x | y)^w at t = 0 (the naive 'theory'): precision w P_c + (1 - w) P_u."""
    Pc, Pu = np.linalg.inv(S_C), np.linalg.inv(S_U)
    cov = np.linalg.inv(w * Pc + (1 - w) * Pu)
    return cov @ (w * Pc @ MU_C + (1 - w) * Pu @ MU_U), cov


@pytest.mark.parametrize("w", [2.0, 4.0])
@pytest.mark.parametrize("method,opts,pf", [("pc", {"corrector": "none"}, False), ("ode", {"solver": "heun"}, True)])
def test_cfg_sharpening_matches_the_closed_form_law(w, method, opts, pf):
    sde = sdes.VPSDE()
    eps = 1e-3
    un, co = targets.Gaussian(MU_U, S_U), targets.Gaussian(MU_C, S_C)
    score = cfg_score(co.score_fn(sde), un.score_fn(sde), w)
    n = 4000
    g = torch.Generator().manual_seed(0)
    x = solvers.sample(sde, score, (n, 2), method, 200, generator=g, dtype=F64, eps=eps, denoise=False,
                       **opts).samples.numpy()
    mean, cov = guided_gaussian_law(sde, w, eps, pf)
    # whitened sample moments within 4.5 standard errors (+ 3 % for the 200-step discretisation)
    L_inv = np.linalg.inv(np.linalg.cholesky(cov))
    z = (x - mean) @ L_inv.T
    assert np.abs(z.mean(0)).max() < 4.5 / math.sqrt(n) + 0.03, z.mean(0)
    assert np.abs(np.cov(z.T) - np.eye(2)).max() < 4.5 * math.sqrt(2 / n) + 0.03, np.cov(z.T)
    # sharper than the conditional (S_C - cov positive definite), and not the tilted Gaussian: sharper still
    assert np.linalg.eigvalsh(S_C - cov).min() > 0
    _, tilted_cov = tilted_gaussian(w)
    assert np.linalg.eigvalsh(tilted_cov - cov).min() > 0
    assert np.linalg.det(np.cov(x.T)) < 0.8 * np.linalg.det(tilted_cov)
