"""Training losses, a registry by name (``training.loss``): denoising score matching (``dsm``, continuous time),
DDPM's discrete epsilon-loss (``ddpm``), SMLD's discrete loss (``smld``), conditional flow matching (``fm``, optionally
with minibatch optimal-transport coupling) and the EDM loss (``edm``).

For x_t = a(t) x0 + sigma(t) z the conditional score is grad log p_{0t}(x_t | x0) = -z / sigma(t), so the
continuous-time objective (Song et al. 2021, eq. 7) is

    L(theta) = E_{t ~ U(eps, T)} E_{x0, z} [ lambda(t) || s_theta(x_t, t) + z / sigma(t) ||^2 ],

with ``uniform`` weighting lambda = sigma^2 (i.e. || sigma s + z ||^2, the epsilon-loss) or ``likelihood`` weighting
lambda = g(t)^2 (Song et al. 2021b: then L bounds the negative log-likelihood).  ``reduce="mean"`` averages over data
dimensions, ``"sum"`` sums them; the batch is always averaged.

Its minimum over all functions s is attained at the true score s = grad log p_t and equals
E_t lambda(t) (E||z / sigma||^2 - E||grad log p_t(x_t)||^2) — tests compare against that.

**Hybrid loss with learned reverse variances** (Nichol & Dhariwal 2021, sec. 3.1, eq. 16): a network with
``model.learned_variance`` also outputs v, the reverse step's log-variance interpolation
log Sigma = v log beta_i + (1 - v) log beta-tilde_i (their eq. 15), and ``ddpm`` then trains
L_hybrid = L_simple + lambda L_vlb with lambda = ``training.vlb_weight`` (0.001): at the drawn level i, L_vlb = N L_i
(the sum over the chain's N terms estimated from one), L_i = KL(q(x_{i-1} | x_i, x0) || N(mu(eps_hat), Sigma)) for
i >= 1 and the decoder's -log p(x0 | x_1) for i = 0 (Ho et al. eq. 13, discretised over ``data.levels`` for image
data, Gaussian for continuous data), in nats, reduced over dimensions like L_simple.  The mean enters L_vlb with a
stop-gradient (eps_hat.detach()): L_vlb trains only v, L_simple only the mean (their sec. 3.1).

 (Lipman et al. 2023, eq. 9 / 23; Liu et al. 2023, eq. 1): regress the model's velocity
(``Prediction.velocity``, whatever output it declares) onto the path's conditional velocity

    L = E_{t ~ U(eps, T)} E_{x0, z} || v_theta(x_t, t) - (a'(t) x0 + sigma'(t) z) ||^2,   x_t = a x0 + sigma z,

which is z - x0 on the linear interpolant.  Its minimum, at v = E[a' x0 + sigma' z | x_t] (the probability-flow
velocity), is E_t E || u - E[u | x_t] ||^2 = E_t (a' sigma - sigma' a)^2 / sigma^2 E tr Cov(x0 | x_t) (u = (a' -
sigma' a / sigma) x0 + (sigma' / sigma) x_t).  ``ot=True`` (Tong et al. 2024, minibatch OT-CFM; Pooladian et al.
2023): the batch's noise is first re-paired with its data by the exact optimal assignment of the squared distances
(``scipy.optimize.linear_sum_assignment``), which keeps both marginals and straightens the paths.

**EDM loss** (Karras et al. 2022, eq. 2 / 8 and Table 1): ln sigma ~ N(P_mean, P_std^2) (P_mean = -1.2, P_std = 1.2),
x = x0 + sigma z, and lambda(sigma) || D(x; sigma) - x0 ||^2 with
lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
On any Gaussian path sigma is its noise-to-signal ratio sigma / a = e^{-lambda(t)}: the model is evaluated at
t = t_from_log_snr(-ln sigma), x_t = a(t) (x0 + sigma z), D = its x0 prediction.  Minimum: E_sigma lambda(sigma)
E tr Cov(x0 | x) — for data N(mu, sigma_data^2 I) exactly 1 per dimension (``reduce="mean"``).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .sdes import SDE, VESDE, VPSDE, expand_as_batch

Tensor = torch.Tensor

__all__ = ["dsm_loss", "ddpm_loss", "ddpm_hybrid_loss", "smld_loss", "fm_loss", "edm_loss", "ot_coupling",
           "get_loss_fn", "register_loss", "available_losses", "LOSSES", "WEIGHTINGS"]

WEIGHTINGS = ("uniform", "likelihood")


def _reduce(sq: Tensor, reduce: str) -> Tensor:
    """(B, *D) squared errors -> (B,) per-example losses."""
    if reduce == "mean":
        return sq.reshape(sq.shape[0], -1).mean(1)
    if reduce == "sum":
        return sq.reshape(sq.shape[0], -1).sum(1)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def _randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def dsm_loss(sde: SDE, score_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, *, eps: float = 1e-5,
             weighting: str = "uniform", reduce: str = "mean", generator: Optional[torch.Generator] = None,
             t: Optional[Tensor] = None, z: Optional[Tensor] = None) -> Tensor:
    """Per-example continuous-time DSM loss, shape (B,).

    Args:
        sde: forward SDE (its marginal gives x_t; its g(t) the likelihood weighting).
        score_fn: ``(x_t, t) -> score`` (e.g. ``networks.get_score_fn(sde, model, train=True)``).
        x0: data (B, *D) in model space.
        eps: t ~ U(eps, T).
        weighting: ``uniform`` (lambda = sigma^2) or ``likelihood`` (lambda = g^2).
        reduce: ``mean`` or ``sum`` over data dimensions.
        generator: for t and z; ``t``/``z`` may be given instead (common random numbers in tests).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    B = x0.shape[0]
    if t is None:
        t = eps + (sde.T - eps) * torch.rand(B, generator=generator, dtype=x0.dtype, device=x0.device)
    if z is None:
        z = _randn_like(x0, generator)
    mean, std = sde.marginal(x0, t)
    std = expand_as_batch(torch.as_tensor(std, dtype=x0.dtype, device=x0.device), x0)
    xt = mean + std * z
    score = score_fn(xt, t)
    if weighting == "uniform":
        sq = (score * std + z) ** 2                       # lambda = sigma^2
    else:
        g2 = expand_as_batch(torch.as_tensor(sde.diffusion(t), dtype=x0.dtype, device=x0.device) ** 2, x0)
        sq = (score + z / std) ** 2 * g2                  # lambda = g^2
    return _reduce(sq, reduce)


