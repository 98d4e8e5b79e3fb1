"""Linear multistep (Adams–Bashforth) sampling in sigma-space: k-diffusion's LMS idea, on any Gaussian path.

**The ODE.**  For a path x_t = a_t x0 + sigma_t eps, write y = x / a and the noise-to-signal ratio
sigma~ = sigma / a = e^{-lambda}.  Then y = x0 + sigma~ eps, a variance-exploding path, and the probability flow is

    dy / dsigma~ = eps_hat(x, t),        x = a y,  t = t(sigma~)

(Song, Meng & Ermon 2021, DDIM eq. (14): d x_bar = eps_theta(x_bar / sqrt(sigma^2 + 1)) d sigma with
x_bar = x / sqrt(abar), sigma = sqrt((1 - abar)/abar); Karras et al. 2022, eq. (4) with s(t) = a, sigma(t) = sigma~:
dy/dsigma~ = -sigma~ grad_y log p(y; sigma~) = (y - D(y; sigma~)) / sigma~ = eps_hat).  The right-hand side is
the model's noise prediction, whatever output the model declares.

**The method.**  Adams–Bashforth with variable steps (Hairer, Norsett & Wanner, Solving ODEs I, sec. III.1 (Adams
methods) and III.5 (variable step sizes)): interpolate the last k derivatives d_{i-j} = eps_hat at sigma~_{i-j}
(j = 0..k-1) by the Lagrange polynomial and integrate it over [sigma~_i, sigma~_{i+1}]:

    y_{i+1} = y_i + sum_j c_ij d_{i-j},    c_ij = int_{sigma~_i}^{sigma~_{i+1}} l_j(tau) d tau,
    l_j(tau) = prod_{m != j} (tau - sigma~_{i-m}) / (sigma~_{i-j} - sigma~_{i-m}).

The integral of a degree k-1 polynomial is exact with k-point Gauss–Legendre quadrature, so c_ij are exact to
rounding (k-diffusion integrates the same polynomials with scipy's quad).  Order k = ``order`` (default 4), lower at
the start (k = i + 1 while the history is short).  sigma~ = 0 is an ordinary node in this variable, so the last step
of a grid that ends on the data lands there (x = a(0) y) with no extra network call.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from .base import register_sampler

__all__ = ["adams_bashforth_coefficients"]


def adams_bashforth_coefficients(nodes: List[float], target: float) -> List[float]:
    """c_j = int_{nodes[0]}^{target} l_j(tau) d tau for the Lagrange basis l_j on ``nodes`` (nodes[0] the current
    point, then earlier ones): exact Gauss–Legendre quadrature in u = (tau - nodes[0]) / (target - nodes[0])."""
    k = len(nodes)
    step = target - nodes[0]
    u_nodes = [(s - nodes[0]) / step for s in nodes]        # u_0 = 0, earlier nodes at u < 0
    g, w = np.polynomial.legendre.leggauss(k)                # exact for degree <= 2k - 1 on [-1, 1]
    u, w = 0.5 * (g + 1.0), 0.5 * w                          # on [0, 1]
    coeffs = []
    for j in range(k):
        lj = np.ones_like(u)
        for m in range(k):
            if m != j:
                lj = lj * (u - u_nodes[m]) / (u_nodes[j] - u_nodes[m])
        coeffs.append(float(step * np.dot(w, lj)))           # c_j = int l_j (Hairer et al. I, sec. III.5)
    return coeffs


@register_sampler("lms", variants=[{"order": 4}, {"order": 2}], lands_on_data=True)
def lms(ctx, x, grid, order: int = 4):
    """Linear multistep (Adams–Bashforth, order 1-4) on dy/dsigma~ = eps_hat with y = x/a, sigma~ = sigma/a."""
    if isinstance(order, bool) or order not in (1, 2, 3, 4):
        raise ValueError(f"LMS's order must be 1, 2, 3 or 4, got {order!r}")
    order = int(order)
    r = (grid.sigma / grid.a).tolist()                       # sigma~_i = sigma_i / a_i = e^{-lambda_i}
    ds: List[torch.Tensor] = []
    for i in range(grid.num_steps):
        a_i, _ = grid.coeffs(i, x)
        y = x / a_i
        ds = (ds + [ctx.predict(x, grid.t[i]).eps])[-order:]  # d_i = dy/dsigma~ = eps_hat (DDIM eq. (14))
        k = len(ds)                                          # min(i + 1, order): lower order at the start
        c = adams_bashforth_coefficients(r[i::-1][:k], r[i + 1])
        y = y + sum(cj * d for cj, d in zip(c, reversed(ds)))  # y_{i+1} = y_i + sum_j c_ij d_{i-j}
        a_next, _ = grid.coeffs(i + 1, x)
        x = ctx.step_done(i, grid.t[i + 1], a_next * y)
    return x
