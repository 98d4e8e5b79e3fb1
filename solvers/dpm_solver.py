"""DPM-Solver (Lu et al. 2022, noise prediction) and DPM-Solver++ (Lu et al. 2022b, data prediction), orders 1-3,
single- and multistep, in the log-SNR lambda = log(a / sigma) of any Gaussian path x_t = a_t x0 + sigma_t eps.

**The exact solution.**  With h = lambda_s - lambda_t > 0 (a step from t towards the data, s < t), the probability
flow integrates to (variation of constants in lambda)

    noise prediction:  x_s = (a_s / a_t) x_t - a_s int_{lam_t}^{lam_s} e^{-lam} eps_hat(lam) dlam
                                                                                   (Lu et al. 2022, eq. 3.4)
    data prediction:   x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lam_t}^{lam_s} e^{lam} x0_hat(lam) dlam
                                                                                   (Lu et al. 2022b, eq. 8)

Expanding the model output m(lam) (eps_hat or x0_hat) in a Taylor series at lam_t, m = sum_k m^(k) (lam - lam_t)^k / k!,
the k-th derivative enters with the exact weight W_k:

    data:   W_k = a_s c_k(h),      c_k(h) = int_0^h e^{-u} (h - u)^k / k! du = h^{k+1} phi_{k+1}(-h)
            c_0 = 1 - e^{-h},  c_1 = h - 1 + e^{-h},  c_2 = h^2/2 - h + 1 - e^{-h}
    noise:  W_k = -sigma_s e_k(h), e_k(h) = int_0^h e^{v} (h - v)^k / k! dv  = h^{k+1} phi_{k+1}(h)
            e_0 = e^h - 1,     e_1 = e^h - 1 - h,    e_2 = e^h - 1 - h - h^2/2

(Lu et al. 2022, eq. 3.6; Lu et al. 2022b, eq. 9), so x_s = L x_t + sum_k W_k m^(k) with L = a_s/a_t (noise) or
sigma_s/sigma_t (data).  A solver of order k estimates m^(1..k-1) from k model values:

* order 1 (DPM-Solver-1 / DPM-Solver++(1)): W_0 m(lam_t) alone — DDIM with eta = 0 (Lu et al. 2022, eq. 3.7).
* singlestep order 2 (DPM-Solver-2, Lu et al. 2022, Alg. 1; DPM-Solver++(2S), Lu et al. 2022b, Alg. 1): one extra
  value at lam_t + r1 h (r1 = 1/2) reached by a first-order step, and the correction W_0 (m_1 - m_t) / (2 r1).
* singlestep order 3 (DPM-Solver-3, Lu et al. 2022, Alg. 2, and its data-prediction twin): values at r1 = 1/3 and
  r2 = 2/3; the second intermediate point and the final step use W_1 (m_j - m_t) / (r_j h).
* multistep order 2 (DPM-Solver++(2M), Lu et al. 2022b, Alg. 2; the noise-prediction twin, ibid. Appendix): the
  previous step's value, D = m_0 + (m_0 - m_1) / (2 r), r = h_prev / h, weighted by W_0.
* multistep order 3: the quadratic through the last three values in lambda (Newton divided differences, any step
  sizes), its first and second derivatives at lam_t weighted by W_1 and W_2.  (This is the Taylor weighting of the
  exact solution above.  diffusers' and k-diffusion's 3M weight the second difference D2 = h^2 p''/2 by c_2/h^2, half
  of the exact c_2 p'' = 2 c_2 D2 / h^2: against the exact flow of a Gaussian their 3M measures slope ~2.1, this one
  3 (tests/test_dpm_solver.py).)

**Costs and the grid.**  Multistep: one call per grid step (``nfe_per_step=1``).  Singlestep order k: k calls per grid
step, each grid step being one DPM-Solver-k step with its intermediate points inside it; so ``num_steps = n`` costs
``k n`` calls, minus ``k - 1`` when the grid ends at the data (that last step is first order, below).

**The step to sigma = 0** (the grid's last node with ``denoise=True``: lambda = +inf, h = inf) is always first order:
data prediction gives exactly x_0 = a_0 x0_hat (e^{-h} = 0, sigma_s / sigma_t = 0); noise prediction the same through
sigma_s e^h = a_s sigma_t / a_t.  No extra call.  Every higher-order weight diverges as h -> inf (data: W_1 ~ a_s h;
the 2M correction W_0 h / (2 h_prev) ~ h), so there is no higher-order limit; k-diffusion does the same, diffusers
with ``final_sigmas_type="zero"``.

``lower_order_final`` (multistep only; singlestep steps are self-starting): on grids of fewer than 15 steps the last
steps use order min(order, steps left) — DPM-Solver++'s remedy for instability at few steps, with diffusers'
threshold of 15 (the original code uses 10).  ``thresholding``: dynamic thresholding of x0_hat (Saharia et al. 2022,
sec. 2.3, as DPM-Solver++ uses it, Lu et al. 2022b, sec. 5): s = the ``threshold_ratio`` quantile of |x0_hat| per
sample, clamped to [1, ``threshold_max``], x0_hat <- clip(x0_hat, -s, s) / s; with noise prediction eps_hat is
recomputed from the thresholded x0_hat.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .base import register_sampler

__all__ = ["Node", "grid_node", "node_at_lambda", "dynamic_threshold", "model_output", "exp_weights",
           "first_order_step", "multistep_update", "singlestep_pair", "check_prediction", "check_threshold",
           "check_order", "LOWER_ORDER_FINAL_BELOW"]

Tensor = torch.Tensor
PREDICTIONS = ("x0", "eps")
VARIANTS = ("multistep", "singlestep")
#: grids with fewer steps than this use lower orders on their last steps when ``lower_order_final`` (diffusers' rule)
LOWER_ORDER_FINAL_BELOW = 15


class Node(NamedTuple):
    """A point of the path: t (float64 0-d tensor, what ``ctx.predict`` receives), a, sigma, lambda (floats)."""
    t: Tensor
    a: float
    sigma: float
    lam: float


def grid_node(grid, i: int) -> Node:
    return Node(grid.t[i], float(grid.a[i]), float(grid.sigma[i]), float(grid.lam[i]))


def node_at_lambda(sde, lam: float) -> Node:
    """The path's point with log-SNR lam (closed-form inverse ``sde.t_from_log_snr``)."""
    t = torch.as_tensor(sde.t_from_log_snr(torch.tensor(float(lam), dtype=torch.float64)), dtype=torch.float64)
    a, s = sde.marginal_coeffs(t)
    return Node(t, float(a), float(s), float(lam))