def ddpm_loss(sde: VPSDE, noise_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor, *,
              reduce: str = "mean", generator: Optional[torch.Generator] = None, i: Optional[Tensor] = None,
              z: Optional[Tensor] = None) -> Tensor:
    """DDPM's discrete epsilon-loss (Ho et al. 2020, eq. 14), shape (B,): i ~ U{0..N-1},
    x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) z, loss = || eps_hat(x_i, t_i) - z ||^2 with t_i = i T / (N - 1) (the
    VP grid on which ``discrete_betas[i] = beta(t_i) / N``; with ``time_scale = 999`` and N = 1000 the network sees
    DDPM's integer step i).  ``noise_fn(x, t, std)`` as from ``networks.get_noise_fn``."""
    if not isinstance(sde, VPSDE):
        raise ValueError(f"the DDPM loss needs a VP SDE, got {type(sde).__name__}")
    abar = sde.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
    return _discrete_noise_loss(sde, noise_fn, x0, abar.sqrt(), (1.0 - abar).sqrt(), reduce, generator, i, z)


def ddpm_hybrid_loss(sde: VPSDE, noise_fn, x0: Tensor, *, vlb_weight: float = 1e-3, reduce: str = "mean",
                     num_levels: Optional[int] = None, data_range=(-1.0, 1.0),
                     generator: Optional[torch.Generator] = None, i: Optional[Tensor] = None,
                     z: Optional[Tensor] = None) -> Tensor:
    """Improved DDPM's L_simple + lambda L_vlb (module doc), shape (B,).  ``noise_fn(x, t, std) -> (eps_hat, v)``
    (``networks.get_noise_fn(..., with_variance=True)``).  ``num_levels``: the decoder term at level 0 is the
    discretised Gaussian over that many levels of ``data_range`` (None: the continuous Gaussian density)."""
    from .elbo import discretized_gaussian_log_likelihood, gaussian_log_likelihood, normal_kl
    if not isinstance(sde, VPSDE):
        raise ValueError(f"the DDPM loss needs a VP SDE, got {type(sde).__name__}")
    B, N = x0.shape[0], sde.N
    if i is None:
        i = torch.randint(0, N, (B,), generator=generator, device=x0.device)
    if z is None:
        z = _randn_like(x0, generator)
    abar_all = sde.alphas_cumprod.to(device=x0.device, dtype=torch.float64)
    abar = abar_all[i]
    abar_prev = torch.where(i > 0, abar_all[(i - 1).clamp(min=0)], torch.ones_like(abar))
    std = (1.0 - abar).sqrt()
    xt = expand_as_batch(abar.sqrt().to(x0.dtype), x0) * x0 + expand_as_batch(std.to(x0.dtype), x0) * z
    t = i.to(x0.dtype) * (sde.T / max(N - 1, 1))
    eps_hat, v = noise_fn(xt, t, std.to(x0.dtype))
    if v is None:
        raise ValueError("the hybrid loss needs a network with a learned variance (model.learned_variance)")
    simple = _reduce((eps_hat - z) ** 2, reduce)                                      # L_simple (Ho et al. eq. 14)
    e = lambda c: expand_as_batch(c, x0)                                              # noqa: E731
    beta = 1.0 - abar / abar_prev
    beta_tilde = (1.0 - abar_prev) / (1.0 - abar) * beta                              # Ho et al. eq. 7
    # at i = 0, beta-tilde = 0: clip to the next level's, as Improved DDPM does
    bt1 = float((1.0 - abar_all[0]) / (1.0 - abar_all[1]) * (1.0 - abar_all[1] / abar_all[0])) if N > 1 \
        else float(1.0 - abar_all[0])
    log_bt = torch.log(torch.where(i > 0, beta_tilde, torch.full_like(beta_tilde, bt1)))
    logvar = v.to(torch.float64) * e(torch.log(beta)) + (1 - v.to(torch.float64)) * e(log_bt)   # N & D eq. 15
    xtd, x0d = xt.detach().to(torch.float64), x0.to(torch.float64)
    x0_hat = (xtd - e(std) * eps_hat.detach().to(torch.float64)) / e(abar.sqrt())    # stop-gradient on the mean
    c0 = abar_prev.sqrt() * beta / (1.0 - abar)
    ct = (abar / abar_prev).sqrt() * (1.0 - abar_prev) / (1.0 - abar)
    kl = normal_kl(e(c0) * x0d + e(ct) * xtd, e(torch.log(beta_tilde.clamp_min(1e-300))),
                   e(c0) * x0_hat + e(ct) * xtd, logvar)
    if num_levels is not None:
        dec = -discretized_gaussian_log_likelihood(x0d, x0_hat, logvar, int(num_levels), data_range)
    else:
        dec = -gaussian_log_likelihood(x0d, x0_hat, logvar)
    vlb = torch.where((i > 0).reshape(B, *([1] * (x0.dim() - 1))), kl, dec)       # L_i, nats per entry
    return simple + float(vlb_weight) * N * _reduce(vlb, reduce).to(simple.dtype)


