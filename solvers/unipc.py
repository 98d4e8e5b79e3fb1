"""UniPC (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"): the multistep predictor UniP-p followed by the corrector UniC-p, stepping in lambda = log(a/sigma).

**The exact solution it approximates.**  For any Gaussian path x_t = a_t x0 + sigma_t eps the probability flow,
solved by variation of constants in lambda (Lu et al. 2022a, DPM-Solver, eq. (3.4); Lu et al. 2022b, DPM-Solver++,
sec. 4.1 for the data-prediction form), is from s to t (h = lambda_t - lambda_s > 0)

    data prediction:   x_t = (sigma_t/sigma_s) x_s + alpha_t int_{lambda_s}^{lambda_t} e^{-(lambda_t - l)} x0_hat(l) dl
    noise prediction:  x_t = (alpha_t/alpha_s) x_s - sigma_t int_{lambda_s}^{lambda_t} e^{+(lambda_t - l)} eps_hat(l) dl

(alpha = a, the path's mean coefficient).  Expanding the prediction m(l) = x0_hat or eps_hat in Taylor series about
lambda_s, each integral is sum_{k>=0} h^{k+1} phi_{k+1}(hh) m^(k)_s with hh = -h (data) or +h (noise) and
phi_k(z) = sum_{j>=0} z^j / (j+k)!  (the exponential integrator's phi-functions).

**UniPC's update** (Zhao et al. 2023, sec. 3.1 (UniC) and 3.2 (UniP), in the noise-prediction form there and the
data-prediction form of their appendix and reference code).  With earlier nodes s_1, s_2, ...
(r_m = (lambda_{s_m} - lambda_s)/h < 0) and D_m = m(s_m) - m(s),

    x_t = [first-order (DDIM) part] - c_t B(hh) sum_m a_m D_m / r_m,       c_t = alpha_t (data) or sigma_t (noise),

where the a_m solve the order conditions  sum_m a_m r_m^{k-1} = k! hh phi_{k+1}(hh) / B(hh)  (k = 1, 2, ...; the
matrix R_p of powers of r_m against the vector phi_p(h)/B(h) of the paper): D_m / r_m = sum_k r_m^{k-1} h^k/k! m^(k),
so these conditions reproduce the Taylor terms above.  B is a free O(h) function: "bh1" B = hh, "bh2" B = e^{hh} - 1.
When the system is solved exactly B cancels; it matters where the paper (and its reference implementation, and
diffusers) use the simplified coefficient a_1 = 1/2: UniP-2 (one earlier node) and UniC-1.  Since
k! hh phi_2(hh)/B = 1/2 + O(h) for either B, that changes the local error only at O(h^3), within the method's order.

* **UniP-p** (predictor) uses m(s) and p - 1 earlier nodes: conditions k = 1..p-1; local error O(h^{p+1}), order p.
* **UniC-p** (corrector) adds the node t itself (r_p = 1, D_p = m(x_t_predicted, t) - m(s)) to the same p - 1 earlier
  nodes: conditions k = 1..p, order p + 1 (Zhao et al. 2023, sec. 3.1, the order theorem for UniC-p).  It re-solves
  the step s -> t from the corrected x_s with the model output at the *predicted* x_t — the call the next predictor
  step needs anyway — so it costs no network call.  That output is what enters the history (the reference
  implementation's and diffusers' choice: the model is never evaluated at the corrected point).

**Order schedule.**  Step i (0-based, n steps) uses order p_i = min(order, i + 1) (warm-up: history is short), and
with ``lower_order_final`` also p_i <= n - i (diffusers' default).  The corrector after step i - 1 uses p_{i-1}.  No
corrector follows the last step (no model call at the final node).

**The final step to the data (h = inf).**  With ``denoise`` the grid ends at t = 0 with sigma = 0, lambda = +inf.
There the Taylor expansion of m over [lambda_s, inf) has no limit for orders > 1 (the polynomial extrapolation of m in
lambda diverges where the weight e^{-(lambda_t - l)} concentrates), so the last step is always first order, taken as
the limit h -> inf of the first-order formula: e^{-h} = sigma_t alpha_s / (alpha_t sigma_s) = 0 gives
x_t = alpha_t x0_hat(s) (data prediction) and, since sigma_t (e^h - 1) = alpha_t sigma_s / alpha_s - sigma_t,
x_t = (alpha_t/alpha_s)(x_s - sigma_s eps_hat(s)) (noise prediction): Tweedie's x0_hat at the last positive node
(with noise prediction formed from the corrected x_s), from the model call made there — no extra call, no inf
arithmetic.  (diffusers' ``final_sigmas_type="zero"`` computes the
same data-prediction limit through expm1(-inf) = -1; its noise-prediction and bh1 branches produce 0 * inf = nan.)
"""
from __future__ import annotations

import math
from typing import List, Tuple

import torch

from .base import register_sampler

__all__ = ["phi", "unipc_coefficients"]


def phi(k: int, z: float) -> float:
    """phi_k(z) = sum_{j>=0} z^j / (j+k)!  (phi_0 = e^z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z); a series for |z| < 1/2
    (the recursion loses ~k digits there), the recursion from phi_1 = expm1(z)/z otherwise."""
    if abs(z) < 0.5:
        term = 1.0 / math.factorial(k)
        total = term
        for j in range(1, 40):
            term *= z / (j + k)
            total += term
        return total
    if k == 0:
        return math.exp(z)
    val = math.expm1(z) / z
    for j in range(1, k):
        val = (val - 1.0 / math.factorial(j)) / z
    return val