# ------------------------------------------------------------------------------------------------ options
def check_order(order, allowed: Sequence[int], what: str) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, float)) or order not in allowed:
        raise ValueError(f"{what}'s order must be one of {list(allowed)}, got {order!r}")
    return int(order)


def check_prediction(prediction) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be 'x0' (DPM-Solver++, data prediction) or 'eps' (DPM-Solver, noise "
                         f"prediction), got {prediction!r}")
    return prediction


def check_threshold(thresholding, ratio, max_value) -> Optional[Tuple[float, float]]:
    """(ratio, max_value) if dynamic thresholding is on, None if off; ValueError for bad values."""
    if not isinstance(thresholding, bool):
        raise ValueError(f"thresholding must be True or False, got {thresholding!r}")
    ratio, max_value = float(ratio), float(max_value)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"threshold_ratio must lie in (0, 1], got {ratio}")
    if not (math.isfinite(max_value) and max_value >= 1.0):
        raise ValueError(f"threshold_max must be a finite number >= 1 (the threshold is clamped to [1, max]), "
                         f"got {max_value}")
    return (ratio, max_value) if thresholding else None


# ------------------------------------------------------------------------------------------------ model output
def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = quantile(|x0|, ratio) clamped to
    [1, max_value]; x0 <- clip(x0, -s, s) / s."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    s = torch.quantile(flat.to(torch.float64), ratio, dim=1).to(x0.dtype)
    s = torch.clamp(s, min=1.0, max=max_value).reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def model_output(ctx, x: Tensor, node: Node, prediction: str, thresh: Optional[Tuple[float, float]]) -> Tensor:
    """One counted call: x0_hat (data prediction) or eps_hat (noise prediction) at (x, node), thresholded if asked."""
    pred = ctx.predict(x, node.t)
    if thresh is None:
        return pred.x0 if prediction == "x0" else pred.eps
    x0 = dynamic_threshold(pred.x0, *thresh)
    return x0 if prediction == "x0" else (x - node.a * x0) / node.sigma     # eps consistent with the clipped x0