def smld_loss(sde: VESDE, noise_fn: Callable[[Tensor, Tensor, Tensor], Tensor], x0: Tensor, *,
              reduce: str = "mean", generator: Optional[torch.Generator] = None, i: Optional[Tensor] = None,
              z: Optional[Tensor] = None) -> Tensor:
    """SMLD's discrete loss (Song & Ermon 2019) with lambda(sigma) = sigma^2, shape (B,): i ~ U{0..N-1},
    x = x0 + sigma_i z, loss = || sigma_i s(x, sigma_i) + z ||^2 = || z - eps_hat ||^2, network time
    t_i = i T / (N - 1) (where ``sde.sigma(t_i) = discrete_sigmas[i]``)."""
    if not isinstance(sde, VESDE):
        raise ValueError(f"the SMLD loss needs a VE SDE, got {type(sde).__name__}")
    sigma = sde.discrete_sigmas.to(device=x0.device, dtype=x0.dtype)
    return _discrete_noise_loss(sde, noise_fn, x0, torch.ones_like(sigma), sigma, reduce, generator, i, z)


def _discrete_noise_loss(sde, noise_fn, x0: Tensor, a_table: Tensor, std_table: Tensor, reduce: str,
                         generator: Optional[torch.Generator], i: Optional[Tensor], z: Optional[Tensor]) -> Tensor:
    """|| eps_hat(x_i, t_i) - z ||^2 for x_i = a_i x0 + std_i z, i ~ U{0..N-1}, network time t_i = i T / (N - 1)."""
    B, N = x0.shape[0], sde.N
    if i is None:
        i = torch.randint(0, N, (B,), generator=generator, device=x0.device)
    if z is None:
        z = _randn_like(x0, generator)
    a, std = a_table[i], std_table[i]
    xt = expand_as_batch(a, x0) * x0 + expand_as_batch(std, x0) * z
    t = i.to(x0.dtype) * (sde.T / max(N - 1, 1))
    return _reduce((noise_fn(xt, t, std) - z) ** 2, reduce)


