"""Training step time of a config's network under the ``config.compute`` speed options, side by side, and its
sampling throughput.

    python -m experiments.throughput --batch-size 8 [--config vp_cifar] [--device cpu] [--steps 3] [--rounds 3]
        [--threads 1] [--variants baseline,fused_adam,foreach_ema,fast,bf16,channels_last,compile] [--quick] [--out DIR]

Each variant is one full training update as ``run/train.py`` does it (loss forward under the variant's autocast,
backward, gradient clipping, Adam of the variant's implementation, EMA update), on the same batch.  The variants are
timed in interleaved rounds (round r times every variant once, in turn), so a machine whose load changes during the
run biases none of them; the table gives the median over rounds and the ratio to ``baseline`` (per-tensor loop Adam,
loop EMA, float32, contiguous).  Then the sampling throughput of the baseline: batched score evaluations per second
and sample-evaluations per second.  The table goes to stdout and ``<out>/results.md`` + ``<out>/throughput.csv``.
``--quick`` (CI-sized: toy_2d, batch 4, one round of one update, variants baseline and fast) asserts that every
variant's update gives a finite loss; speed itself is never asserted.

Variants: ``baseline``; ``fused_adam`` (compute.adam_impl=fused, foreach where fused is unsupported);
``foreach_ema``; ``fast`` (fused Adam + foreach EMA: the CPU default); ``bf16`` (fast + compute.autocast=bf16);
``channels_last`` (fast + NHWC, image data only); ``compile`` (fast + torch.compile of the network; its compile time
is printed apart and not in the table).
"""
import math
import os
import statistics
import sys
import time
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from experiments._common import Checks, Report, Table, make_parser, parse_and_run, prepare_out  # noqa: E402

from sde_diffusion import configs, networks  # noqa: E402
from sde_diffusion.ema import ExponentialMovingAverage  # noqa: E402
from sde_diffusion.losses import get_loss_fn  # noqa: E402
from sde_diffusion.run.sampling import data_shape  # noqa: E402
from sde_diffusion.run.train import build_optimizer  # noqa: E402
from sde_diffusion.run.utils import get_device  # noqa: E402

