"""Variational bounds on the negative log-likelihood: DDPM's discrete bound and the continuous-time bound.

Both are upper bounds (in nats, and bits/dim) on -log p(x0) of a generative model built from a trained network;
together with the probability-flow NLL (``sde_diffusion.likelihood``) they are the three likelihoods the field
reports, and here all three can be computed for the same model.

**The discrete bound** (Ho et al. 2020, eq. 5; Sohl-Dickstein et al. 2015).  On a VP SDE's DDPM chain of N levels
(``sdes.VPSDE``: level i has abar_i = ``alphas_cumprod[i]``), or on any increasing subset S_1 < ... < S_K of them
(Improved DDPM's strided chain, Nichol & Dhariwal 2021, sec. 4: beta_k = 1 - abar_{S_k} / abar_{S_{k-1}}), the model
is p(x_{S_K}) = N(0, I), reverse kernels p(x_{S_{k-1}} | x_{S_k}) = N(mu_theta, Sigma) and a decoder p(x0 | x_{S_1}):

    -log p(x0) <= L_T + sum_{k=2}^{K} L_{k-1} + L_0,
    L_T     = KL(q(x_{S_K} | x0) || N(0, I)),
    L_{k-1} = E_q KL(q(x_{S_{k-1}} | x_{S_k}, x0) || p(x_{S_{k-1}} | x_{S_k})),
    L_0     = E_q [-log p(x0 | x_{S_1})].

q(x_s | x_t, x0) = N(c0 x0 + ct x_t, beta-tilde) is Gaussian (Ho et al., eq. 6-7), and mu_theta is the same mean with
x0 replaced by the model's x0_hat(x_t) (equivalently eq. 11 with eps_hat).  Each KL is between Gaussians, in closed
form; the expectation over x_t ~ q(x_t | x0) is a single draw per term (an unbiased estimate of each term, as
Improved DDPM's ``calc_bpd_loop``).  The reverse variance Sigma is one of

* ``beta``       beta_k (DDPM's sigma_t^2 = beta_t),
* ``posterior``  beta-tilde_k = (1 - abar_{k-1}) / (1 - abar_k) beta_k (DDPM's other choice),
* ``learned``    exp(v log beta_k + (1 - v) log beta-tilde_k) with the network's v (Nichol & Dhariwal 2021, eq. 15;
                 ``prediction.Model(learned_variance=True)``); on a strided chain the same v interpolates between the
                 strided betas (their sec. 4),

and one network call serves all of them (they share the mean).  The decoder has mean x0_hat(x_{S_1}) and variance
beta_1 = 1 - abar_{S_1} (``beta``), beta-tilde_2 (``posterior``: beta-tilde_1 = 0, clipped to the next step's as in
Improved DDPM) or their interpolation (``learned``); it is

* ``discretized``  Ho et al.'s discretised Gaussian (eq. 13) over the L levels lo + (hi - lo) k / (L - 1): each
                   level gets the Gaussian's mass on its bin of half-width (hi - lo) / (2 (L - 1)), the end bins
                   reaching to -inf / +inf, so the probabilities of the L levels sum to 1 and the bound is a bound on
                   the codelength of discrete data (comparable with dequantised bits/dim);
* ``gaussian``     the continuous density N(x0; x0_hat, Sigma): a bound on -log of a density (continuous data).

**The continuous-time bound** (Kingma et al. 2021, VDM, eq. 17 with their eq. 11-13; the likelihood-weighted DSM
bound of Song et al. 2021b, Thm. 1, in the form with a prior term and a decoder).  As the chain is refined on a fixed
interval, with the posterior variance, L_{k-1} = 1/2 (SNR_{k-1} - SNR_k) ||x0 - x0_hat(x_k)||^2 (VDM eq. 13) and the
sum tends to

    L_inf = -1/2 int SNR'(t) E || x0 - x0_hat ||^2 dt
          = int_{t_min}^{t_max} (-dlambda/dt) E || eps - eps_hat(x_t, t) ||^2 dt
          = int_{lambda(t_max)}^{lambda(t_min)} E || eps - eps_hat(x_lambda) ||^2 dlambda,

with lambda = log(a / sigma) = 1/2 log SNR and ||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR (on VP -dlambda/dt =
g^2 / (2 sigma^2), so this is Song et al.'s 1/2 int g(t)^2 E || s_theta - grad log p_{0t} ||^2 dt, the likelihood
weighting).  The total is KL(q(x_{t_max} | x0) || prior) + L_inf + E[-log p(x0 | x_{t_min})]
with the decoder of mean x0_hat(x_{t_min}) and variance sigma^2 / a^2 at t_min (VDM's).  The integral is estimated by
Monte Carlo with importance sampling of t (``importance="logsnr"``, default): p(t) proportional to -dlambda/dt, i.e.
lambda uniform on its interval, which is Song et al. 2021b's p(t) ~ g^2 / sigma^2 and removes the weight's 1/sigma^2
blow-up at small t; ``num_t`` draws per example, stratified (u_j = (j + U_j) / num_t; VDM's low-discrepancy idea).
``importance="uniform"`` (t ~ U[t_min, t_max], weight (t_max - t_min)(-dlambda/dt)) is kept to show the variance it
removes.  On VP the default interval is that of the DDPM chain (t_min at level 0's log-SNR, t_max at level N-1's), so
the two bounds bound models with the same end points.  The continuous bound works on every Gaussian path.

Shapes: ``x0`` is ``(B, *D)`` in the model's data space; every per-example result is ``(B,)`` (``terms`` (B, K-1)).
Arithmetic is float64; the model is called in x0's dtype.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from .likelihood import nats_to_bpd, to_levels
from .prediction import as_model
from .sdes import SDE, VPSDE, expand_as_batch

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["Bound", "discrete_elbo", "discrete_elbos", "continuous_elbo", "normal_kl", "gaussian_log_likelihood",
           "discretized_gaussian_log_likelihood", "chain_steps", "default_interval", "VARIANCES", "DECODERS",
           "IMPORTANCE"]

VARIANCES = ("beta", "posterior", "learned")
DECODERS = ("discretized", "gaussian")
IMPORTANCE = ("logsnr", "uniform")
_LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class Bound:
    """Per-example terms of a bound, in nats, each ``(B,)``: ``total = prior + diffusion + decoder``."""
    prior: Tensor                 #: L_T: KL(q(x_T | x0) || prior)
    diffusion: Tensor             #: sum_k L_{k-1} (discrete) or L_inf (continuous)
    decoder: Tensor               #: L_0 = -log p(x0 | x_{t_min})
    total: Tensor                 #: the bound on -log p(x0)
    bpd: Tensor                   #: total / (D ln 2)
    dim: int                      #: D
    terms: Optional[Tensor] = None   #: discrete: (B, K-1), L_{k-1} for k = 2..K (from the data side)
    nfe: int = 0                  #: batched network calls

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# ------------------------------------------------------------------------------------------------ Gaussian pieces
def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (arguments broadcast)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(v, dtype=F64) for v in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x, mean, logvar) -> Tensor:
    """Elementwise log N(x; mean, e^logvar)."""
    x, mean, logvar = (torch.as_tensor(v, dtype=F64) for v in (x, mean, logvar))
    return -0.5 * (_LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _log_diff_ndtr(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails (reflect to the side where the CDFs are small)."""
    flip = a > 0                                    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo = torch.where(flip, -b, a)
    hi = torch.where(flip, -a, b)
    lhi, llo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return lhi + torch.log(-torch.expm1(llo - lhi))


