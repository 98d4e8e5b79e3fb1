"""VP-DSM vs EDM vs flow matching vs latent (flow matching on a KL autoencoder's latents) on the 8x8 digits.

Every family trains the same number of updates at the same batch size (the wall time of each is measured and
reported: that is the other half of "the same budget"; the latent family's autoencoder time is listed apart), then
is sampled by the same deterministic solvers at NFE 5 / 10 / 20 / 50, each on its family's own time grid
(uniform in t; EDM's rho = 7 grid for EDM).  Quality in data space with the digits classifier of
``sde_diffusion.evaluation.digits``: the Fréchet distance of its features (FD), the share of confidently labelled
samples and the number of classes covered, next to the same numbers for as many real training digits (the floor).
Test bits/dim through the probability-flow ODE (``--mode eval``'s bpd stage) for the data-space families; the latent
family has none (its density lives on latents).  The 17-level digits are dequantised (``uniform_centered``: k + U in
the bin of width 2/16 centred on each level), so an exactly integrated ODE gives bits/dim >= 0 (Jensen: E_U[-log2
p(k + U)] >= -log2 P(k) >= 0).  With the default adaptive RK45 a negative value fails the run's checks; a fixed-step
``--bpd-solver`` (heun, ...) on briefly trained models, whose probability flow is stiff near t = eps, can break the
bound (the density it integrates no longer normalises): such a value is reported as invalid, not as a number.

    python -m experiments.compare_processes                       # the full budget (hours on a 2-core CPU)
    python -m experiments.compare_processes --steps 1500 --num-samples 500 --bpd-examples 100
    python -m experiments.compare_processes --quick               # CI-sized: asserts the pipeline's conclusions

Output (``--out``): ``results.md``, ``quality.csv`` (family, solver, NFE, FD, confident, coverage), ``training.csv``,
``fd_vs_nfe.png`` and one sample grid per family (``samples_<family>.png``, the best solver at the largest NFE).
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments._common import Checks, Report, Table, make_parser, parse_and_run, prepare_out, pyplot  # noqa: E402

FAMILIES = {"vp": "vp_digits", "edm": "edm_digits", "fm": "fm_digits", "ldm": "ldm_digits"}
#: solver label -> (sampling.method, flat options, network calls per step)
SOLVERS = {"euler": ("ode", {"solver": "euler"}, 1), "heun": ("ode", {"solver": "heun"}, 2),
           "dpm_solver": ("dpm_solver", {}, 1), "unipc": ("unipc", {}, 1)}


def build_parser():
    p = make_parser("compare_processes", __doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="training updates per family (vp_digits' 4000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--nf", type=int, default=32, help="U-Net base width of every family")
    p.add_argument("--ae-steps", type=int, default=1500, help="autoencoder updates of the latent family")
    p.add_argument("--ae-workdir", default="", help="reuse this trained autoencoder for the latent family")
    p.add_argument("--families", default="vp,edm,fm,ldm")
    p.add_argument("--solvers", default="euler,heun,dpm_solver,unipc")
    p.add_argument("--nfe", default="5,10,20,50", help="network calls per sample")
    p.add_argument("--num-samples", type=int, default=1000, help="samples per (family, solver, NFE)")
    p.add_argument("--bpd-examples", type=int, default=200, help="test digits for bits/dim (0 = none)")
    p.add_argument("--bpd-solver", default="rk45", help="ODE solver of the bits/dim (rk45: adaptive, eval's default; "
                   "a fixed-step solver such as heun is faster but can give invalid, even negative, bits/dim on "
                   "briefly trained models, whose scores are sharp near t = 0)")
    p.add_argument("--bpd-steps", type=int, default=100, help="steps of a fixed-step --bpd-solver")
    p.add_argument("--bpd-tol", type=float, default=1e-5, help="rtol = atol of the rk45 --bpd-solver (eval's 1e-5)")
    p.add_argument("--workdir", default="", help="training runs go here (default <out>/runs); finished runs are reused")
    p.add_argument("--digits-cache", default="", help="folder of the cached digits classifier (default <workdir>/"
                   "digits_eval; trained once, ~10 s)")
    return p


def bpd_cells(b: dict, how: str, exact: bool) -> dict:
    """The training table's bits/dim cells of an eval bpd result ``b``: a negative (or non-finite) value is no valid
    bits/dim of dequantised data (Jensen), so it is shown as ``invalid`` with the raw number in the note."""
    valid = math.isfinite(b["bpd"]) and b["bpd"] >= 0
    cells = {"bpd": b["bpd"] if valid else "invalid", "bpd_stderr": b["bpd_stderr"] if valid else None,
             "bpd_nfe_per_batch": b.get("nfe_per_batch")}
    if not valid:
        cells["bpd_note"] = (f"{how} gave {b['bpd']:.3g}, below 0, which no density of dequantised data can: the "
                             f"ODE was not integrated exactly enough" + ("" if exact else "; use --bpd-solver rk45"))
    return cells


def _config(name, args, workdir_ae=""):
    from sde_diffusion import configs
    c = configs.get_config(FAMILIES[name])
    over = {"training.n_iters": args.steps, "training.batch_size": args.batch_size, "model.nf": args.nf,
            "training.checkpoint_freq": args.steps, "training.snapshot_freq": 0, "training.progress": False,
            "training.log_freq": max(1, min(200, args.steps)), "seed": args.seed, "compute.threads": args.threads,
            "optim.warmup": min(200, max(1, args.steps // 10))}
    if name == "ldm":
        over["model.autoencoder_workdir"] = workdir_ae
        over.update({"autoencoder.n_iters": args.ae_steps, "autoencoder.checkpoint_freq": args.ae_steps,
                     "autoencoder.progress": False, "autoencoder.log_freq": max(1, min(200, args.ae_steps))})
        if args.quick:
            over.update({"autoencoder.ch": 8, "autoencoder.batch_size": 32, "autoencoder.lr": 3e-3,
                         "autoencoder.ema_rate": 0.9})
    return configs.apply_overrides(c, over)


def _train_all(args, runs, report):
    from sde_diffusion.run import autoencoder_train, train as train_lib
    from sde_diffusion.run.checkpoints import latest_checkpoint
    families = [f for f in args.families.split(",") if f]
    times, out = {}, {}
    ae_wd = args.ae_workdir
    if "ldm" in families and not ae_wd:
        ae_wd = os.path.join(runs, "ae")
        c = _config("ldm", args, ae_wd)
        t0 = time.perf_counter()
        r = autoencoder_train.train_autoencoder(c, ae_wd, device="cpu")
        times["ldm_autoencoder"] = time.perf_counter() - t0 if not r["nothing_to_do"] else float("nan")
    for name in families:
        wd = os.path.join(runs, name)
        c = _config(name, args, ae_wd)
        t0 = time.perf_counter()
        r = train_lib.train(c, wd, device="cpu")
        times[name] = time.perf_counter() - t0 if not r["nothing_to_do"] else float("nan")
        out[name] = (c, wd, latest_checkpoint(wd))
    return out, times, ae_wd


def run(args):
    import torch
    from sde_diffusion import configs
    from sde_diffusion.evaluation.digits import DigitsEvaluator
    from sde_diffusion.run.sampling import generate, load_sampling_model, save_samples

    if args.quick:
        args.steps, args.nf, args.ae_steps, args.batch_size = 16, 8, 30, 32
        args.num_samples, args.bpd_examples, args.bpd_solver, args.bpd_tol = 32, 4, "rk45", 1e-3
        args.solvers, args.nfe = "euler,dpm_solver", "5,10"
    out = prepare_out(args.out)
    runs = args.workdir or str(out / "runs")
    report = Report(out, "Process families on the digits: VP-DSM vs EDM vs flow matching vs latent")
    check = Checks(args.quick)
    report.note(f"Budget: {args.steps} updates of batch {args.batch_size} per family, U-Net nf = {args.nf}; latent "
                f"family: autoencoder {args.ae_steps} updates (reused: {bool(args.ae_workdir)}); "
                f"{args.num_samples} samples per cell; seed {args.seed}; {args.threads} thread(s).")
    trained, times, ae_wd = _train_all(args, runs, report)

    exact_bpd = args.bpd_solver == "rk45"
    bpd_how = (f"adaptive rk45, tolerance {args.bpd_tol:g}" if exact_bpd
               else f"fixed-step {args.bpd_solver}, {args.bpd_steps} steps")
    tt = Table("training", ["family", "config", "updates", "train_seconds", "bpd", "bpd_stderr", "bpd_nfe_per_batch",
                            "bpd_note"],
               f"Training (same updates; wall time measured) and test bits/dim ({args.bpd_examples} test digits, "
               f"probability-flow ODE: {bpd_how})")
    bpd = {}
    if args.bpd_examples > 0:
        from sde_diffusion.run.evaluate import evaluate
        for name, (c, wd, _) in trained.items():
            if name == "ldm":
                continue
            ce = configs.apply_overrides(c, {"eval.enable_sampling": False, "eval.enable_bpd": True,
                                             "eval.bpd_num_examples": args.bpd_examples,
                                             "eval.bpd_solver": args.bpd_solver, "eval.bpd_num_steps": args.bpd_steps,
                                             "eval.bpd_rtol": args.bpd_tol, "eval.bpd_atol": args.bpd_tol,
                                             "eval.progress": False})
            s = evaluate(ce, wd, checkpoint="latest", device="cpu")
            bpd[name] = s["bpd"]
    for name, (c, wd, _) in trained.items():
        b = bpd.get(name)
        tt.add(family=name, config=FAMILIES[name], updates=args.steps, train_seconds=times.get(name),
               **(bpd_cells(b, bpd_how, exact_bpd) if b else {}))
    if "ldm_autoencoder" in times:
        tt.add(family="ldm (autoencoder)", config="ldm_digits", updates=args.ae_steps,
               train_seconds=times["ldm_autoencoder"])
    report.table(tt)
    if bpd:
        check(all(b.get("dequantize") in ("uniform", "uniform_centered") and int(b.get("num_levels", 0)) == 17
                  for b in bpd.values()), "bits/dim are of uniformly dequantised 17-level digits")
        negative = [f"{name} ({b['bpd']:.3g})" for name, b in bpd.items() if not b["bpd"] >= 0]
        check(not negative, f"every bits/dim is >= 0 ({bpd_how}; a valid density of dequantised data cannot go below)"
              + (f": not {', '.join(negative)}" if negative else ""), strict=exact_bpd)

    evaluator = DigitsEvaluator(args.digits_cache or os.path.join(runs, "digits_eval"))
    floor = evaluator.floor(num_samples=args.num_samples, seed=args.seed)
    qt = Table("quality", ["family", "solver", "nfe_target", "nfe", "fd", "confident", "coverage"],
               f"Sample quality in data space ({args.num_samples} samples; real-data floor: FD "
               f"{floor['frechet_distance']:.2f}, confident {floor['confident_share']:.3f}, coverage "
               f"{floor['coverage_classes']}/10)")
    nfes = [int(v) for v in args.nfe.split(",") if v]
    best = {}
    for name, (c, wd, _) in trained.items():
        c, sde, model, _, _ = load_sampling_model(c, wd)          # the EMA weights, loaded once per family
        for label in [s for s in args.solvers.split(",") if s]:
            method, flat, per_step = SOLVERS[label]
            for nfe in nfes:
                # s steps of a k-call method make k s - (k - 1) calls (Heun's last step is an Euler step): s =
                # ceil(NFE / k) lands within k - 1 of the NFE (Heun: 5 -> 3 steps, 5 calls; 10 -> 5 steps, 9 calls)
                over = {"sampling.method": method, "sampling.num_steps": max(1, math.ceil(nfe / per_step))}
                over.update({f"sampling.{k}": v for k, v in flat.items()})
                cs = configs.apply_overrides(copy.deepcopy(c), over)
                res = generate(cs, sde, model, num_samples=args.num_samples, batch_size=min(500, args.num_samples),
                               seed=args.seed)
                x = res["samples"]
                finite = bool(torch.isfinite(x).all())
                check(finite and x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1,
                      f"{name} / {label} / NFE {nfe}: finite samples of data shape in [0, 1]")
                m = evaluator.metrics(x) if finite else {"frechet_distance": math.nan, "confident_share": math.nan,
                                                         "coverage_classes": 0}
                nfe_per_sample = res["nfe"] / math.ceil(args.num_samples / min(500, args.num_samples))
                qt.add(family=name, solver=label, nfe_target=nfe, nfe=int(nfe_per_sample),
                       fd=m["frechet_distance"], confident=m["confident_share"], coverage=m["coverage_classes"])
                key = (name, nfe)
                if finite and (key not in best or m["frechet_distance"] < best[key][0]):
                    best[key] = (m["frechet_distance"], label, x)
    report.table(qt)

    # winners per NFE (lowest FD over solvers and families), and per family the sample grid at the largest NFE
    wt = Table("winners", ["nfe", "family", "solver", "fd"], "Lowest Fréchet distance at each NFE")
    for nfe in nfes:
        cands = [(v[0], k[0], v[1]) for k, v in best.items() if k[1] == nfe]
        if cands:
            fd, fam, sol = min(cands)
            wt.add(nfe=nfe, family=fam, solver=sol, fd=fd)
    report.table(wt)
    for name in trained:
        if (name, nfes[-1]) in best:
            fd, label, x = best[(name, nfes[-1])]
            res = {"samples": x[:64], "labels": None, "nfe": 0}
            paths = save_samples(trained[name][0], res, str(out / f"samples_{name}"))
            os.replace(paths["png"], out / f"samples_{name}.png")
            os.remove(paths["npz"])
            os.rmdir(out / f"samples_{name}")
            report.parts.append(f"![{name}: {label} at NFE {nfes[-1]}, FD {fd:.2f}](samples_{name}.png)\n")

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    styles = ["-", "--", ":", "-."]
    for i, name in enumerate(trained):
        for j, label in enumerate([s for s in args.solvers.split(",") if s]):
            fd = [r["fd"] for r in qt.rows if r["family"] == name and r["solver"] == label]
            nf = [r["nfe"] for r in qt.rows if r["family"] == name and r["solver"] == label]
            ax.plot(nf, fd, marker="o", color=f"C{i}", ls=styles[j % len(styles)], label=f"{name} / {label}")
    ax.axhline(floor["frechet_distance"], color="k", ls=":", label="real digits (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network calls per sample (NFE)")
    ax.set_ylabel("digits-classifier Fréchet distance")
    ax.legend(fontsize=6, ncol=2)
    report.figure(fig, "fd_vs_nfe", "FD against NFE per family and solver")

    fds = [r["fd"] for r in qt.rows if math.isfinite(r["fd"])]
    check(len(fds) == len(qt.rows), "every (family, solver, NFE) cell has a finite Fréchet distance")
    check(min(fds) > floor["frechet_distance"] if fds else False,
          "real digits score better than every model sample (the floor is a floor)")
    check(all(abs(r["nfe"] - r["nfe_target"]) <= 1 for r in qt.rows),
          "the solvers make the requested number of network calls (+-1)")
    check(set(trained) == set(a for a in args.families.split(",") if a), "every requested family trained")
    check.finish(report)
    return {"quality": qt, "training": tt, "winners": wt, "floor": floor}


def main(argv=None):
    return parse_and_run(build_parser(), run, argv)


if __name__ == "__main__":
    main()
