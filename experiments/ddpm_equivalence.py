"""The VP SDE's discretisation is the DDPM chain: checked against the chain written out by hand.

1. ``VPSDE.discretize`` stepped over the grid t_i = i/(N-1) with dt = 1/N, against DDPM's
   x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z_i with beta_i = (beta_min + i/(N-1) (beta_max - beta_min)) / N
   computed independently in numpy, both driven by the same noise z_i: the largest difference over all steps and
   samples (float64), and the betas / cumulative alphas against ``discrete_betas`` / ``alphas_cumprod``.  The generic
   Euler–Maruyama step (``SDE.discretize``: f = -1/2 beta x dt, G = sqrt(beta dt)) is run beside it: it differs from
   DDPM by O(beta_i^2) per step, O(1/N) in total.
2. alphabar_i = prod_{j <= i} (1 - beta_j) against the continuous exp(-int_0^{s_i} beta), s_i = (i+1)/N: the error at
   the end (s = 1) and the largest over the chain, as N grows, with the measured rate (expected 1).

``python -m experiments.ddpm_equivalence [--quick] [--out DIR]``
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from experiments._common import Checks, Report, Table, fit_order, make_parser, parse_and_run, prepare_out, pyplot
from sde_diffusion import sdes

NAME = "ddpm_equivalence"
F64 = torch.float64


def ddpm_betas(beta_min: float, beta_max: float, N: int) -> np.ndarray:
    """DDPM's linear schedule in the VP SDE's scaling: beta_i = beta(t_i) / N, t_i = i / (N - 1)."""
    i = np.arange(N, dtype=np.float64)
    return (beta_min + i / (N - 1) * (beta_max - beta_min)) / N


def ddpm_chain(x0: np.ndarray, betas: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The DDPM forward chain by hand: returns the states after every step, shape (N, *x0.shape)."""
    out = np.empty((betas.size,) + x0.shape)
    x = x0
    for i, b in enumerate(betas):
        x = math.sqrt(1.0 - b) * x + math.sqrt(b) * z[i]
        out[i] = x
    return out


def sde_chain(sde: sdes.VPSDE, x0: torch.Tensor, z: torch.Tensor, euler: bool = False) -> torch.Tensor:
    """The same chain through the SDE object: x <- x + f + G z with (f, G) = discretize(x, t_i, 1/N).

    ``euler=True`` uses the generic Euler–Maruyama step of the base class instead of VP's DDPM step.
    """
    N = sde.N
    step = (lambda x, t, dt: sdes.SDE.discretize(sde, x, t, dt)) if euler else sde.discretize
    out = torch.empty((N,) + tuple(x0.shape), dtype=F64)
    x = x0
    for i in range(N):
        t = torch.tensor(i / (N - 1), dtype=F64)
        f, G = step(x, t, torch.tensor(1.0 / N, dtype=F64))
        x = x + f + G * z[i]
        out[i] = x
    return out


def continuous_alphabar(sde: sdes.VPSDE, s) -> np.ndarray:
    """exp(-int_0^s beta) = a(s)^2 of the continuous VP marginal."""
    a, _ = sde.marginal_coeffs(torch.as_tensor(s, dtype=F64))
    return (a ** 2).numpy()


def main(argv: Optional[Sequence[str]] = None):
    p = make_parser(NAME, __doc__.split("\n")[0])
    p.add_argument("--beta-min", type=float, default=0.1)
    p.add_argument("--beta-max", type=float, default=20.0)
    return parse_and_run(p, run, argv)