# ------------------------------------------------------------------------------------------------ step formulas
def exp_weights(prediction: str, nt: Node, ns: Node, kmax: int) -> Tuple[float, List[float]]:
    """(L, [W_0 .. W_kmax]) of the exact solution x_s = L x_t + sum_k W_k m^(k)(lam_t) (module doc).  At sigma_s = 0
    (h = inf) only the limit W_0 exists: L = 0, W_0 = a_s (data); L = a_s/a_t, W_0 = -a_s sigma_t / a_t (noise)."""
    if ns.sigma == 0.0:
        if prediction == "x0":
            return 0.0, [ns.a]                                   # e^{-h} = 0: x_s = a_s x0_hat
        return ns.a / nt.a, [-ns.a * nt.sigma / nt.a]            # sigma_s e^h = a_s sigma_t / a_t
    h = ns.lam - nt.lam
    if prediction == "x0":
        em = math.expm1(-h)                                      # e^{-h} - 1
        c = [-em, h + em, 0.5 * h * h - h - em]                  # Lu et al. 2022b, eq. 9: h^{k+1} phi_{k+1}(-h)
        return ns.sigma / nt.sigma, [ns.a * ck for ck in c[:kmax + 1]]
    ep = math.expm1(h)                                           # e^h - 1
    e = [ep, ep - h, ep - h - 0.5 * h * h]                       # Lu et al. 2022, eq. 3.6: h^{k+1} phi_{k+1}(h)
    return ns.a / nt.a, [-ns.sigma * ek for ek in e[:kmax + 1]]


def first_order_step(prediction: str, x: Tensor, m0: Tensor, nt: Node, ns: Node) -> Tensor:
    """DPM-Solver-1 (Lu et al. 2022, eq. 3.7) / DPM-Solver++(1) (Lu et al. 2022b, eq. 9 with k = 1)."""
    L, W = exp_weights(prediction, nt, ns, 0)
    return L * x + W[0] * m0


def multistep_update(prediction: str, x: Tensor, hist: Sequence[Tuple[float, Tensor]], nt: Node, ns: Node,
                     k: int) -> Tensor:
    """Multistep step of order k from the last k (lambda, model output) pairs in ``hist`` (newest last, at nt)."""
    m0 = hist[-1][1]
    if k == 1 or ns.sigma == 0.0:
        return first_order_step(prediction, x, m0, nt, ns)
    h = ns.lam - nt.lam
    L, W = exp_weights(prediction, nt, ns, k - 1)
    lam1, m1 = hist[-2]
    h0 = nt.lam - lam1
    if k == 2:
        # Lu et al. 2022b, Alg. 2: D = (1 + 1/(2r)) m_0 - 1/(2r) m_1 with r = h0 / h
        return L * x + W[0] * m0 + W[0] * (h / (2.0 * h0)) * (m0 - m1)
    lam2, m2 = hist[-3]
    h1 = lam1 - lam2
    f01 = (m0 - m1) / h0                     # divided differences of the interpolating quadratic in lambda
    f12 = (m1 - m2) / h1
    f012 = (f01 - f12) / (h0 + h1)
    d1 = f01 + h0 * f012                     # p'(lam_t)
    d2 = 2.0 * f012                          # p''(lam_t)
    return L * x + W[0] * m0 + W[1] * d1 + W[2] * d2      # Taylor weights of the exact solution (module doc)


