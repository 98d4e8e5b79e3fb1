"""Which sampler, how many steps: every registered sampler (and each of its variants) over an NFE ladder.

Targets with exact scores (``sde_diffusion.targets``), on the VP SDE (beta 0.1 -> 20):
  * ``gauss``: a Gaussian with an image-like spectrum — variances log-spaced over four decades (1e-4 .. 1) in 64
    dimensions (16 in --quick), rotated by a fixed random orthogonal matrix; error = KL(N(sample moments) || truth).
    Sampled down to eps = 1e-5, so that the last noise level (sigma^2 ~ 1e-6) sits below the smallest variance.
  * ``ring``: eight Gaussians (std 0.1) on the unit circle (the ``toy_2d`` law); error = sliced W1 to as many exact
    draws as there are samples, with the mode-wise W2 and the error of the mode weights beside it.  (W1, not W2:
    moving a mass dw between modes a distance L apart costs L dw in W1 but L sqrt(dw) in W2, so W2's sampling noise
    from the mode weights decays only as n^-1/4.)
  * ``bimodal``: 0.3 N(-1, 0.2^2) + 0.7 N(1, 0.2^2) (the ``toy_1d`` law); error = W1 to the analytic CDF.
Every sampler in ``solvers.available()`` with every entry of ``get_sampler(m).variants`` runs on the ``uniform`` and
``edm`` time grids, all from the same prior draw (common random numbers); ``num_steps`` is chosen so that the NFE
actually used (``SampleResult.nfe``, the grid's landing step on x0_hat included) is as close as possible to each rung
of the ladder — the NFE per step of each sampler is measured, not assumed.  Adaptive samplers (``kind == "adaptive"``,
e.g. RK45) run over a tolerance ladder instead.
A noise-floor row per target scores fresh exact samples the same way (mean of five draws).  New samplers join automatically.

With ``--workdir DIR`` the same ladder runs on a trained checkpoint (``run.checkpoints.load_score_fn``), scored by
the sliced W1 to held-out data (energy distance beside it).

``python -m experiments.compare_solvers [--quick] [--out DIR] [--targets gauss,ring,bimodal] [--workdir DIR]``
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

import solvers
from experiments._common import (Checks, Report, Table, fmt, make_parser, parse_and_run, prepare_out, progress,
                                 pyplot)
from sde_diffusion import metrics, sdes, targets

NAME = "compare_solvers"


# ================================================================================================ targets
class Target:
    """An analytic target: the exact score, an error function of samples, and where to stop (eps)."""

    def __init__(self, name: str, description: str, dist, error_name: str, error_fn: Callable, eps: float,
                 extras: Optional[Callable] = None):
        self.name, self.description, self.dist = name, description, dist
        self.error_name, self.error_fn, self.eps, self.extras = error_name, error_fn, eps, extras

    @property
    def dim(self) -> int:
        return self.dist.dim


def gauss_target(dim: int, seed: int = 0) -> Target:
    g = torch.Generator().manual_seed(1000 + seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.logspace(-4, 0, dim, dtype=torch.float64)
    dist = targets.Gaussian(torch.zeros(dim, dtype=torch.float64), Q @ torch.diag(lam) @ Q.T)

    def error(x):
        return metrics.gaussian_kl_from_samples(x, dist.mean, dist.cov)

    def extras(x):
        m, C = metrics.sample_moments(x)
        return {"W2 (Gaussian fit)": metrics.gaussian_w2(m, C, dist.mean, dist.cov)}
    return Target("gauss", f"Gaussian in {dim}-D, variances log-spaced 1e-4..1, rotated", dist,
                  "KL(fit || truth) [nats]", error, eps=1e-5, extras=extras)


def ring_target(seed: int = 0, n_ref: int = 10000) -> Target:
    K = 8
    ang = 2 * math.pi * torch.arange(K, dtype=torch.float64) / K
    dist = targets.GaussianMixture(torch.ones(K), torch.stack([ang.cos(), ang.sin()], 1), 0.1 ** 2)
    ref = dist.sample(n_ref, torch.Generator().manual_seed(2000 + seed))
    proj = metrics.random_directions(2, 128, torch.Generator().manual_seed(7))

    def error(x):
        return metrics.sliced_wasserstein(x, ref, projections=proj, p=1)

    def extras(x):
        r = metrics.modewise_w2(x, dist)
        return {"mode-wise W2": r["mean_w2"], "weight TV": r["weight_tv"]}
    return Target("ring", "8 Gaussians (std 0.1) on the unit circle", dist, "sliced W1 to exact draws", error,
                  eps=1e-3, extras=extras)


def bimodal_target() -> Target:
    from scipy import stats
    dist = targets.GaussianMixture([0.3, 0.7], [[-1.0], [1.0]], [0.2 ** 2, 0.2 ** 2])
    w, mu, sd = dist.weights.numpy(), dist.means[:, 0].numpy(), np.sqrt(dist.covs[:, 0, 0].numpy())

    def cdf(x):
        return (w * stats.norm.cdf((np.asarray(x)[..., None] - mu) / sd)).sum(-1)

    def error(x):
        return metrics.wasserstein1_to_cdf(x, cdf)

    def extras(x):
        return {"KS": float(stats.kstest(np.asarray(x, dtype=float).reshape(-1), cdf).statistic)}
    return Target("bimodal", "0.3 N(-1, 0.2^2) + 0.7 N(1, 0.2^2) in 1-D", dist, "W1 to the analytic CDF", error,
                  eps=1e-3, extras=extras)


# ================================================================================================ samplers
class SamplerConfig:
    def __init__(self, method: str, options: Dict, fixed: bool):
        self.method, self.options, self.fixed = method, dict(options), fixed
        self.per_step: Optional[int] = None
        self.offset: Optional[int] = None

    @property
    def label(self) -> str:
        if not self.options:
            return self.method
        return f"{self.method}[{', '.join(f'{k}={v}' for k, v in self.options.items())}]"

    def steps_for(self, nfe: int) -> int:
        """The num_steps whose NFE (per_step * steps + offset) is closest to ``nfe``."""
        return max(1, int(round((nfe - self.offset) / self.per_step)))


def sampler_configs(sde) -> List[SamplerConfig]:
    """Every registered sampler and variant, with its NFE per step measured on a small problem."""
    out = []
    score = lambda x, t: -x                                     # noqa: E731  (any finite score will do)
    for method in solvers.available():
        info = solvers.get_sampler(method)
        for variant in info.variants:
            cfg = SamplerConfig(method, variant, bool(info.fixed_steps(variant)))
            if cfg.fixed:
                n1 = solvers.sample(sde, score, (2, 1), method, 40, **variant).nfe
                n2 = solvers.sample(sde, score, (2, 1), method, 41, **variant).nfe
                cfg.per_step, cfg.offset = n2 - n1, n1 - 40 * (n2 - n1)
                if cfg.per_step < 1:
                    raise RuntimeError(f"{cfg.label}: NFE does not grow with num_steps ({n1}, {n2})")
            out.append(cfg)
    return out


def run_one(sde, score_fn, shape, cfg: SamplerConfig, steps: int, schedule: str, eps: float, seed: int,
            dtype=torch.float32, extra_options: Optional[Dict] = None):
    """One sampling run: (samples float64 or None, nfe, wall seconds, status)."""
    gen = torch.Generator().manual_seed(seed)
    opts = dict(cfg.options, **(extra_options or {}))
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            res = solvers.sample(sde, score_fn, shape, cfg.method, steps, generator=gen, eps=eps, schedule=schedule,
                                 dtype=dtype, **opts)
    except FloatingPointError:                 # solvers.NonFiniteError
        return None, None, time.perf_counter() - t0, "diverged"
    except ValueError as e:                    # e.g. the DDPM step refuses beta * dt >= 1
        return None, None, time.perf_counter() - t0, f"n/a: {str(e).split(':')[0][:60]}"
    wall = time.perf_counter() - t0
    x = res.samples.double().reshape(shape[0], -1)
    if not torch.isfinite(x).all():
        return None, res.nfe, wall, "diverged"
    return x, res.nfe, wall, "ok"


def _tol_rungs(cfg: SamplerConfig, tol_ladder):
    """An adaptive sampler's rungs: the tolerance ladder over the options it declares as tolerances, or its variant
    alone when it declares none."""
    if not solvers.get_sampler(cfg.method).tolerances:
        return [(1, None, None)]
    return [(1, None, tol) for tol in tol_ladder]


# ================================================================================================ the study
COLUMNS = ["target", "schedule", "sampler", "steps", "NFE target", "NFE used", "error", "extra 1", "extra 2",
           "wall s", "status"]


def study(target: Target, sde, configs: List[SamplerConfig], schedules, ladder, tol_ladder, n: int, seed: int,
          table: Table, show: bool, score_fn=None):
    """Run every config over the ladder on ``target``; fill ``table``; return records and the noise floor."""
    score_fn = score_fn or target.dist.score_fn(sde)
    shape = (n, target.dim)
    # the floor: the same error for fresh exact samples, averaged over 5 draws (one draw scatters widely)
    floors, fx = [], {}
    for k in range(5):
        floor_x = target.dist.sample(n, torch.Generator().manual_seed(3000 + 10 * seed + k))
        floors.append(target.error_fn(floor_x))
        if k == 0 and target.extras:
            fx = target.extras(floor_x)
    floor = float(np.mean(floors))
    table.add(target=target.name, schedule="-", sampler="noise floor: fresh exact samples (mean of 5 draws)",
              error=floor, **_extras(fx), status=f"ok (draws {min(floors):.3g}..{max(floors):.3g})")
    records = []
    jobs = [(s, c) for s in schedules for c in configs if c.fixed or s == schedules[0]]
    for schedule, cfg in progress(jobs, f"{target.name}", show):
        rungs = [(cfg.steps_for(N), N, None) for N in ladder] if cfg.fixed else _tol_rungs(cfg, tol_ladder)
        for steps, N, tol in rungs:
            extra = {k: tol for k in solvers.get_sampler(cfg.method).tolerances} if tol is not None else None
            # one seed for every run: the same prior draw x_T everywhere, so that rungs and samplers are compared
            # on common random numbers (deterministic samplers then converge to the same exact flow of x_T)
            x, nfe, wall, status = run_one(sde, score_fn, shape, cfg, steps, schedule, target.eps,
                                           seed * 100003 + 17, extra_options=extra)
            err = target.error_fn(x) if x is not None else math.inf
            ex = target.extras(x) if (x is not None and target.extras) else {}
            sched = schedule if cfg.fixed else "adaptive"
            table.add(target=target.name, schedule=sched, sampler=cfg.label + (f" tol={tol:g}" if tol else ""),
                      steps=steps if cfg.fixed else None, **{"NFE target": N, "NFE used": nfe}, error=err,
                      **_extras(ex), **{"wall s": wall}, status=status)
            records.append(dict(target=target.name, schedule=sched, sampler=cfg.label, fixed=cfg.fixed, steps=steps,
                                nfe_target=N, nfe=nfe, error=err, wall=wall, status=status, tol=tol,
                                samples=x if target.dim == 2 else None, per_step=cfg.per_step))
    return records, floor


def _extras(ex: Dict) -> Dict:
    items = list(ex.items())
    out = {}
    for i, col in enumerate(("extra 1", "extra 2")):
        if i < len(items):
            out[col] = f"{items[i][0]}: {fmt(items[i][1])}"
    return out


def best_table(target: Target, records, floor, ladder) -> Table:
    """Per NFE rung: the best sampler and its error; per sampler: the smallest NFE within 2x of the floor."""
    tab = Table(f"best_{target.name}", ["NFE target", "best sampler (schedule)", "error", "error / floor",
                                        "runner-up", "runner-up error"],
                title=f"Best sampler per NFE on {target.name} ({target.error_name}; noise floor {fmt(floor)})")
    for N in ladder:
        rs = sorted([r for r in records if r["nfe_target"] == N and math.isfinite(r["error"])],
                    key=lambda r: r["error"])
        if not rs:
            continue
        b = rs[0]
        r2 = rs[1] if len(rs) > 1 else None
        tab.add(**{"NFE target": N, "best sampler (schedule)": f"{b['sampler']} ({b['schedule']})",
                   "error": b["error"], "error / floor": b["error"] / floor,
                   "runner-up": f"{r2['sampler']} ({r2['schedule']})" if r2 else "",
                   "runner-up error": r2["error"] if r2 else None})
    return tab


def reach_table(target: Target, records, floor, schedules) -> Table:
    tab = Table(f"reach_{target.name}", ["sampler"] + [f"NFE to 2x floor ({s})" for s in schedules]
                + ["error at max NFE (" + s + ")" for s in schedules],
                title=f"NFE each sampler needs to come within 2x of the noise floor on {target.name}")
    samplers = []
    for r in records:
        if r["fixed"] and r["sampler"] not in samplers:
            samplers.append(r["sampler"])
    for name in samplers:
        row = {"sampler": name}
        for s in schedules:
            rs = sorted([r for r in records if r["sampler"] == name and r["schedule"] == s],
                        key=lambda r: r["nfe"] or 0)
            hit = [r["nfe"] for r in rs if math.isfinite(r["error"]) and r["error"] <= 2 * floor]
            row[f"NFE to 2x floor ({s})"] = min(hit) if hit else "not reached"
            row[f"error at max NFE ({s})"] = rs[-1]["error"] if rs else None
        tab.add(**row)
    return tab


def plot_errors(plt, report: Report, target: Target, records, floor, schedules):
    fig, axes = plt.subplots(1, len(schedules) + 1, figsize=(6 * (len(schedules) + 1), 4.5), sharey=True)
    samplers = []
    for r in records:
        if r["sampler"] not in samplers:
            samplers.append(r["sampler"])
    cmap = plt.get_cmap("tab10" if len(samplers) <= 10 else "tab20")
    panels = list(schedules) + ["adaptive"]
    for ax, s in zip(axes, panels):
        for i, name in enumerate(samplers):
            rs = [r for r in records if r["sampler"] == name and r["schedule"] == s and r["nfe"]]
            if not rs:
                continue
            rs.sort(key=lambda r: r["nfe"])
            err = [r["error"] if math.isfinite(r["error"]) else np.nan for r in rs]
            ax.loglog([r["nfe"] for r in rs], err, "o-", ms=3, color=cmap(i % cmap.N), label=name)
        ax.axhline(floor, color="k", ls=":", lw=1, label="noise floor")
        ax.set_xlabel("NFE")
        ax.set_title(f"{target.name}: {s} grid" if s != "adaptive" else f"{target.name}: adaptive", fontsize=10)
    axes[0].set_ylabel(target.error_name)
    axes[0].legend(fontsize=6)
    report.figure(fig, f"error_vs_nfe_{target.name}", f"{target.name}: error vs NFE")


def plot_ring_samples(plt, report: Report, target: Target, records, nfe_target: int, schedule: str):
    rs = [r for r in records if r["nfe_target"] == nfe_target and r["schedule"] == schedule and r["fixed"]]
    n_show = next((r["samples"].shape[0] for r in rs if r["samples"] is not None), 2000)
    truth = target.dist.sample(min(n_show, 4000), torch.Generator().manual_seed(11)).numpy()
    panels = [("exact samples", truth, None, "ok")] + [(r["sampler"], r["samples"], r["error"], r["status"])
                                                       for r in rs]
    cols = 4
    rows = int(math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (name, x, err, status) in zip(axes.flat, panels):
        ax.set_visible(True)
        if x is not None:
            x = np.asarray(x)[:4000]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_xlim(-1.6, 1.6)
        ax.set_ylim(-1.6, 1.6)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        sub = "" if err is None else (f"\nSW1 = {fmt(err)}" if status == "ok" else f"\n{status}")
        ax.set_title(name + sub, fontsize=8)
    report.figure(fig, f"ring_samples_nfe{nfe_target}_{schedule}",
                  f"ring: samples per sampler at NFE ~ {nfe_target} ({schedule} grid)")


# ================================================================================================ checkpoints
def study_checkpoint(report: Report, check: Checks, workdir: str, configs, schedules, ladder, tol_ladder, n: int,
                     seed: int, show: bool, plt):
    """The ladder on a trained checkpoint, scored against held-out data."""
    try:
        from sde_diffusion import data as data_lib
        from sde_diffusion.run import checkpoints
    except ImportError as e:
        raise SystemExit(f"--workdir needs the training pipeline (sde_diffusion.run.checkpoints, sde_diffusion.data), "
                         f"which is not importable: {e}") from e
    config, sde, score_fn = checkpoints.load_score_fn(workdir)
    test = data_lib.get_dataset(config, "test")
    held = torch.cat([b[0] for b in test.iterate(1024)]).double().flatten(1)
    scaler = data_lib.get_data_scaler(config)
    held = scaler(held)
    n = min(n, held.shape[0])
    held = held[:n]
    train = data_lib.get_dataset(config, "train")
    fresh = scaler(train.batch(0, n, seed=seed + 99)[0].double().flatten(1))
    shape = (n,) + tuple(test.shape)
    eps = float(config.sampling.eps)
    proj = metrics.random_directions(held.shape[1], 128, torch.Generator().manual_seed(5))

    def score(x):
        return metrics.sliced_wasserstein(x, held, projections=proj, p=1)

    target = Target("checkpoint", f"{workdir} ({config.name})", None, "sliced W1 to held-out data", score, eps)
    tab = Table("checkpoint", COLUMNS, title=f"Trained checkpoint {workdir} ({config.name}, {config.data.dataset}/"
                                             f"{config.data.name}): sliced W1 to {n} held-out points")
    floor = score(fresh)
    dd = metrics.sample_distances(fresh, held)
    tab.add(target=config.name, schedule="-", sampler="noise floor: fresh training draws vs held-out", error=floor,
            **{"extra 1": f"energy: {fmt(dd['energy'])}"}, status="ok")
    records = []
    jobs = [(s, c) for s in schedules for c in configs if c.fixed or s == schedules[0]]
    for schedule, cfg in progress(jobs, "checkpoint", show):
        rungs = [(cfg.steps_for(N), N, None) for N in ladder] if cfg.fixed else _tol_rungs(cfg, tol_ladder)
        for steps, N, tol in rungs:
            extra = {k: tol for k in solvers.get_sampler(cfg.method).tolerances} if tol is not None else None
            x, nfe, wall, status = run_one(sde, score_fn, shape, cfg, steps, schedule, eps, seed * 7 + 3,
                                           extra_options=extra)
            err = score(x) if x is not None else math.inf
            ed = metrics.energy_distance(x, held) if x is not None else math.inf
            sched = schedule if cfg.fixed else "adaptive"
            tab.add(target=config.name, schedule=sched, sampler=cfg.label + (f" tol={tol:g}" if tol else ""),
                    steps=steps if cfg.fixed else None, **{"NFE target": N, "NFE used": nfe}, error=err,
                    **{"extra 1": f"energy: {fmt(ed)}", "wall s": wall}, status=status)
            records.append(dict(sampler=cfg.label, schedule=sched, fixed=cfg.fixed, nfe=nfe, nfe_target=N,
                                error=err, wall=wall, status=status, samples=None))
    prior = score(sde.prior_sample(shape, torch.Generator().manual_seed(seed + 5), dtype=torch.float64).flatten(1))
    tab.add(target=config.name, schedule="-", sampler="no sampling: prior draws vs held-out", error=prior, status="ok")
    report.table(tab)
    plot_errors(plt, report, target, records, floor, schedules)
    ok = [r for r in records if r["status"] == "ok"]
    check(bool(ok), f"checkpoint: {len(ok)} of {len(records)} runs finished (the rest refused with a reason)")
    best = min((r["error"] for r in ok), default=math.inf)
    check(best < prior, f"checkpoint: best sampler's SW1 {fmt(best)} below the prior's {fmt(prior)}", strict=False)
    check(best < 2 * floor, f"checkpoint: best sampler's SW1 {fmt(best)} within 2x of the data's own floor "
                            f"{fmt(floor)}", strict=False)
    return records, floor


# ================================================================================================ main
def main(argv: Optional[Sequence[str]] = None):
    p = make_parser(NAME, __doc__.split("\n")[0])
    p.add_argument("--targets", default="gauss,ring,bimodal", help="comma-separated analytic targets ('' for none)")
    p.add_argument("--schedules", default="uniform,edm", help="time grids to compare")
    p.add_argument("--nfe", default=None, help="comma-separated NFE ladder (default 5..1000; quick 10,30,100)")
    p.add_argument("--samples", type=int, default=None, help="samples per run (default 10000; quick 2000)")
    p.add_argument("--dim", type=int, default=None, help="dimension of the Gaussian target (default 64; quick 16)")
    p.add_argument("--workdir", default=None, help="also compare on this trained checkpoint (held-out data)")
    return parse_and_run(p, run, argv)


def run(args):
    quick = args.quick
    out = prepare_out(args.out)
    plt = pyplot()
    show = not args.no_progress
    report = Report(out, "Sampler comparison over an NFE ladder" + (" (quick)" if quick else ""))
    check = Checks(quick)
    ladder = [int(v) for v in args.nfe.split(",")] if args.nfe else \
        ([10, 30, 100] if quick else [5, 10, 20, 50, 100, 200, 500, 1000])
    tol_ladder = [1e-2, 1e-4] if quick else [1e-1, 1e-2, 1e-3, 1e-4, 1e-5]
    n = args.samples or (2000 if quick else 10000)
    dim = args.dim or (16 if quick else 64)
    schedules = [s for s in args.schedules.split(",") if s]
    sde = sdes.VPSDE(0.1, 20.0)
    configs = sampler_configs(sde)
    cfg_tab = Table("samplers", ["sampler", "fixed steps", "NFE per step", "extra NFE", "description"],
                    title="Registered samplers and variants (NFE per step measured)")
    for c in configs:
        cfg_tab.add(sampler=c.label, **{"fixed steps": c.fixed, "NFE per step": c.per_step, "extra NFE": c.offset,
                                        "description": solvers.get_sampler(c.method).description})
    report.table(cfg_tab)
    report.note(f"SDE: {sde!r}; {n} samples per run; NFE ladder {ladder}; adaptive tolerances {tol_ladder}; "
                f"schedules {schedules}; torch threads {torch.get_num_threads()}; wall times are single-run CPU "
                f"timings (noisy on a shared machine).")

    builders = {"gauss": lambda: gauss_target(dim, args.seed), "ring": lambda: ring_target(args.seed, n),
                "bimodal": bimodal_target}
    names = [s for s in args.targets.split(",") if s]
    all_records = {}
    for name in names:
        target = builders[name]()
        tab = Table(f"results_{name}", COLUMNS, title=f"{name}: {target.description}; error = {target.error_name}; "
                                                      f"eps = {target.eps}")
        t0 = time.perf_counter()
        records, floor = study(target, sde, configs, schedules, ladder, tol_ladder, n, args.seed, tab, show)
        report.table(tab)
        report.table(best_table(target, records, floor, ladder))
        report.table(reach_table(target, records, floor, schedules))
        report.note(f"_{name}: {time.perf_counter() - t0:.1f} s_")
        plot_errors(plt, report, target, records, floor, schedules)
        if name == "ring":
            mid = min(ladder, key=lambda N: abs(N - 50))
            for s in schedules:
                plot_ring_samples(plt, report, target, records, mid, s)
        all_records[name] = (records, floor)
        _checks(check, target, records, floor, ladder, schedules)

    if args.workdir:
        all_records["checkpoint"] = study_checkpoint(report, check, args.workdir, configs, schedules,
                                                     ladder if (quick or args.nfe) else [10, 20, 50, 100, 200, 500],
                                                     tol_ladder,
                                                     min(n, 4000), args.seed, show, plt)
    check.finish(report)
    return all_records


#: absolute slack added to "within 3x the noise floor" (PC's Langevin corrector is the slowest to settle in 1-D)
ABS_TOL = {"gauss": 0.05, "ring": 0.01, "bimodal": 0.02}


def _checks(check: Checks, target: Target, records, floor, ladder, schedules):
    """Key conclusions: NFE matched, every fixed-step sampler converges to the truth on the edm grid, errors fall with
    NFE, and (image-like Gaussian) the edm grid beats the uniform one at moderate NFE."""
    tol = ABS_TOL.get(target.name, 0.0)
    fixed = [r for r in records if r["fixed"] and r["status"] == "ok"]
    bad = [r for r in fixed if abs(r["nfe"] - r["nfe_target"]) > max(r["per_step"], 1)]
    check(not bad, f"{target.name}: NFE used within one step's NFE of the ladder"
                   + (f" (off: {[(r['sampler'], r['nfe_target'], r['nfe']) for r in bad][:3]})" if bad else ""))
    grid = "edm" if "edm" in schedules else schedules[-1]
    top, low = max(ladder), min(ladder)
    for name in dict.fromkeys(r["sampler"] for r in records if r["fixed"]):
        rs = {r["nfe_target"]: r for r in records if r["sampler"] == name and r["schedule"] == grid}
        e_top, e_low = rs[top]["error"], rs[low]["error"]
        check(e_top <= 3 * floor + tol, f"{target.name} / {name} ({grid}): error {fmt(e_top)} at NFE {top} within "
                                        f"3x floor {fmt(floor)} + {tol}")
        check(e_top < e_low or e_low <= 3 * floor + tol,
              f"{target.name} / {name} ({grid}): error falls from NFE {low} to {top} ({fmt(e_low)} -> {fmt(e_top)})")
    adaptive = [r for r in records if not r["fixed"] and r["tol"] is not None]
    for name in dict.fromkeys(r["sampler"] for r in adaptive):
        rs = sorted([r for r in adaptive if r["sampler"] == name], key=lambda r: -r["tol"])
        nfes = [r["nfe"] for r in rs]
        check(None not in nfes and nfes[-1] > nfes[0],
              f"{target.name} / {name}: more NFE at the tightest tolerance than at the loosest ({nfes})")
        check(rs[-1]["error"] <= 3 * floor + tol, f"{target.name} / {name} tol={rs[-1]['tol']:g}: error "
                                                   f"{fmt(rs[-1]['error'])} within 3x floor + {tol}")
    if target.name == "gauss" and {"uniform", "edm"} <= set(schedules):
        mid = sorted(ladder)[len(ladder) // 2]
        ratios = []
        for name in dict.fromkeys(r["sampler"] for r in records if r["fixed"]):
            u = [r["error"] for r in records if r["sampler"] == name and r["schedule"] == "uniform"
                 and r["nfe_target"] == mid]
            e = [r["error"] for r in records if r["sampler"] == name and r["schedule"] == "edm"
                 and r["nfe_target"] == mid]
            if u and e and (math.isfinite(u[0]) or math.isfinite(e[0])):
                ratios.append(u[0] / e[0] if e[0] > 0 else math.inf)     # inf: the uniform grid failed
        med = float(np.median(ratios))
        check(med > 2, f"gauss: at NFE {mid} the edm grid beats the uniform one (median error ratio {med:.3g} > 2)")


if __name__ == "__main__":
    main()
