"""Measured convergence orders on ladders of step counts, with exact scores.

ODE solvers are compared with the exact probability-flow map of a Gaussian target: in the eigenbasis of its
covariance, p_t = N(a_t mu, a_t^2 lam + sigma_t^2) and the flow moves each coordinate by the ratio of standard
deviations, x_s - a_s mu = sqrt(v_s / v_t) (x_t - a_t mu).  That is deterministic, so the error has no Monte Carlo
part.  Euler–Maruyama's weak error is measured on E[x^2] with 200 000 paths, where discretisation error (>= 2e-2)
dwarfs the Monte Carlo standard error (~2.4e-3).
"""
import math

import numpy as np
import pytest
import torch

import solvers
from sde_diffusion import sdes, targets

F64 = dict(dtype=torch.float64)
EPS = 1e-3


def _rotated_gaussian():
    th = 0.6
    U = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], **F64)
    lam = torch.tensor([0.3, 2.0], **F64)
    mu = torch.tensor([1.0, -0.5], **F64)
    return targets.Gaussian(mu, U @ torch.diag(lam) @ U.T), U, lam, mu


def _exact_flow(sde, x_T, U, lam, mu):
    a_T, s_T = sde.marginal_coeffs(sde.T)
    a_e, s_e = sde.marginal_coeffs(EPS)
    ratio = torch.sqrt((a_e ** 2 * lam + s_e ** 2) / (a_T ** 2 * lam + s_T ** 2))
    return a_e * mu + (((x_T - a_T * mu) @ U) * ratio) @ U.T


@pytest.mark.parametrize("solver,ladder,order", [
    ("euler", [16, 32, 64, 128], 1.0),
    ("heun", [8, 16, 32, 64], 2.0),
    ("rk4", [8, 16, 32, 64], 4.0),
])
@pytest.mark.parametrize("sde_name", ["vp", "subvp"])
def test_ode_solver_orders(solver, ladder, order, sde_name):
    sde = sdes.get_sde(sde_name)
    target, U, lam, mu = _rotated_gaussian()
    x_T = 1.2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu)
    errs = []
    for n in ladder:
        res = solvers.sample(sde, target.score_fn(sde), x_T.shape, "ode", n, x_init=x_T, eps=EPS,
                             denoise=False, dtype=torch.float64, solver=solver)
        errs.append(float((res.samples - exact).abs().max()))
    slope = -np.polyfit(np.log(ladder), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (solver, slope, errs)


def test_ddim_converges_at_first_order_to_the_exact_flow():
    sde = sdes.VPSDE()
    target, U, lam, mu = _rotated_gaussian()
    x_T = 1.2 * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu)
    ladder = [10, 20, 40, 80]
    errs = [float((solvers.sample(sde, target.score_fn(sde), x_T.shape, "ddim", n, x_init=x_T, eps=EPS,
                                  denoise=False, dtype=torch.float64).samples - exact).abs().max()) for n in ladder]
    slope = -np.polyfit(np.log(ladder), np.log(errs), 1)[0]
    assert abs(slope - 1.0) < 0.3, (slope, errs)


def test_euler_maruyama_weak_order_one():
    sde = sdes.VPSDE()
    target = targets.Gaussian([1.0], [[0.25]])
    n = 200_000
    a_T, s_T = sde.marginal_coeffs(sde.T)
    a_e, s_e = sde.marginal_coeffs(EPS)
    second_moment = float(a_e ** 2 * (1.0 + 0.25) + s_e ** 2)      # E[x_eps^2] under p_eps
    ladder, errs = [16, 32, 64], []
    for steps in ladder:
        gen = torch.Generator().manual_seed(1)
        x_T = a_T * target.sample(n, generator=gen) + s_T * torch.randn(n, 1, generator=gen, **F64)
        res = solvers.sample(sde, target.score_fn(sde), (n, 1), "euler_maruyama", steps, generator=gen,
                             x_init=x_T, eps=EPS, denoise=False, dtype=torch.float64)
        errs.append(abs(float((res.samples ** 2).mean()) - second_moment))
    se = math.sqrt(float((res.samples ** 2).var()) / n)
    assert min(errs) > 5 * se                        # discretisation dominates Monte Carlo error
    slope = -np.polyfit(np.log(ladder), np.log(errs), 1)[0]
    assert abs(slope - 1.0) < 0.3, (slope, errs)


def test_adaptive_rk45_meets_its_tolerance():
    sde = sdes.VPSDE()
    target, U, lam, mu = _rotated_gaussian()
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(2), **F64)
    exact = _exact_flow(sde, x_T, U, lam, mu)
    loose = solvers.sample(sde, target.score_fn(sde), x_T.shape, "rk45", 1, x_init=x_T, eps=EPS, denoise=False,
                           dtype=torch.float64, rtol=1e-4, atol=1e-4)
    tight = solvers.sample(sde, target.score_fn(sde), x_T.shape, "rk45", 1, x_init=x_T, eps=EPS, denoise=False,
                           dtype=torch.float64, rtol=1e-8, atol=1e-8)
    e_loose = float((loose.samples - exact).abs().max())
    e_tight = float((tight.samples - exact).abs().max())
    assert e_tight < 1e-6 and e_tight < e_loose and tight.nfe > loose.nfe
