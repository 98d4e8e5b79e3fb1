"""The training loop: denoising score matching with Adam, warm-up, gradient clipping, EMA, checkpoints, TensorBoard.

``train(config, workdir)`` resumes from the latest checkpoint in ``<workdir>/checkpoints`` if there is one.

Reproducibility: update k (0-based) draws everything it needs — its data batch, flips, t, z, dropout, label drops —
from seeds derived from ``(config.seed, k)`` (``data.mix_seed``), so the stream of updates does not depend on where a
run was interrupted; model, EMA, optimiser and every RNG state are checkpointed and restored.  On CPU a resumed run
ends with weights bitwise equal to an uninterrupted one (tests check this with SIGKILL).

Logs (``<workdir>/tensorboard``): ``train/loss`` (mean over the logging interval), ``train/lr``, ``train/grad_norm``,
``train/steps_per_sec``, and a sample grid (``samples``) every ``training.snapshot_freq`` steps.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch
from absl import logging

from .. import configs as configs_lib
from ..data import get_data_scaler, get_dataset, mix_seed
from ..ema import ExponentialMovingAverage
from ..losses import get_loss_fn
from ..networks import count_parameters, get_network
from . import checkpoints as ckpt_lib
from .utils import (get_device, get_rng_state, open_summary_writer, plot_points, seed_everything, set_deterministic,
                    set_rng_state)

__all__ = ["train", "NonFiniteLossError", "build_optimizer", "learning_rate"]


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient; the last good checkpoint is kept."""


def build_optimizer(config, params):
    o = config.optim
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    name = o.optimizer.lower()
    if name == "adam":
        return torch.optim.Adam(params, **kw)
    if name == "adamw":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"unknown optim.optimizer {o.optimizer!r}; available: adam, adamw")


def learning_rate(config, step: int) -> float:
    """Linear warm-up over ``optim.warmup`` updates, then constant (score_sde)."""
    warmup = int(config.optim.warmup)
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return float(config.optim.lr) * scale


def _snapshot(config, sde, ema_model, writer, workdir, step, device):
    from .sampling import generate, save_samples
    n = int(config.training.snapshot_num_samples)
    result = generate(config, sde, ema_model, num_samples=n, batch_size=min(n, int(config.sampling.batch_size)),
                      seed=int(config.sampling.seed), device=device)
    paths = save_samples(config, result, os.path.join(workdir, "snapshots", f"step_{step:08d}"), step=step)
    x = result["samples"]
    if writer is not None:
        if x.dim() == 4:
            from .utils import image_grid
            writer.add_image("samples", image_grid(x[:64]), step)
        else:
            writer.add_image("samples", plot_points(x, title=f"step {step}"), step)
    return paths


def train(config, workdir: str, device: Optional[str] = None) -> dict:
    """Train ``config`` in ``workdir`` up to ``training.n_iters`` updates, resuming from the latest checkpoint.

    Returns ``dict(step, loss, checkpoint)``.  Raises ``NonFiniteLossError`` on a non-finite loss or gradient
    (nothing is saved for that step, so the latest checkpoint stays the last good one).
    """
    tc = config.training
    device = get_device(device or config.device)
    set_deterministic(bool(config.deterministic))
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            old = json.load(f)
        if old != json.loads(config.to_json()):
            logging.warning("config differs from the one in %s; the new one is used and saved", config_path)
    ckpt_lib.atomic_write_text(config.to_json(indent=2), config_path)

    seed_everything(int(config.seed))
    sde = configs_lib.build_sde(config)
    model = get_network(config).to(device)
    ema = ExponentialMovingAverage(model, decay=float(config.model.ema_rate))
    optimizer = build_optimizer(config, model.parameters())
    loss_fn = get_loss_fn(config, sde)
    dataset = get_dataset(config, "train")
    scaler = get_data_scaler(config)
    logging.info("%s: %s network with %s parameters on %s; %s SDE; data %s", config.name, config.model.name,
                 f"{count_parameters(model):,}", device, sde, config.data.dataset)

    step = 0
    latest = ckpt_lib.latest_checkpoint(workdir)
    if latest is not None:
        state = ckpt_lib.load_checkpoint(latest, map_location="cpu")   # RNG states must stay on the CPU
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt_lib.CheckpointError(
                f"cannot resume from {latest}: it does not fit the network / optimiser of this config ({e}). "
                f"Resume with the run's own config ({config_path}) or train in a new workdir.") from e
        set_rng_state(state["rng"])
        step = int(state["step"])
        logging.info("resumed from %s (step %d)", latest, step)

    writer = open_summary_writer(workdir)

    def save(at_step):
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": get_rng_state(), "config": config.to_json()}
        return ckpt_lib.save_checkpoint(workdir, state, at_step, keep=int(tc.keep_checkpoints))

    n_iters = int(tc.n_iters)
    batch_size = int(tc.batch_size)
    seed = int(config.seed)
    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=step, desc=f"train {config.name}", dynamic_ncols=True,
               disable=None if tc.progress else True)
    interval_loss, interval_n, t_last, step_last = 0.0, 0, time.perf_counter(), step
    last_loss = float("nan")
    last_ckpt = latest
    try:
        while step < n_iters:
            # everything random in update `step` comes from (seed, step)
            torch.manual_seed(mix_seed(seed, 0x57E9, step))
            x, y = dataset.batch(step, batch_size, seed)
            x = scaler(x.to(device, non_blocking=True))
            y = y.to(device) if int(config.model.num_classes) > 0 else None
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            loss = loss_fn(model, x, y, train=True)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_value}) at step {step}: training stopped. The last good checkpoint "
                    f"({last_ckpt or 'none yet'}) is kept; lower optim.lr, raise training.eps or check the data.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = float(config.optim.grad_clip)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm ({grad_norm}) at step {step} (loss {loss_value:.4g}): training "
                    f"stopped. The last good checkpoint ({last_ckpt or 'none yet'}) is kept; lower optim.lr.")
            optimizer.step()
            ema.update(model)
            step += 1
            last_loss = loss_value
            interval_loss += loss_value
            interval_n += 1
            bar.update(1)

            if step % int(tc.log_freq) == 0 or step == n_iters:
                now = time.perf_counter()
                sps = (step - step_last) / max(now - t_last, 1e-9)
                mean_loss = interval_loss / max(interval_n, 1)
                if writer is not None:
                    writer.add_scalar("train/loss", mean_loss, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", grad_norm, step)
                    writer.add_scalar("train/steps_per_sec", sps, step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", sps=f"{sps:.1f}")
                logging.info("step %d: loss %.5f, lr %.3g, grad norm %.3g, %.2f steps/s", step, mean_loss, lr,
                             grad_norm, sps)
                interval_loss, interval_n, t_last, step_last = 0.0, 0, now, step

            if step % int(tc.checkpoint_freq) == 0 or step == n_iters:
                last_ckpt = save(step)
            snap = int(tc.snapshot_freq)
            if tc.snapshot_sampling and snap > 0 and step % snap == 0:
                _snapshot(config, sde, ema.model, writer, workdir, step, device)
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
    logging.info("training done at step %d (loss %.5f); checkpoint %s", step, last_loss, last_ckpt)
    return {"step": step, "loss": last_loss, "checkpoint": last_ckpt}