def singlestep_pair(ctx, prediction: str, thresh, x: Tensor, m0: Tensor, nt: Node, ns: Node,
                    order: int) -> Tuple[Tensor, Tensor]:
    """One singlestep DPM-Solver step of ``order`` (2 or 3) from (x, m0) at nt to ns, and the lower-order solution that
    shares its model calls (order - 1 extra calls): order 2 -> (DPM-Solver-2 with r1 = 1/2, DPM-Solver-1); order 3 ->
    (DPM-Solver-3 with r1 = 1/3, r2 = 2/3, DPM-Solver-2 with r1 = 1/3) — the pairs of Lu et al. 2022's adaptive
    DPM-Solver-12 and -23."""
    h = ns.lam - nt.lam
    L, W = exp_weights(prediction, nt, ns, 1)
    if order == 2:
        r1 = 0.5
        n1 = node_at_lambda(ctx.sde, nt.lam + r1 * h)
        u1 = first_order_step(prediction, x, m0, nt, n1)
        m1 = model_output(ctx, u1, n1, prediction, thresh)
        low = L * x + W[0] * m0                                               # DPM-Solver-1
        # Lu et al. 2022, Alg. 1 / Lu et al. 2022b, Alg. 1: correction W_0 (m_1 - m_0) / (2 r1)
        return low + (W[0] / (2.0 * r1)) * (m1 - m0), low
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    n1 = node_at_lambda(ctx.sde, nt.lam + r1 * h)
    n2 = node_at_lambda(ctx.sde, nt.lam + r2 * h)
    u1 = first_order_step(prediction, x, m0, nt, n1)                          # Lu et al. 2022, Alg. 2, u_1
    m1 = model_output(ctx, u1, n1, prediction, thresh)
    L2, W2 = exp_weights(prediction, nt, n2, 1)
    u2 = L2 * x + W2[0] * m0 + (W2[1] / (r1 * h)) * (m1 - m0)                 # Alg. 2, u_2 (D_1 = m_1 - m_0)
    m2 = model_output(ctx, u2, n2, prediction, thresh)
    high = L * x + W[0] * m0 + (W[1] / (r2 * h)) * (m2 - m0)                  # Alg. 2, x_s (D_2 = m_2 - m_0)
    low = L * x + W[0] * m0 + (W[0] / (2.0 * r1)) * (m1 - m0)                 # DPM-Solver-2 with r1 = 1/3
    return high, low


# ------------------------------------------------------------------------------------------------ the sampler
def _calls_per_step(opts) -> int:
    if opts.get("variant", "multistep") == "singlestep":
        order = opts.get("order", 2)
        return int(order) if order in (1, 2, 3) else 1
    return 1


@register_sampler("dpm_solver",
                  variants=[{"order": 2, "variant": "multistep"}, {"order": 3, "variant": "multistep"},
                            {"order": 2, "variant": "singlestep"}, {"order": 3, "variant": "singlestep"},
                            {"order": 2, "variant": "multistep", "prediction": "eps"}],
                  nfe_per_step=_calls_per_step, lands_on_data=True)
def dpm_solver(ctx, x, grid, order: int = 2, variant: str = "multistep", prediction: str = "x0",
               lower_order_final: bool = True, thresholding: bool = False, threshold_ratio: float = 0.995,
               threshold_max: float = 1.0):
    """DPM-Solver(++) orders 1-3, multistep (1 call/step) or singlestep (order calls/step), in log-SNR."""
    order = check_order(order, (1, 2, 3), "dpm_solver")
    if variant not in VARIANTS:
        raise ValueError(f"dpm_solver's variant must be 'multistep' or 'singlestep', got {variant!r}")
    prediction = check_prediction(prediction)
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be True or False, got {lower_order_final!r}")
    thresh = check_threshold(thresholding, threshold_ratio, threshold_max)
    n = grid.num_steps
    hist: List[Tuple[float, Tensor]] = []
    for i in range(n):
        nt, ns = grid_node(grid, i), grid_node(grid, i + 1)
        m0 = model_output(ctx, x, nt, prediction, thresh)
        if variant == "multistep":
            hist = (hist + [(nt.lam, m0)])[-order:]
            k = len(hist)                                   # warm-up: lower orders until the history is full
            if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
                k = min(k, n - i)
            x = multistep_update(prediction, x, hist, nt, ns, k)
        elif order == 1 or ns.sigma == 0.0:
            x = first_order_step(prediction, x, m0, nt, ns)
        else:
            x, _ = singlestep_pair(ctx, prediction, thresh, x, m0, nt, ns, order)
        x = ctx.step_done(i, grid.t[i + 1], x)
    return x