def ot_coupling(x0: Tensor, z: Tensor) -> Tensor:
    """z re-ordered so that pairing x0[i] with the result's row i minimises sum_i ||x0_i - z_pi(i)||^2 over all
    permutations pi: the exact optimal transport plan between the two empirical measures of the batch (for equal
    weights an optimal plan is a permutation; Birkhoff–von Neumann), found by the Hungarian-type solver
    ``scipy.optimize.linear_sum_assignment``."""
    from scipy.optimize import linear_sum_assignment
    cost = torch.cdist(x0.reshape(x0.shape[0], -1).double(), z.reshape(z.shape[0], -1).double()) ** 2
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    return z[torch.as_tensor(cols[rows.argsort()], device=z.device)]


def fm_loss(sde: SDE, model, x0: Tensor, *, eps: float = 1e-5, reduce: str = "mean", ot: bool = False,
            generator: Optional[torch.Generator] = None, t: Optional[Tensor] = None,
            z: Optional[Tensor] = None) -> Tensor:
    """Per-example conditional flow-matching loss, shape (B,) (module doc).

    Args:
        sde: the Gaussian path (``marginal_coeffs``, ``marginal_coeffs_dt``).
        model: a ``prediction.Model`` (``networks.get_model(sde, net, train=True)``) of any declared output; its
            ``velocity`` is regressed.
        x0: data (B, *D).
        eps: t ~ U(eps, T).
        ot: pair the noise with the data by minibatch optimal transport first.
        generator, t, z: as in ``dsm_loss``.
    """
    B = x0.shape[0]
    if t is None:
        t = eps + (sde.T - eps) * torch.rand(B, generator=generator, dtype=x0.dtype, device=x0.device)
    if z is None:
        z = _randn_like(x0, generator)
    if ot:
        z = ot_coupling(x0, z)
    t64 = t.to(torch.float64)
    a, s = (expand_as_batch(c.to(x0.dtype), x0) for c in sde.marginal_coeffs(t64))
    da, ds = (expand_as_batch(c.to(x0.dtype), x0) for c in sde.marginal_coeffs_dt(t64))
    xt = a * x0 + s * z
    target = da * x0 + ds * z                     # conditional velocity d/dt (a x0 + sigma z) (Lipman et al., eq. 21)
    return _reduce((model.predict(sde, xt, t).velocity - target) ** 2, reduce)


def edm_loss(sde: SDE, model, x0: Tensor, *, sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2,
             reduce: str = "mean", generator: Optional[torch.Generator] = None, sigma: Optional[Tensor] = None,
             z: Optional[Tensor] = None) -> Tensor:
    """Per-example EDM loss lambda(sigma) ||D(x; sigma) - x0||^2, shape (B,) (module doc; Karras et al. 2022, eq. 2
    and Table 1).  ``model``: a ``prediction.Model`` (any output; its ``x0`` is D).  ``sigma`` (B,): noise-to-signal
    ratios to use instead of the log-normal draw."""
    B = x0.shape[0]
    if sigma is None:
        n = torch.randn(B, generator=generator, dtype=x0.dtype, device=x0.device)
        sigma = torch.exp(P_mean + P_std * n)                     # ln sigma ~ N(P_mean, P_std^2) (Table 1)
    if z is None:
        z = _randn_like(x0, generator)
    sig64 = sigma.to(torch.float64)
    t = sde.t_from_log_snr(-torch.log(sig64))                     # the path's time with sigma(t) / a(t) = sigma
    a, _ = sde.marginal_coeffs(t)
    xt = expand_as_batch(a.to(x0.dtype), x0) * (x0 + expand_as_batch(sigma, x0) * z)   # x = a (x0 + sigma z)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2                  # lambda(sigma), Table 1
    d = model.predict(sde, xt, t.to(x0.dtype)).x0
    return weight * _reduce((d - x0) ** 2, reduce)


# ------------------------------------------------------------------------------------------------ registry
#: name -> builder(config, sde) returning ``per_example(model, x0, labels, train, generator) -> (B,)``
_LOSSES: Dict[str, Callable] = {}


