"""SDE-DPM-Solver++(2M) and (3M): multistep data-prediction solvers of the reverse-time SDE family (Lu et al. 2022b's
SDE variant, as diffusers' ``sde-dpmsolver++`` and k-diffusion's ``dpmpp_2m_sde`` / ``dpmpp_3m_sde`` implement it).

**The SDE family.**  For eta >= 0, dx = [f x - (1 + eta)/2 g^2 grad log p_t] dt + sqrt(eta) g dW (reverse time) has
the marginals p_t of the path for every eta: eta = 0 is the probability flow, eta = 1 the reverse SDE.  With the
score written through the data prediction, grad log p = -(x - a x0_hat) / sigma^2, and g^2 dt = 2 sigma^2 |dlambda|,
it is linear in x in the log-SNR lambda; variation of constants over a step with h = lambda_s - lambda_t gives

    x_s = (sigma_s / sigma_t) e^{-eta h} x_t + (1 + eta) a_s int_0^h e^{-(1 + eta) u} x0_hat(lambda_s - u) du
          + sigma_s sqrt(1 - e^{-2 eta h}) z,          z ~ N(0, I)

(the noise variance is 2 eta sigma_s^2 int_0^h e^{-2 eta u} du).  With H = (1 + eta) h, the k-th lambda-derivative of
x0_hat at lambda_t enters with the weight a_s c_k(H) / (1 + eta)^k, c_k as in ``solvers.dpm_solver`` (c_0 = 1 - e^{-H},
c_1 = H - 1 + e^{-H}, c_2 = H^2/2 - H + 1 - e^{-H}).  Order 1 is DDIM with eta = 1 when eta = 1 (the posterior
q(x_s | x_t, x0_hat)).

* order 2 (2M SDE): the previous step's x0_hat, in the midpoint form of DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2):
  a_s c_0(H) [m_0 + (m_0 - m_1) h / (2 h_prev)] — diffusers' ``sde-dpmsolver++`` with ``solver_type="midpoint"``.
* order 3 (3M SDE): the quadratic through the last three x0_hat in lambda, its derivatives weighted by
  a_s c_1(H)/(1 + eta) and a_s c_2(H)/(1 + eta)^2.

The step to sigma = 0 (``denoise=True``) is first order and noiseless: x_0 = a_0 x0_hat (e^{-eta h} = e^{-H} = 0,
sigma_s = 0), as in ``dpm_solver``.  ``lower_order_final`` as in ``dpm_solver`` (fewer than 15 steps: the last steps use
order min(order, steps left)).  One call per step; the noise of each step from ``ctx.noise`` after its call (none on the
step to sigma = 0).  Multistep corrections of an SDE path are the heuristic of the implementations above: the path is
not smooth, so the order is not that of the ODE solver; they reduce the weak error at moderate step counts.
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .base import register_sampler
from .dpm_solver import (LOWER_ORDER_FINAL_BELOW, check_order, check_threshold, grid_node, model_output)

Tensor = torch.Tensor


@register_sampler("dpm_solver_sde", variants=[{"order": 2}, {"order": 3}, {"order": 2, "eta": 0.5}],
                  stochastic=lambda opts: float(opts.get("eta", 1.0)) > 0, lands_on_data=True)
def dpm_solver_sde(ctx, x, grid, order: int = 2, eta: float = 1.0, lower_order_final: bool = True,
                   thresholding: bool = False, threshold_ratio: float = 0.995, threshold_max: float = 1.0):
    """SDE-DPM-Solver++(2M)/(3M): data-prediction multistep solver of the reverse SDE (eta = 1), 1 call per step."""
    order = check_order(order, (2, 3), "dpm_solver_sde")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"dpm_solver_sde's eta must be a finite number >= 0 (0: probability flow, 1: reverse SDE), "
                         f"got {eta!r}")
    eta = float(eta)
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be True or False, got {lower_order_final!r}")
    thresh = check_threshold(thresholding, threshold_ratio, threshold_max)
    n = grid.num_steps
    hist: List[Tuple[float, Tensor]] = []
    for i in range(n):
        nt, ns = grid_node(grid, i), grid_node(grid, i + 1)
        m0 = model_output(ctx, x, nt, "x0", thresh)
        hist = (hist + [(nt.lam, m0)])[-order:]
        if ns.sigma == 0.0:
            x = ns.a * m0                                         # h = inf: e^{-eta h} = e^{-H} = 0, no noise
            x = ctx.step_done(i, grid.t[i + 1], x)
            continue
        k = len(hist)
        if lower_order_final and n < LOWER_ORDER_FINAL_BELOW:
            k = min(k, n - i)
        h = ns.lam - nt.lam
        H = (1.0 + eta) * h
        em = math.expm1(-H)                                       # e^{-H} - 1
        c0, c1, c2 = -em, H + em, 0.5 * H * H - H - em            # c_k(H), module doc
        out = (ns.sigma / nt.sigma) * math.exp(-eta * h) * x + (ns.a * c0) * m0
        if k == 2:
            lam1, m1 = hist[-2]
            out = out + (ns.a * c0 * h / (2.0 * (nt.lam - lam1))) * (m0 - m1)       # midpoint form of Alg. 2
        elif k == 3:
            (lam2, m2), (lam1, m1) = hist[-3], hist[-2]
            h0, h1 = nt.lam - lam1, lam1 - lam2
            f01, f12 = (m0 - m1) / h0, (m1 - m2) / h1
            f012 = (f01 - f12) / (h0 + h1)
            d1, d2 = f01 + h0 * f012, 2.0 * f012                  # p'(lam_t), p''(lam_t) of the quadratic
            out = out + (ns.a * c1 / (1.0 + eta)) * d1 + (ns.a * c2 / (1.0 + eta) ** 2) * d2
        if eta > 0:
            out = out + (ns.sigma * math.sqrt(-math.expm1(-2.0 * eta * h))) * ctx.noise(x)
        x = ctx.step_done(i, grid.t[i + 1], out)
    return x