def discretized_gaussian_log_likelihood(x, mean, logvar, num_levels: int,
                                        data_range: Tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Elementwise log P(x) of Ho et al.'s discretised Gaussian decoder (eq. 13): the mass of N(mean, e^logvar) on the
    bin of x, [x - h, x + h] with h = (hi - lo) / (2 (L - 1)), the lowest level's bin starting at -inf and the highest's
    ending at +inf.  ``x`` must lie on the grid lo + (hi - lo) k / (L - 1); the L probabilities sum to 1."""
    k = to_levels(torch.as_tensor(x), num_levels, data_range)
    lo, hi = map(float, data_range)
    L = int(num_levels)
    h = (hi - lo) / (2 * (L - 1))
    x = lo + (hi - lo) * k.to(F64) / (L - 1)         # exactly on the grid
    mean, logvar = torch.as_tensor(mean, dtype=F64), torch.as_tensor(logvar, dtype=F64)
    inv_std = torch.exp(-0.5 * logvar)
    lower, upper = (x - h - mean) * inv_std, (x + h - mean) * inv_std
    # a bin far narrower than the Gaussian: the CDF difference loses digits; density x width is exact to O(width^2)
    narrow = (2 * h * inv_std < 1e-4) & (k > 0) & (k < L - 1)
    # (finite stand-ins for -inf / +inf and for the unused narrow entries keep every gradient finite)
    a = torch.where(k == 0, torch.full_like(lower, -1e30), torch.where(narrow, -torch.ones_like(lower), lower))
    b = torch.where(k == L - 1, torch.full_like(upper, 1e30), torch.where(narrow, torch.ones_like(upper), upper))
    exact = _log_diff_ndtr(a, b)
    approx = gaussian_log_likelihood(x, mean, logvar) + math.log(2 * h)
    return torch.where(narrow, approx, exact)


# ------------------------------------------------------------------------------------------------ checks
def chain_steps(sde: SDE, steps=None, num_steps: Optional[int] = None) -> Tensor:
    """The levels S_1 < ... < S_K (int64) of the DDPM chain the discrete bound runs on: ``steps`` as given, else
    ``num_steps`` = K levels round(linspace(0, N - 1, K)) (Improved DDPM's even striding), else all N levels."""
    if not isinstance(sde, VPSDE):
        raise ValueError(f"the discrete (DDPM) bound needs a VP SDE with its DDPM chain (sdes.VPSDE), got "
                         f"{type(sde).__name__}: use continuous_elbo for other Gaussian paths")
    N = sde.N
    if steps is not None and num_steps is not None:
        raise ValueError("give either steps or num_steps, not both")
    if steps is not None:
        s = torch.as_tensor(steps).flatten()
        if s.numel() < 1 or torch.is_floating_point(s) and not bool((s == s.round()).all()):
            raise ValueError(f"steps must be a non-empty sequence of integer levels, got {steps!r}")
        s = s.long()
        if int(s.min()) < 0 or int(s.max()) > N - 1 or not bool((s[1:] > s[:-1]).all()):
            raise ValueError(f"steps must be strictly increasing levels in [0, N - 1 = {N - 1}], got "
                             f"{s.tolist()[:6]}{'...' if s.numel() > 6 else ''}")
        return s
    if num_steps is None or int(num_steps) == 0:
        return torch.arange(N)
    K = int(num_steps)
    if K < 1 or K > N:
        raise ValueError(f"num_steps must be in [1, N = {N}] (a strided chain of K <= N of the SDE's levels), got {K}")
    return torch.round(torch.linspace(0, N - 1, K, dtype=F64)).long()


def _check_decoder(decoder: str, x0: Tensor, num_levels, data_range):
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "discretized":
        if num_levels is None or int(num_levels) < 2:
            raise ValueError(f"the discretized decoder needs num_levels >= 2 (the data's levels), got {num_levels!r}")
        to_levels(x0, int(num_levels), data_range)       # raises if x0 is off the level grid


def _prior(prior, x0: Tensor, default_var: float):
    if prior is None:
        return torch.zeros((), dtype=F64), torch.full((), math.log(default_var), dtype=F64)
    mean, var = prior
    var = torch.as_tensor(var, dtype=F64)
    if bool((var <= 0).any()):
        raise ValueError("the prior's variance must be positive")
    return torch.as_tensor(mean, dtype=F64, device=x0.device), torch.log(var)


def _decoder_nll(decoder, x0, mean, logvar, num_levels, data_range) -> Tensor:
    if decoder == "discretized":
        ll = discretized_gaussian_log_likelihood(x0, mean, logvar, num_levels, data_range)
    else:
        ll = gaussian_log_likelihood(x0, mean, logvar)
    return -ll.flatten(1).sum(1)


def _sum(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


def _x0_hat(pred, clip_denoised: bool, data_range) -> Tensor:
    x0 = pred.x0.to(F64)
    return x0.clamp(*map(float, data_range)) if clip_denoised else x0


def _randn(x0: Tensor, generator) -> Tensor:
    return torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)


# ------------------------------------------------------------------------------------------------ discrete bound
@torch.no_grad()
def discrete_elbos(sde: VPSDE, model, x0: Tensor, *, steps=None, num_steps: Optional[int] = None,
                   variances: Optional[Sequence[str]] = None, decoder: str = "discretized",
                   num_levels: Optional[int] = None, data_range: Tuple[float, float] = (-1.0, 1.0),
                   prior: Optional[Tuple] = None, clip_denoised: bool = False,
                   generator: Optional[torch.Generator] = None) -> Dict[str, Bound]:
    """DDPM's variational bound for each reverse-variance choice, from one network call per step (module doc).

    Args:
        sde: a ``VPSDE`` (its DDPM chain; anything else is a ValueError).
        model: a ``prediction.Model`` (any declared output and time convention; a learned-variance model gives
            ``learned``) or a ``score_fn(x, t)``.  At level i it is asked at the path time with level i's log-SNR.
        x0: data (B, *D) in model space (on the level grid for the discretized decoder).
        steps / num_steps: the chain's levels (``chain_steps``); default all N.
        variances: subset of ``VARIANCES``; default beta and posterior, plus learned when the model has it.
        decoder: ``discretized`` (``num_levels``, ``data_range``) or ``gaussian``.
        prior: (mean, variance) of the Gaussian prior at the top level instead of N(0, I) (tests use q(x_T)).
        clip_denoised: clamp x0_hat to ``data_range`` before it enters the means.
        generator: for the draws x_{S_k} ~ q(x_{S_k} | x0), one independent draw per term.
    Returns:
        {variance: Bound}.
    """
    S = chain_steps(sde, steps, num_steps)
    model = as_model(model)
    learned = bool(getattr(model, "learned_variance", False))
    if variances is None:
        variances = ("beta", "posterior") + (("learned",) if learned else ())
    variances = tuple(variances)
    for v in variances:
        if v not in VARIANCES:
            raise ValueError(f"unknown reverse variance {v!r}; available: {', '.join(VARIANCES)}")
    if not variances:
        raise ValueError("variances must name at least one of " + ", ".join(VARIANCES))
    if "learned" in variances and not learned:
        raise ValueError("the 'learned' reverse variance needs a model with a learned variance output "
                         "(prediction.Model(learned_variance=True), networks with model.learned_variance)")
    _check_decoder(decoder, x0, num_levels, data_range)
    prior_mean, prior_logvar = _prior(prior, x0, 1.0)

    abar = sde.alphas_cumprod.to(F64)[S].to(x0.device)                    # (K,)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])                  # abar_{S_0} = 1: x_{S_0} = x0
    beta = 1.0 - abar / abar_prev                                         # strided beta_k (Nichol & Dhariwal sec. 4)
    beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * beta                  # Ho et al. eq. 7 (0 at k = 1)
    c0 = abar_prev.sqrt() * beta / (1.0 - abar)                           # posterior mean's x0 coefficient, eq. 7
    ct = (abar / abar_prev).sqrt() * (1.0 - abar_prev) / (1.0 - abar)     # and its x_t coefficient
    lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))                    # log-SNR of each level
    t_level = sde.t_from_log_snr(lam.cpu()).to(F64)
    log_beta, log_bt = torch.log(beta), torch.log(beta_tilde)
    # the decoder's posterior variance is beta-tilde_1 = 0: clip to beta-tilde_2 (Improved DDPM), or beta_1 if K = 1
    log_bt_dec = log_bt[1] if len(S) > 1 else log_beta[0]

    x0d = x0.to(F64)
    B, K = x0.shape[0], len(S)
    terms = {v: torch.zeros(B, max(K - 1, 0), dtype=F64, device=x0.device) for v in variances}
    decoder_nll = {}
    for k in range(K):
        xt = (abar[k].sqrt() * x0d + (1.0 - abar[k]).sqrt() * _randn(x0d, generator)).to(x0.dtype)
        pred = model.predict(sde, xt, t_level[k])
        x0_hat = _x0_hat(pred, clip_denoised, data_range)
        v = pred.log_variance_frac
        v = None if v is None else v.to(F64)
        if k == 0:
            logvars = {"beta": log_beta[0], "posterior": log_bt_dec}
            if "learned" in variances:
                logvars["learned"] = v * log_beta[0] + (1 - v) * log_bt_dec        # Nichol & Dhariwal eq. 15
            for name in variances:    # L_0, Ho et al. eq. 13 (mean mu_theta(x_1, 1) = x0_hat)
                decoder_nll[name] = _decoder_nll(decoder, x0d, x0_hat, logvars[name], num_levels, data_range)
            continue
        xtd = xt.to(F64)
        q_mean = c0[k] * x0d + ct[k] * xtd                                  # Ho et al. eq. 7
        p_mean = c0[k] * x0_hat + ct[k] * xtd                               # eq. 7 with x0_hat (= eq. 11)
        logvars = {"beta": log_beta[k], "posterior": log_bt[k]}
        if "learned" in variances:
            logvars["learned"] = v * log_beta[k] + (1 - v) * log_bt[k]     # Nichol & Dhariwal eq. 15
        for name in variances:        # L_{k-1}: KL of two Gaussians (Ho et al. eq. 5)
            terms[name][:, k - 1] = _sum(normal_kl(q_mean, log_bt[k], p_mean, logvars[name]))
    # L_T = KL(q(x_{S_K} | x0) || p(x_{S_K}))
    prior_kl = _sum(normal_kl(abar[-1].sqrt() * x0d, torch.log1p(-abar[-1]), prior_mean, prior_logvar)
                    .expand_as(x0d))
    D = x0[0].numel()
    out = {}
    for name in variances:
        diffusion = terms[name].sum(1)
        total = prior_kl + diffusion + decoder_nll[name]
        out[name] = Bound(prior=prior_kl, diffusion=diffusion, decoder=decoder_nll[name], total=total,
                          bpd=nats_to_bpd(total, D), dim=D, terms=terms[name], nfe=K)
    return out