def register_loss(name: str):
    """Decorator: ``builder(config, sde)`` becomes ``training.loss = name``."""
    def deco(builder):
        if name in _LOSSES:
            raise ValueError(f"a loss named {name!r} is already registered")
        _LOSSES[name] = builder
        return builder
    return deco


def available_losses():
    return sorted(_LOSSES)


@register_loss("dsm")
def _build_dsm(config, sde):
    from .networks import get_score_fn
    tc = config.training
    return lambda model, x0, labels, train, generator: dsm_loss(
        sde, get_score_fn(sde, model, train=train, y=labels), x0, eps=tc.eps, weighting=tc.weighting,
        reduce=tc.reduce, generator=generator)


@register_loss("ddpm")
def _build_ddpm(config, sde):
    from .networks import get_noise_fn
    if bool(config.model.get("learned_variance", False)):
        # Improved DDPM's hybrid loss; the decoder term is discretised over the data's levels for image data
        levels = {"digits": 17, "cifar10": 256}.get(str(config.data.dataset).lower())
        data_range = (-1.0, 1.0) if config.data.centered else (0.0, 1.0)
        if bool(config.data.get("uniform_dequantization", False)):
            levels = None                 # dequantised training data are continuous
        weight = float(config.training.get("vlb_weight", 1e-3))
        return lambda model, x0, labels, train, generator: ddpm_hybrid_loss(
            sde, get_noise_fn(model, train=train, y=labels, with_variance=True), x0, vlb_weight=weight,
            reduce=config.training.reduce, num_levels=levels, data_range=data_range, generator=generator)
    return lambda model, x0, labels, train, generator: ddpm_loss(
        sde, get_noise_fn(model, train=train, y=labels), x0, reduce=config.training.reduce, generator=generator)


@register_loss("smld")
def _build_smld(config, sde):
    from .networks import get_noise_fn
    return lambda model, x0, labels, train, generator: smld_loss(
        sde, get_noise_fn(model, train=train, y=labels), x0, reduce=config.training.reduce, generator=generator)


@register_loss("fm")
def _build_fm(config, sde):
    from .networks import get_model
    tc = config.training
    return lambda model, x0, labels, train, generator: fm_loss(
        sde, get_model(sde, model, train=train, y=labels), x0, eps=tc.eps, reduce=tc.reduce,
        ot=bool(tc.get("fm_ot", False)), generator=generator)


@register_loss("edm")
def _build_edm(config, sde):
    from .networks import get_model
    tc = config.training
    return lambda model, x0, labels, train, generator: edm_loss(
        sde, get_model(sde, model, train=train, y=labels), x0, sigma_data=float(config.model.get("sigma_data", 0.5)),
        P_mean=float(tc.get("P_mean", -1.2)), P_std=float(tc.get("P_std", 1.2)), reduce=tc.reduce,
        generator=generator)


LOSSES = ("dsm", "ddpm", "smld", "fm", "edm")


def get_loss_fn(config, sde: SDE) -> Callable:
    """``loss_fn(model, x0, y=None, train=True, generator=None) -> scalar``, the batch mean of the loss named by
    ``config.training.loss`` (``available_losses()``: ``dsm`` with ``training.weighting``/``training.reduce``/
    ``training.eps``, ``ddpm``, ``smld``, ``fm`` with ``training.fm_ot``, ``edm`` with ``training.P_mean``/
    ``training.P_std`` and ``model.sigma_data``).  For class-conditional models (``model.num_classes > 0``) labels are
    dropped to the null label with probability ``training.p_uncond`` when ``train`` is set."""
    tc = config.training
    kind = tc.loss
    if kind not in _LOSSES:
        raise ValueError(f"unknown training.loss {kind!r}; available: {', '.join(available_losses())}")
    per_example = _LOSSES[kind](config, sde)
    num_classes = int(config.model.num_classes)
    p_uncond = float(tc.p_uncond)

    def loss_fn(model, x0, y=None, train=True, generator=None):
        labels = None
        if num_classes > 0:
            if y is None:
                labels = torch.full((x0.shape[0],), num_classes, dtype=torch.long, device=x0.device)
            else:
                labels = y.to(device=x0.device, dtype=torch.long)
                if train and p_uncond > 0:
                    drop = torch.rand(labels.shape[0], generator=generator, device=x0.device) < p_uncond
                    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
        return per_example(model, x0, labels, train, generator).mean()
    return loss_fn