VARIANTS = {
    "baseline": dict(adam_impl="loop", ema_foreach=False),
    "fused_adam": dict(adam_impl="fused", ema_foreach=False),
    "foreach_ema": dict(adam_impl="loop", ema_foreach=True),
    "fast": dict(adam_impl="auto", ema_foreach=True),
    "bf16": dict(adam_impl="auto", ema_foreach=True, autocast="bf16"),
    "channels_last": dict(adam_impl="auto", ema_foreach=True, channels_last=True),
    "compile": dict(adam_impl="auto", ema_foreach=True, compile=True),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_update(config, options, x, device):
    """One training update of ``config`` with the speed ``options`` (a ``compute`` sub-dict); returns
    ``(update, model, ema)``.  The network is initialised from the same seed for every variant."""
    from sde_diffusion.run.train import _fused_supported
    torch.manual_seed(0)
    model = networks.get_network(config).to(device)
    images = x.dim() == 4
    channels_last = bool(options.get("channels_last")) and images
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    c = config.copy_and_resolve_references()
    for k, v in options.items():
        c.compute[k] = v
    if c.compute.adam_impl == "fused" and not _fused_supported(list(model.parameters())):
        c.compute.adam_impl = "foreach"
    ema = ExponentialMovingAverage(model, config.model.ema_rate, foreach=bool(c.compute.ema_foreach))
    opt = build_optimizer(c, model.parameters())
    net = torch.compile(model) if options.get("compile") else model
    loss_fn = get_loss_fn(config, configs.build_sde(config))
    bf16 = options.get("autocast") == "bf16"

    def update():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        opt.step()
        ema.update(model)
        return float(loss.detach())
    return update, model, ema


def main(argv: Optional[Sequence[str]] = None):
    p = make_parser("throughput", __doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config name (default vp_cifar; quick toy_2d)")
    p.add_argument("--batch-size", type=int, default=None, help="default 8; quick 4")
    p.add_argument("--steps", type=int, default=None, help="timed training updates per variant and round (default 3; "
                   "quick 1)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds, the table gives the median (default 3;"
                   " quick 1)")
    p.add_argument("--evals", type=int, default=None, help="timed score evaluations after one warm-up (default 10; "
                   "quick 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default=None, help=f"comma-separated, from {', '.join(VARIANTS)} (default "
                   f"baseline,fused_adam,foreach_ema,fast,bf16,channels_last; quick baseline,fast)")
    return parse_and_run(p, lambda args: run(args, p), argv)


def run(args, parser):
    quick = args.quick
    pick = (lambda v, full, small: v if v is not None else (small if quick else full))
    config_name = pick(args.config, "vp_cifar", "toy_2d")
    batch_size, steps = pick(args.batch_size, 8, 4), pick(args.steps, 3, 1)
    rounds, evals = pick(args.rounds, 3, 1), pick(args.evals, 10, 2)
    variants = pick(args.variants, "baseline,fused_adam,foreach_ema,fast,bf16,channels_last", "baseline,fast")
    for key, v in (("batch-size", batch_size), ("steps", steps), ("rounds", rounds), ("evals", evals)):
        if v < 1:
            parser.error(f"--{key} must be >= 1, got {v}")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; available: {', '.join(VARIANTS)}")
    if "baseline" not in names:
        names.insert(0, "baseline")
    try:
        config = configs.get_config(config_name)
    except configs.ConfigError as e:
        parser.error(str(e))
    out = prepare_out(args.out)
    report = Report(out, f"Training-update and sampling throughput of {config_name}" + (" (quick)" if quick else ""))
    check = Checks(quick)
    device = get_device(args.device)
    shape = (batch_size, *data_shape(config))
    torch.manual_seed(args.seed + 1)
    x = (torch.rand(shape) * 2 - 1).to(device)
    if x.dim() != 4:
        names = [n for n in names if n != "channels_last"]
    updates = {}
    for name in names:
        t0 = time.perf_counter()
        update, model, ema = build_update(config, VARIANTS[name], x, device)
        loss = update()                              # warm-up (and compilation)
        sync(device)
        check(math.isfinite(loss), f"{name}: the first update's loss is finite ({loss:.4g})")
        updates[name] = update
        if name == "compile":
            report.note(f"compile: first update (compilation) took {time.perf_counter() - t0:.1f} s")
        if name == "baseline":
            base_model, base_ema = model, ema
    report.note(f"config {config_name}: {config.model.name} with {networks.count_parameters(base_model):,} "
                f"parameters; device {device} ({torch.get_num_threads()} CPU threads); batch {batch_size}; "
                f"{rounds} interleaved rounds x {steps} updates")

    times = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                updates[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times["baseline"])
    table = Table("throughput", ["variant", "ms_per_update", "speedup_vs_baseline"],
                  title="One training update (median over rounds)")
    for name in names:
        med = statistics.median(times[name])
        table.add(variant=name, ms_per_update=med * 1e3, speedup_vs_baseline=base / med)
    report.table(table)
    report.note(f"{config.training.n_iters:,} updates at batch {batch_size} (baseline): "
                f"{config.training.n_iters * base / 3600:.1f} h")

    score_fn = networks.get_score_fn(configs.build_sde(config), base_ema.model)
    t = torch.full((batch_size,), 0.5, device=device)
    with torch.no_grad():
        score_fn(x, t)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(evals):
            score_fn(x, t)
        sync(device)
    eval_time = (time.perf_counter() - t0) / evals
    report.note(f"sampling: {1 / eval_time:.2f} batched score evaluations/s = "
                f"{batch_size / eval_time:.1f} sample-evaluations/s "
                f"({config.sampling.method}, {config.sampling.num_steps} steps: about "
                f"{config.sampling.num_steps * eval_time / batch_size:.2f} s per sample)")
    check.finish(report)
    return {name: statistics.median(v) for name, v in times.items()}


if __name__ == "__main__":
    main()
