"""Exact log-likelihood through the probability-flow ODE and the instantaneous change of variables.

The probability-flow ODE of a forward SDE (Song et al. 2021, eq. 13)

    dx/dt = v(x, t) = f(x, t) - 1/2 g(t)^2 s(x, t)

transports p_eps to p_T, and along a solution the density obeys the instantaneous change of variables
(Chen et al. 2018, "Neural ODEs", thm. 1):  d/dt log p_t(x_t) = -div_x v(x_t, t).  Integrating from eps to T,

    log p_eps(x) = log p_T(x_T) + int_eps^T div_x v(x_t, t) dt,        x_eps = x,          (1)

so one forward solve of the augmented state [x_t, l_t] with dl/dt = div v, l_eps = 0, gives log p_eps(x) =
log p_T(x_T) + l_T.  ``log p_T`` is the SDE's prior (``sde.prior_logp``) unless an exact one is passed.  What is
measured is therefore the density of the *model at time eps*: the ODE maps x as a sample of p_eps, not of p_0 (with the
exact score it is log p_eps, which tends to log p_0 as eps -> 0 for a smooth p_0).

The divergence is exact (D vector-Jacobian products, fine for small D) or Hutchinson's estimator
div v = E[e^T (dv/dx) e] with Rademacher or Gaussian probes e (Hutchinson 1989; FFJORD, Grathwohl et al. 2019).  Each
probe is drawn once per solve and held fixed along the trajectory (so the integrand stays smooth for the adaptive
solver), and every probe gets its own channel l^(k) of the augmented state.  Since x_t does not depend on the probes,
each channel is an unbiased estimate of (1); their mean is reported and, with ``num_probes >= 2``, their standard
error ``std_k(l^(k)) / sqrt(num_probes)`` (sample std, ddof = 1) as ``nll_se``.

Integration: adaptive Dormand–Prince RK45 (scipy ``solve_ivp``, one system for the whole batch in float64, as in
score_sde) or fixed-step Euler / Heun / RK4 on the uniform grid eps = t_0 < ... < t_n = T.  ``nfe`` counts evaluations
of the vector field, i.e. batched forward calls of ``score_fn``.

Discrete data and bits/dim
--------------------------
For 8-bit data (or any ``num_levels`` = L levels) the integer value k in {0, ..., L-1} of each of the D dimensions is
dequantised, u = k + U with U ~ Uniform[0, 1)^D, and mapped affinely to the model's data range [lo, hi]:

  * ``dequantize="uniform"`` (score_sde's convention, so bits/dim are comparable with its published numbers):
    y = lo + w u with w = (hi - lo) / L, e.g. y = (k + U)/256 in [0, 1) or 2 (k + U)/256 - 1 in [-1, 1).
  * ``dequantize="uniform_centered"``: y = lo + w (u - 1/2) with w = (hi - lo) / (L - 1), i.e. each bin is centred
    on the value k/(L-1) the model was trained on.  Better for coarse data (the digits, L = 17, stored as pixel/16).

With p_u(u) = p_y(y) w^D (change of variables u -> y), what is reported is

    nll  = -log p_u(u) = -log p_eps(y) - D log w                       [nats per sample]
    bpd  = nll / (D ln 2) = -log p_eps(y) / (D ln 2) + log2(1 / w)     [bits per dimension]

i.e. score_sde's ``bpd = -(prior_logp + delta_logp) / (D ln 2) + offset`` with offset = log2(256/2) = 7 for data
centred in [-1, 1] and log2(256) = 8 for [0, 1].  By Jensen, E_U[-log2 p_u(k + U)] >= -log2 P(k), so the dequantised
bits/dim is an upper bound on the discrete model's codelength (averaging over U is the dataset mean over samples).
Without dequantisation (``dequantize=None``) nll = -log p_eps(x) in the model's own coordinates and bpd = nll/(D ln 2).

Assumption: ``score_fn`` treats batch elements independently (no batch statistics), so that the divergence can be
taken through the batch sum.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch

from . import odeint

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["nll", "LikelihoodResult", "nats_to_bpd", "dequantize_levels", "to_levels", "probability_flow_divergence",
           "SOLVERS", "DEQUANTIZATIONS"]

SOLVERS = ("rk45", "euler", "heun", "rk4")
DEQUANTIZATIONS = ("uniform", "uniform_centered")
_LN2 = math.log(2.0)


@dataclasses.dataclass
class LikelihoodResult:
    """Per-sample likelihood numbers; every tensor is ``(B,)`` unless stated."""
    nll: Tensor                   #: nats: -log p_u(u) of the dequantised data if dequantised, else -log p_eps(x)
    bpd: Tensor                   #: bits/dim, nll / (D ln 2)
    nfe: int                      #: evaluations of the probability-flow vector field (batched score calls)
    nll_model: Tensor             #: -log p_eps(y) in the model's coordinates (= nll without dequantisation)
    prior_logp: Tensor            #: log p_T(x_T)
    delta_logp: Tensor            #: int_eps^T div v dt (mean over probes)
    nll_se: Optional[Tensor]      #: Hutchinson standard error over probes (None for the exact trace or one probe)
    z: Tensor                     #: x_T, (B, *D)
    y: Tensor                     #: the point whose density was measured (dequantised data), (B, *D)
    offset_nats: float            #: -D log w added to nll_model for the change of variables (0 if not dequantised)
    dim: int                      #: D

    def as_dict(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __getitem__(self, key):
        return getattr(self, key)


def nats_to_bpd(nll_nats, dim: int):
    """Bits per dimension of a negative log-likelihood given in nats for a D-dimensional datum."""
    return nll_nats / (dim * _LN2)


# ---------------------------------------------------------------------- discrete data
def to_levels(x: Tensor, num_levels: int, data_range: Tuple[float, float], atol: float = 1e-3) -> Tensor:
    """Integer levels k in {0, ..., L-1} of data on the grid lo + (hi - lo) k / (L - 1) (how the data pipeline maps
    k -> model space), or of integer input as is.  Raises if x is off the grid by more than ``atol`` level spacings."""
    L = int(num_levels)
    if L < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    if not torch.is_floating_point(x):
        k = x.long()
        if k.min() < 0 or k.max() > L - 1:
            raise ValueError(f"integer data must lie in [0, {L - 1}], got [{int(k.min())}, {int(k.max())}]")
        return k
    lo, hi = map(float, data_range)
    r = (x.double() - lo) / (hi - lo) * (L - 1)
    k = torch.round(r)
    off = float((r - k).abs().max()) if r.numel() else 0.0
    if off > atol or k.min() < 0 or k.max() > L - 1:
        raise ValueError(f"x is not on the {L}-level grid of [{lo}, {hi}] (largest offset {off:.3g} levels, range "
                         f"[{float(r.min()):.3g}, {float(r.max()):.3g}]); pass integer levels, the right num_levels/"
                         f"data_range, or dequantize=None for continuous data")
    return k.long()


def dequantize_levels(k: Tensor, num_levels: int, data_range: Tuple[float, float], mode: str = "uniform",
                      generator: Optional[torch.Generator] = None, dtype=torch.float32):
    """u = k + U, U ~ U[0, 1)^D, mapped to the model range; returns (y, w) with y = lo + w u ("uniform", w = (hi-lo)/L)
    or y = lo + w (u - 1/2) ("uniform_centered", w = (hi-lo)/(L-1)).  Noise is drawn on the CPU (reproducible with a
    CPU generator) and moved to k's device."""
    lo, hi = map(float, data_range)
    L = int(num_levels)
    U = torch.rand(tuple(k.shape), generator=generator, dtype=torch.float64).to(k.device)
    u = k.double() + U
    if mode == "uniform":
        w = (hi - lo) / L
        y = lo + w * u
    elif mode == "uniform_centered":
        w = (hi - lo) / (L - 1)
        y = lo + w * (u - 0.5)
    else:
        raise ValueError(f"unknown dequantization {mode!r}; available: {', '.join(DEQUANTIZATIONS)} or None")
    return y.to(dtype), w


