"""Denoising score matching: the continuous-time loss, DDPM's discrete epsilon-loss and SMLD's discrete loss.

For x_t = a(t) x0 + sigma(t) z the conditional score is grad log p_{0t}(x_t | x0) = -z / sigma(t), so the
continuous-time objective (Song et al. 2021, eq. 7) is

    L(theta) = E_{t ~ U(eps, T)} E_{x0, z} [ lambda(t) || s_theta(x_t, t) + z / sigma(t) ||^2 ],

with ``uniform`` weighting lambda = sigma^2 (i.e. || sigma s + z ||^2, the epsilon-loss) or ``likelihood`` weighting
lambda = g(t)^2 (Song et al. 2021b: then L bounds the negative log-likelihood).  ``reduce="mean"`` averages over data
dimensions, ``"sum"`` sums them; the batch is always averaged.

Its minimum over all functions s is attained at the true score s = grad log p_t and equals
E_t lambda(t) (E||z / sigma||^2 - E||grad log p_t(x_t)||^2) — tests compare against that.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .sdes import SDE, VESDE, VPSDE, expand_as_batch

Tensor = torch.Tensor

__all__ = ["dsm_loss", "ddpm_loss", "smld_loss", "get_loss_fn", "LOSSES", "WEIGHTINGS"]

LOSSES = ("dsm", "ddpm", "smld")
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


def get_loss_fn(config, sde: SDE) -> Callable:
    """``loss_fn(model, x0, y=None, train=True, generator=None) -> scalar``, the batch mean of the loss named by
    ``config.training.loss`` (``dsm`` with ``training.weighting``/``training.reduce``/``training.eps``, ``ddpm``,
    ``smld``).  For class-conditional models (``model.num_classes > 0``) labels are dropped to the null label with
    probability ``training.p_uncond`` when ``train`` is set."""
    from .networks import get_noise_fn, get_score_fn

    tc = config.training
    kind = tc.loss
    if kind not in LOSSES:
        raise ValueError(f"unknown training.loss {kind!r}; available: {', '.join(LOSSES)}")
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
        if kind == "dsm":
            score_fn = get_score_fn(sde, model, train=train, y=labels)
            losses = dsm_loss(sde, score_fn, x0, eps=tc.eps, weighting=tc.weighting, reduce=tc.reduce,
                              generator=generator)
        elif kind == "ddpm":
            losses = ddpm_loss(sde, get_noise_fn(model, train=train, y=labels), x0, reduce=tc.reduce,
                               generator=generator)
        else:
            losses = smld_loss(sde, get_noise_fn(model, train=train, y=labels), x0, reduce=tc.reduce,
                               generator=generator)
        return losses.mean()
    return loss_fn