def run(args):
    quick = args.quick
    out = prepare_out(args.out)
    plt = pyplot()
    report = Report(out, "The VP discretisation against the DDPM chain" + (" (quick)" if quick else ""))
    check = Checks(quick)
    bmin, bmax = args.beta_min, args.beta_max
    rng = np.random.default_rng(args.seed)
    B = 500 if quick else 2000

    # ---- 1. chain against chain
    chain_Ns = [25, 100, 400, 1000] if quick else [25, 50, 100, 200, 500, 1000, 2000]
    tab = Table("chain", ["N", "max |VPSDE.discretize chain - DDPM chain|", "max |discrete_betas - beta_i|",
                          "max |alphas_cumprod - prod(1 - beta)|", "max |Euler-Maruyama chain - DDPM chain|"],
                title=f"1. VP (beta {bmin} -> {bmax}) discretisation vs the DDPM chain written out by hand "
                      f"({B} samples, same noise, float64)")
    em_gaps, trajectories = [], None
    for N in chain_Ns:
        sde = sdes.VPSDE(bmin, bmax, N)
        betas = ddpm_betas(bmin, bmax, N)
        x0 = rng.normal(size=(B, 2)) * np.array([1.0, 0.3]) + np.array([1.0, -0.5])
        z = rng.normal(size=(N, B, 2))
        ref = ddpm_chain(x0, betas, z)
        ours = sde_chain(sde, torch.from_numpy(x0), torch.from_numpy(z)).numpy()
        em = sde_chain(sde, torch.from_numpy(x0), torch.from_numpy(z), euler=True).numpy()
        gap = float(np.abs(ours - ref).max())
        beta_gap = float(np.abs(sde.discrete_betas.numpy() - betas).max())
        ac_gap = float(np.abs(sde.alphas_cumprod.numpy() - np.cumprod(1 - betas)).max())
        em_gap = float(np.abs(em - ref).max())
        em_gaps.append(em_gap)
        tab.add(N=N, **{"max |VPSDE.discretize chain - DDPM chain|": gap, "max |discrete_betas - beta_i|": beta_gap,
                        "max |alphas_cumprod - prod(1 - beta)|": ac_gap,
                        "max |Euler-Maruyama chain - DDPM chain|": em_gap})
        check(gap < 1e-12, f"N = {N}: VPSDE.discretize chain = DDPM chain (max diff {gap:.2g} < 1e-12)")
        check(beta_gap < 1e-15 and ac_gap < 1e-12, f"N = {N}: discrete_betas / alphas_cumprod match the hand-written "
                                                    f"schedule ({beta_gap:.2g}, {ac_gap:.2g})")
        if N == 100:
            trajectories = (ref.reshape(N, -1), ours.reshape(N, -1), em.reshape(N, -1))
    big = [i for i, N in enumerate(chain_Ns) if N >= 100]       # beta_max / N <= 0.2: the asymptotic regime
    em_rate = -fit_order([chain_Ns[i] for i in big], [em_gaps[i] for i in big])
    report.table(tab)
    report.note(f"Euler–Maruyama vs DDPM: the gap shrinks as N^-{em_rate:.2f} for N >= 100 "
                f"(expected N^-1: sqrt(1 - b) = "
                f"1 - b/2 - b^2/8 - ..., an O(N^-2) difference per step over N steps).")
    check(0.85 <= em_rate <= 1.15, f"Euler–Maruyama chain -> DDPM chain at rate {em_rate:.2f} in [0.85, 1.15]")

    # ---- 2. alphabar against the continuous marginal
    # N > beta_max keeps every beta_i < 1 (the chain needs it)
    Ns = [30, 100, 300, 1000, 3000, 10000] if quick else [30, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000]
    sde_c = sdes.VPSDE(bmin, bmax, 1000)     # only its continuous marginal is used
    end_exact = float(continuous_alphabar(sde_c, 1.0))
    ab_tab = Table("alphabar", ["N", "alphabar_N", "exp(-int_0^1 beta)", "|end error|", "N x |end error|",
                                "max_i |alphabar_i - exp(-int_0^{s_i} beta)|", "N x max error"],
                   title="2. alphabar_i = prod_{j<=i} (1 - beta_j) against exp(-int_0^{s_i} beta), s_i = (i+1)/N")
    end_err, max_err = [], []
    for N in Ns:
        betas = ddpm_betas(bmin, bmax, N)
        ab = np.cumprod(1.0 - betas)
        s = np.arange(1, N + 1) / N
        cont = continuous_alphabar(sde_c, s)
        e_end = abs(ab[-1] - end_exact)
        e_max = float(np.abs(ab - cont).max())
        end_err.append(e_end)
        max_err.append(e_max)
        ab_tab.add(N=N, **{"alphabar_N": ab[-1], "exp(-int_0^1 beta)": end_exact, "|end error|": e_end,
                           "N x |end error|": N * e_end, "max_i |alphabar_i - exp(-int_0^{s_i} beta)|": e_max,
                           "N x max error": N * e_max})
    # fit the rates for N >= 300 (beta_max / N <= 1/15): below that the higher orders sum_i beta_i^k / k, about
    # int beta^k / (k N^(k-1)), are not yet small beside the first (int beta^2 / (2N)), as the N x error column shows
    fit = [i for i, N in enumerate(Ns) if N >= 300]
    end_rate = -fit_order([Ns[i] for i in fit], [end_err[i] for i in fit], floor=1e-14)
    max_rate = -fit_order([Ns[i] for i in fit], [max_err[i] for i in fit], floor=1e-14)
    report.table(ab_tab)
    report.note(f"Measured rates (N >= 300): end error ~ N^-{end_rate:.3f}, "
                f"largest error along the chain ~ N^-{max_rate:.3f} "
                f"(expected 1: sum_i beta_i equals int_0^1 beta exactly on this grid, so the end error is the "
                f"second-order term exp(-int beta) sum_i beta_i^2 / 2 ~ int beta^2 / (2N); along the chain the grid "
                f"t_i = i/(N-1) and the clock s_i = (i+1)/N also differ by O(1/N)).")
    check(0.9 <= end_rate <= 1.1, f"alphabar_N -> exp(-int beta) at rate {end_rate:.3f} in [0.9, 1.1]")
    check(0.9 <= max_rate <= 1.1, f"max_i |alphabar_i - continuous| at rate {max_rate:.3f} in [0.9, 1.1]")
    # the constant of the end error: int_0^1 beta^2 / 2 * exp(-int beta)
    c_theory = (bmin ** 2 + bmin * (bmax - bmin) + (bmax - bmin) ** 2 / 3) / 2 * end_exact
    c_meas = Ns[-1] * end_err[-1]
    report.note(f"N x end error at N = {Ns[-1]}: {c_meas:.6g}; predicted (1/2) int_0^1 beta^2 exp(-int beta) = "
                f"{c_theory:.6g}.")
    check(abs(c_meas / c_theory - 1) < 0.05, f"end error constant {c_meas:.4g} within 5% of the prediction "
                                             f"{c_theory:.4g}")

    # ---- figure
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    tt = np.linspace(0, 1, 400)
    axes[0].plot(tt, continuous_alphabar(sde_c, tt), "k-", lw=1.2, label="exp(-int_0^t beta)")
    for N in (25, 50, 100):
        ab = np.cumprod(1.0 - ddpm_betas(bmin, bmax, N))
        axes[0].plot(np.arange(1, N + 1) / N, ab, "o--", ms=3, label=f"alphabar_i, N = {N}")
    axes[0].set_xlabel("t (s_i = (i+1)/N)")
    axes[0].set_title("alphabar vs the continuous VP marginal")
    axes[0].legend(fontsize=8)
    axes[1].loglog(Ns, end_err, "o-", label=f"end error (rate {end_rate:.2f})")
    axes[1].loglog(Ns, max_err, "s-", label=f"max along the chain (rate {max_rate:.2f})")
    axes[1].loglog(chain_Ns, em_gaps, "^-", label=f"EM chain - DDPM chain (rate {em_rate:.2f})")
    Na = np.array(Ns, dtype=float)
    axes[1].loglog(Na, max_err[0] * Na[0] / Na, "k:", lw=0.8, label="slope -1")
    axes[1].set_xlabel("N")
    axes[1].set_title("errors vs N")
    axes[1].legend(fontsize=8)
    if trajectories is not None:
        ref, ours, em = trajectories
        steps = np.arange(1, ref.shape[0] + 1)
        axes[2].semilogy(steps, np.abs(ours - ref).max(1) + 1e-18, "-", label="VPSDE.discretize chain")
        axes[2].semilogy(steps, np.abs(em - ref).max(1) + 1e-18, "-", label="Euler–Maruyama chain")
        axes[2].set_xlabel("step i (N = 100)")
        axes[2].set_title("max |chain - DDPM chain| along the chain (same noise)", fontsize=9)
        axes[2].legend(fontsize=8)
    report.figure(fig, "ddpm_equivalence", "VP discretisation vs the DDPM chain")
    check.finish(report)
    return dict(end_rate=end_rate, max_rate=max_rate, em_rate=em_rate)


if __name__ == "__main__":
    main()