# ---------------------------------------------------------------------- the vector field and its divergence
def _draw_probes(shape, num_probes: int, probe: str, generator, dtype, device) -> Tensor:
    """(K, B, *D) probes with E[e e^T] = I."""
    full = (num_probes, *shape)
    if probe == "rademacher":
        e = torch.randint(0, 2, full, generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
    elif probe == "gaussian":
        e = torch.randn(full, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"unknown probe {probe!r}; use 'rademacher' or 'gaussian'")
    return e.to(dtype=dtype, device=device)


_BATCHED_EXACT = True   # try vmapped VJPs for the exact trace first; fall back to a loop if an op does not support it


def _exact_divergence(v: Tensor, x: Tensor, chunk: int = 64) -> Tensor:
    """sum_i dv_i/dx_i per sample via D VJPs with one-hot cotangents; (B,)."""
    global _BATCHED_EXACT
    B = x.shape[0]
    D = x[0].numel()
    div = torch.zeros(B, dtype=x.dtype, device=x.device)
    if _BATCHED_EXACT:
        try:
            for start in range(0, D, chunk):
                idx = torch.arange(start, min(D, start + chunk), device=x.device)
                basis = torch.zeros(len(idx), B, D, dtype=v.dtype, device=v.device)
                basis[torch.arange(len(idx)), :, idx] = 1.0
                (g,) = torch.autograd.grad(v, x, grad_outputs=basis.reshape(len(idx), *v.shape),
                                           retain_graph=True, is_grads_batched=True, allow_unused=True)
                if g is not None:
                    div = div + g.reshape(len(idx), B, D)[torch.arange(len(idx)), :, idx].sum(0)
            return div
        except (RuntimeError, NotImplementedError):
            _BATCHED_EXACT = False
            div = torch.zeros(B, dtype=x.dtype, device=x.device)
    vf = v.reshape(B, D)
    for i in range(D):
        (g,) = torch.autograd.grad(vf[:, i].sum(), x, retain_graph=True, allow_unused=True)
        if g is not None:
            div = div + g.reshape(B, D)[:, i]
    return div


def probability_flow_divergence(sde, score_fn: ScoreFn, x: Tensor, t: float, method: str = "exact",
                                probes: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """v(x, t) = f - 1/2 g^2 s and its divergence: returns (v: (B, *D), div: (B, K)) with K = 1 for the exact trace,
    else K = len(probes) Hutchinson estimates e_k^T (dv/dx) e_k."""
    rsde = sde.reverse(score_fn, probability_flow=True)
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = rsde.drift(xg, torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device))
        if not v.requires_grad:
            raise RuntimeError("the probability-flow vector field does not depend on x through autograd: the "
                               "divergence needs a differentiable score_fn (no torch.no_grad() or .detach() inside)")
        if method == "exact":
            div = _exact_divergence(v, xg)[:, None]
        elif method == "hutchinson":
            divs = []
            for e in probes:
                (g,) = torch.autograd.grad(v, xg, grad_outputs=e, retain_graph=True, allow_unused=True)
                divs.append(torch.zeros(x.shape[0], dtype=x.dtype, device=x.device) if g is None
                            else (g * e).flatten(1).sum(1))
            div = torch.stack(divs, 1)
        else:
            raise ValueError(f"unknown divergence method {method!r}; use 'exact' or 'hutchinson'")
    return v.detach(), div.detach()


# ---------------------------------------------------------------------- the entry point
def nll(sde, score_fn: ScoreFn, x: Tensor, method: str = "exact", num_probes: int = 1, probe: str = "rademacher",
        solver: str = "rk45", rtol: float = 1e-5, atol: float = 1e-5, num_steps: int = 100,
        eps: Optional[float] = None, generator: Optional[torch.Generator] = None, dequantize: Optional[str] = None,
        num_levels: int = 256, data_range: Tuple[float, float] = (-1.0, 1.0),
        prior_logp: Optional[Callable[[Tensor], Tensor]] = None) -> LikelihoodResult:
    """Negative log-likelihood of a batch under the probability-flow ODE of ``sde`` driven by ``score_fn``.

    Args:
        sde: an ``sde_diffusion.sdes.SDE``.
        score_fn: ``(x, t: (B,)) -> grad_x log p_t(x)``, x's shape.
        x: ``(B, *D)`` data in the model's coordinates (or integer levels when ``dequantize`` is set).
        method: ``"exact"`` trace (D VJPs per evaluation) or ``"hutchinson"``.
        num_probes, probe: Hutchinson probes per sample (``"rademacher"`` or ``"gaussian"``), fixed along the solve.
        solver: ``"rk45"`` (adaptive, rtol/atol) or fixed-step ``"euler"``/``"heun"``/``"rk4"`` (``num_steps``).
        eps: start time of the ODE (default ``sde.default_eps``); the density measured is p_eps.
        generator: CPU generator for the dequantisation noise and the probes.
        dequantize: ``None`` (continuous data), ``"uniform"`` (score_sde's bins) or ``"uniform_centered"``;
            see the module docstring for exactly what is reported.
        num_levels, data_range: L levels, mapped by the data pipeline to lo + (hi - lo) k / (L - 1).
        prior_logp: ``z -> log p_T(z)`` (B,); default ``sde.prior_logp``.  Pass the exact p_T to remove the
            prior-mismatch term (e.g. an analytic target's ``marginal_log_prob(sde)(z, T)``).

    Returns:
        ``LikelihoodResult`` with per-sample ``nll`` (nats), ``bpd``, ``nfe`` and the pieces of eq. (1).
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"unknown divergence method {method!r}; use 'exact' or 'hutchinson'")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; available: {', '.join(SOLVERS)}")
    if method == "hutchinson" and int(num_probes) < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if dequantize not in (None, False, "none") and dequantize not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {dequantize!r}; available: {', '.join(DEQUANTIZATIONS)} or None")
    eps = float(sde.default_eps if eps is None else eps)
    T = float(sde.T)
    if not 0 <= eps < T:
        raise ValueError(f"need 0 <= eps < T = {T}, got eps = {eps}")

    x = torch.as_tensor(x)
    B, shape = x.shape[0], tuple(x.shape)
    D = int(np.prod(shape[1:]))
    offset = 0.0
    if dequantize in (None, False, "none"):
        if not torch.is_floating_point(x):
            raise ValueError("integer data need dequantize='uniform' or 'uniform_centered'")
        y = x
    else:
        dtype = x.dtype if torch.is_floating_point(x) else torch.get_default_dtype()
        k = to_levels(x, num_levels, data_range)
        y, w = dequantize_levels(k, num_levels, data_range, dequantize, generator, dtype)
        offset = -D * math.log(w)

    K = 1 if method == "exact" else int(num_probes)
    probes = (_draw_probes(shape, K, probe, generator, y.dtype, y.device) if method == "hutchinson" else None)

    nfe = 0

    def F(z: Tensor, t: float) -> Tensor:
        nonlocal nfe
        nfe += 1
        xt = z[:, :D].reshape(shape)
        v, div = probability_flow_divergence(sde, score_fn, xt, t, method, probes)
        if not (torch.isfinite(v).all() and torch.isfinite(div).all()):
            raise FloatingPointError(f"non-finite vector field or divergence at t = {t}")
        return torch.cat([v.reshape(B, D), div.to(v.dtype)], 1)

    z0 = torch.cat([y.reshape(B, D), torch.zeros(B, K, dtype=y.dtype, device=y.device)], 1)
    if solver == "rk45":
        zT = odeint.rk45(F, z0, eps, T, rtol, atol)
    else:
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        grid = np.linspace(eps, T, int(num_steps) + 1).tolist()
        zT = z0
        for t, s in zip(grid[:-1], grid[1:]):
            zT = odeint.rk_step(F, zT, t, s, solver)

    xT = zT[:, :D].reshape(shape)
    delta = zT[:, D:]                                                   # (B, K)
    plogp = (prior_logp or sde.prior_logp)(xT).reshape(B).to(delta.dtype)
    logp = plogp[:, None] + delta                                       # eq. (1), one column per probe
    nll_model = -logp.mean(1)
    se = logp.std(1, unbiased=True) / math.sqrt(K) if K >= 2 else None
    nll_u = nll_model + offset
    return LikelihoodResult(nll=nll_u, bpd=nats_to_bpd(nll_u, D), nfe=nfe, nll_model=nll_model, prior_logp=plogp,
                            delta_logp=delta.mean(1), nll_se=se, z=xT, y=y, offset_nats=offset, dim=D)