def discrete_elbo(sde: VPSDE, model, x0: Tensor, *, variance: str = "posterior", **kwargs) -> Bound:
    """DDPM's variational bound with one reverse-variance choice (``discrete_elbos`` for the arguments)."""
    return discrete_elbos(sde, model, x0, variances=(variance,), **kwargs)[variance]


# ------------------------------------------------------------------------------------------------ continuous bound
def default_interval(sde: SDE) -> Tuple[float, float]:
    """(t_min, t_max) of the continuous bound: on VP the DDPM chain's end levels (level 0's and level N-1's
    log-SNR), else (``sde.default_eps``, T)."""
    if isinstance(sde, VPSDE):
        abar = sde.alphas_cumprod.to(F64)[[0, -1]]
        lam = 0.5 * (torch.log(abar) - torch.log1p(-abar))
        t = sde.t_from_log_snr(lam)
        return float(t[0]), float(t[1])
    return float(sde.default_eps), float(sde.T)


@torch.no_grad()
def continuous_elbo(sde: SDE, model, x0: Tensor, *, t_min: Optional[float] = None, t_max: Optional[float] = None,
                    num_t: int = 16, importance: str = "logsnr", decoder: str = "discretized",
                    num_levels: Optional[int] = None, data_range: Tuple[float, float] = (-1.0, 1.0),
                    prior: Optional[Tuple] = None, clip_denoised: bool = False,
                    generator: Optional[torch.Generator] = None) -> Bound:
    """The continuous-time bound prior + L_inf + decoder (module doc), per example.

    Args:
        sde: any Gaussian path.
        model: a ``prediction.Model`` or ``score_fn(x, t)``.
        x0: data (B, *D) in model space.
        t_min, t_max: the interval of the diffusion term (default ``default_interval(sde)``).
        num_t: Monte Carlo draws of t per example (stratified), each one batched network call.
        importance: ``logsnr`` (t with density proportional to -dlambda/dt) or ``uniform``.
        decoder, num_levels, data_range, prior, clip_denoised, generator: as in ``discrete_elbos`` (the prior
            defaults to the SDE's N(0, prior_std^2 I)).
    """
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if isinstance(num_t, bool) or int(num_t) < 1:
        raise ValueError(f"num_t must be an integer >= 1, got {num_t!r}")
    d_min, d_max = default_interval(sde)
    t_min = d_min if t_min is None else float(t_min)
    t_max = d_max if t_max is None else float(t_max)
    if not (0 < t_min < t_max):
        raise ValueError(f"need 0 < t_min < t_max, got t_min = {t_min}, t_max = {t_max}")
    _check_decoder(decoder, x0, num_levels, data_range)
    model = as_model(model)
    prior_mean, prior_logvar = _prior(prior, x0, float(sde.prior_std) ** 2)
    x0d = x0.to(F64)
    B, M = x0.shape[0], int(num_t)
    lam_lo, lam_hi = (float(sde.log_snr(torch.tensor(t, dtype=F64))) for t in (t_max, t_min))

    u = (torch.arange(M, dtype=F64, device=x0.device)
         + torch.rand(B, M, generator=generator, dtype=F64, device=x0.device)) / M         # stratified
    diffusion = torch.zeros(B, dtype=F64, device=x0.device)
    for j in range(M):
        if importance == "logsnr":
            lam = lam_lo + u[:, j] * (lam_hi - lam_lo)            # p(t) ~ -dlambda/dt (Song et al. 2021b, sec. 5)
            t = sde.t_from_log_snr(lam.cpu()).to(F64).to(x0.device)
            weight = torch.full((B,), lam_hi - lam_lo, dtype=F64, device=x0.device)
        else:
            t = t_min + u[:, j] * (t_max - t_min)
            a, s = sde.marginal_coeffs(t.cpu())
            da, ds = sde.marginal_coeffs_dt(t.cpu())
            weight = ((t_max - t_min) * (ds / s - da / a)).to(F64).to(x0.device)    # (t_max - t_min)(-dlambda/dt)
        a, s = (torch.as_tensor(c, dtype=F64).to(x0.device) for c in sde.marginal_coeffs(t.cpu()))
        eps = _randn(x0d, generator)
        xt = (expand_as_batch(a, x0d) * x0d + expand_as_batch(s, x0d) * eps).to(x0.dtype)
        eps_hat = model.predict(sde, xt, t.to(x0.dtype)).eps.to(F64)
        # (-dlambda/dt) ||eps - eps_hat||^2 / p(t) (VDM eq. 17 in eps form; Song et al. 2021b's g^2 / 2 weighting on VP)
        diffusion += weight * _sum((eps - eps_hat) ** 2) / M
    # decoder at t_min: mean x0_hat(x_{t_min}), variance sigma^2 / a^2 = exp(-2 lambda(t_min))
    tm = torch.full((B,), t_min, dtype=F64)
    a0, s0 = (torch.as_tensor(c, dtype=F64).to(x0.device) for c in sde.marginal_coeffs(tm))
    x_lo = (expand_as_batch(a0, x0d) * x0d + expand_as_batch(s0, x0d) * _randn(x0d, generator)).to(x0.dtype)
    x0_hat = _x0_hat(model.predict(sde, x_lo, tm.to(x0.dtype).to(x0.device)), clip_denoised, data_range)
    decoder_nll = _decoder_nll(decoder, x0d, x0_hat, torch.full((), -2.0 * lam_hi, dtype=F64), num_levels, data_range)
    aT, sT = (torch.as_tensor(c, dtype=F64) for c in sde.marginal_coeffs(torch.tensor(t_max, dtype=F64)))
    prior_kl = _sum(normal_kl(aT * x0d, 2 * torch.log(sT), prior_mean, prior_logvar).expand_as(x0d))
    total = prior_kl + diffusion + decoder_nll
    D = x0[0].numel()
    return Bound(prior=prior_kl, diffusion=diffusion, decoder=decoder_nll, total=total, bpd=nats_to_bpd(total, D),
                 dim=D, terms=None, nfe=M + 1)