def unipc_coefficients(h: float, rs: List[float], data: bool, variant: str,
                       corrector: bool) -> Tuple[float, List[float]]:
    """B(hh) and the a_m of one UniP (``corrector=False``: rs are the p-1 earlier nodes' r_m) or UniC step
    (``corrector=True``: rs are the p-1 earlier nodes, r_p = 1 is appended), for a finite step h > 0 in lambda.

    Order conditions (Zhao et al. 2023, sec. 3.1-3.2, R_p(h) a_p = phi_p(h) / B(h)):
    sum_m a_m r_m^{k-1} = k! hh phi_{k+1}(hh) / B(hh), k = 1..len(r)."""
    hh = -h if data else h
    B = hh if variant == "bh1" else math.expm1(hh)          # Zhao et al. 2023, sec. 3.1: B(h) = h or e^h - 1
    r = list(rs) + ([1.0] if corrector else [])
    K = len(r)
    if K == 0:
        return B, []
    if K == 1:
        # UniP-2 and UniC-1: the paper's simplified a_1 = 1/2 (= the exact solution up to O(h))
        return B, [0.5]
    R = torch.tensor([[rm ** (k - 1) for rm in r] for k in range(1, K + 1)], dtype=torch.float64)
    g = torch.tensor([math.factorial(k) * hh * phi(k + 1, hh) / B for k in range(1, K + 1)], dtype=torch.float64)
    return B, torch.linalg.solve(R, g).tolist()           # R_p a_p = phi_p(h) / B(h)


def _first_order(x, m_s, a_s, s_s, a_t, s_t, h, data: bool):
    """The UniP-1 (= DDIM) part of a step s -> t in lambda; h = inf (s_t = 0) is its exact limit."""
    if s_t == 0:                                                    # h = +inf, e^{-h} = 0
        return a_t * m_s if data else (a_t / a_s) * (x - s_s * m_s)
    if data:                                                        # DPM-Solver++ sec. 4.1, first order
        return (s_t / s_s) * x - a_t * math.expm1(-h) * m_s
    return (a_t / a_s) * x - s_t * math.expm1(h) * m_s             # DPM-Solver eq. (3.4), first order


def _uni_step(x, hist, lam_t, a_t, s_t, order: int, data: bool, variant: str, m_t=None):
    """One UniP-p step (m_t None) or UniC-p step (m_t: the model output at the predicted x_t) from the last history
    node s = hist[-1] to t, using the p - 1 nodes before it.  hist: [(lambda, a, sigma, m)], oldest first."""
    lam_s, a_s, s_s, m_s = hist[-1]
    h = lam_t - lam_s
    x_t = _first_order(x, m_s, a_s, s_s, a_t, s_t, h, data)
    if order == 1 and m_t is None:
        return x_t
    earlier = hist[-order:-1][::-1]                                 # s_1 = previous node, s_2, ...
    rs = [(lam_m - lam_s) / h for lam_m, _, _, _ in earlier]
    Ds = [(m_m - m_s) / r for (_, _, _, m_m), r in zip(earlier, rs)]  # D_m / r_m
    if m_t is not None:
        Ds.append(m_t - m_s)                                        # r_p = 1, D_p = m(t) - m(s)
    B, coeff = unipc_coefficients(h, rs, data, variant, corrector=m_t is not None)
    c_t = a_t if data else s_t
    # Zhao et al. 2023, sec. 3.1 (UniC) / 3.2 (UniP): x_t = x_t^(1) - c_t B(h) sum_m a_m D_m / r_m
    return x_t - (c_t * B) * sum(am * D for am, D in zip(coeff, Ds))


@register_sampler("unipc", variants=[{"order": 2}, {"order": 3}], lands_on_data=True)
def unipc(ctx, x, grid, order: int = 2, prediction: str = "data", variant: str = "bh2", corrector: bool = True,
          lower_order_final: bool = True):
    """UniPC: UniP-p predictor + UniC-p corrector (no extra call), data or noise prediction, order 1-3, bh1/bh2."""
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"UniPC's order must be 1, 2 or 3, got {order!r}")
    order = int(order)
    if prediction not in ("data", "noise"):
        raise ValueError(f"UniPC's prediction must be 'data' (x0) or 'noise' (eps), got {prediction!r}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC's variant must be 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1), got {variant!r}")
    for name, flag in (("corrector", corrector), ("lower_order_final", lower_order_final)):
        if not isinstance(flag, bool):
            raise ValueError(f"UniPC's {name} must be True or False, got {flag!r}")
    data = prediction == "data"
    n = grid.num_steps
    hist: List[tuple] = []                 # (lambda, a, sigma, m) at the last `order` nodes, m at the predicted x
    x_prev = None                          # the (corrected) state at the previous node
    p_prev = 0
    for i in range(n):
        a_i, s_i = float(grid.a[i]), float(grid.sigma[i])
        lam_i = float(grid.lam[i])
        pred = ctx.predict(x, grid.t[i])
        m = pred.x0 if data else pred.eps
        if corrector and i > 0:
            # UniC-p_{i-1} on the step i-1 -> i, reusing this call (Zhao et al. 2023, sec. 3.1)
            x = _uni_step(x_prev, hist, lam_i, a_i, s_i, p_prev, data, variant, m_t=m)
        hist = (hist + [(lam_i, a_i, s_i, m)])[-order:]
        p = min(order, i + 1)                                       # warm-up
        if lower_order_final:
            p = min(p, n - i)
        a_t, s_t, lam_t = float(grid.a[i + 1]), float(grid.sigma[i + 1]), float(grid.lam[i + 1])
        if s_t == 0:
            p = 1                                                   # h = inf: first order only (module doc)
        x_prev = x
        x = _uni_step(x, hist, lam_t, a_t, s_t, p, data, variant)  # UniP-p (Zhao et al. 2023, sec. 3.2)
        p_prev = p
        x = ctx.step_done(i, grid.t[i + 1], x)
    return x
