"""Training step time and sampling throughput of a config's network (default: the vp_cifar U-Net) on this machine.

    python experiments/throughput.py --batch-size 8 [--config vp_cifar] [--device cpu] [--steps 5] [--threads 2]

Prints the parameter count, the mean time of one training update (loss forward + backward + gradient clipping +
Adam + EMA) at the given batch size, and the sampling throughput: batched score evaluations per second and
sample-evaluations per second (batch size x evaluations / s).  Asserts nothing.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from sde_diffusion import configs, networks  # noqa: E402
from sde_diffusion.ema import ExponentialMovingAverage  # noqa: E402
from sde_diffusion.losses import get_loss_fn  # noqa: E402
from sde_diffusion.run.sampling import data_shape  # noqa: E402
from sde_diffusion.run.train import build_optimizer  # noqa: E402
from sde_diffusion.run.utils import get_device  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vp_cifar")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed training updates (after one warm-up)")
    p.add_argument("--evals", type=int, default=10, help="timed score evaluations (after one warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = configs.get_config(args.config)
    device = get_device(args.device)
    sde = configs.build_sde(config)
    model = networks.get_network(config).to(device)
    ema = ExponentialMovingAverage(model, config.model.ema_rate)
    opt = build_optimizer(config, model.parameters())
    loss_fn = get_loss_fn(config, sde)
    shape = (args.batch_size, *data_shape(config))
    x = torch.rand(shape, device=device) * 2 - 1
    print(f"config {args.config}: {config.model.name} with {networks.count_parameters(model):,} parameters; "
          f"device {device} ({torch.get_num_threads()} CPU threads); batch {args.batch_size}")

    def update():
        loss = loss_fn(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        opt.step()
        ema.update(model)

    update()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        update()
    sync(device)
    step_time = (time.perf_counter() - t0) / args.steps
    print(f"training: {step_time * 1e3:.1f} ms per update ({1 / step_time:.2f} updates/s, "
          f"{args.batch_size / step_time:.1f} examples/s)")
    if args.batch_size != config.training.batch_size:
        print(f"  (config batch {config.training.batch_size}: about "
              f"{step_time * config.training.batch_size / args.batch_size:.2f} s per update if time scales linearly)")
    print(f"  {config.training.n_iters:,} updates at batch {args.batch_size}: "
          f"{config.training.n_iters * step_time / 3600:.1f} h")

    score_fn = networks.get_score_fn(sde, ema.model)
    t = torch.full((args.batch_size,), 0.5, device=device)
    with torch.no_grad():
        score_fn(x, t)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.evals):
            score_fn(x, t)
        sync(device)
    eval_time = (time.perf_counter() - t0) / args.evals
    print(f"sampling: {1 / eval_time:.2f} batched score evaluations/s = "
          f"{args.batch_size / eval_time:.1f} sample-evaluations/s "
          f"({config.sampling.method}, {config.sampling.num_steps} steps: about "
          f"{config.sampling.num_steps * eval_time / args.batch_size:.2f} s per sample)")


if __name__ == "__main__":
    main()
