"""The training loop: denoising score matching with Adam, warm-up, gradient clipping, EMA, checkpoints, TensorBoard.

``train(config, workdir)`` resumes from the latest checkpoint in ``<workdir>/checkpoints`` if there is one.

Reproducibility: update k (0-based) draws everything it needs — its data batch, flips, t, z, dropout, label drops —
from seeds derived from ``(config.seed, k)`` (``data.mix_seed``), so the stream of updates does not depend on where a
run was interrupted; model, EMA, optimiser and every RNG state are checkpointed and restored.  On CPU a resumed run
ends with weights bitwise equal to an uninterrupted one (tests check this with SIGKILL).

Reliability (see ``run/lifecycle.py`` and ``run/checkpoints.py``): the config is validated before anything is
touched; one training at a time per workdir (an OS lock, released by the kernel when the holder dies); temporary files
of killed runs are removed at start-up; SIGTERM / SIGINT finish the current update, write a checkpoint of the reached
step and raise ``lifecycle.Stopped`` (a second signal aborts at once); training resumes from the newest checkpoint
whose digest verifies (a corrupt newer one is named in a warning and kept); ``config.json`` is written only together
with a checkpoint of this invocation, never by a failed or no-op one, and a resume whose config differs in a key that
defines the run (``configs.validation.RESUMABLE_KEYS`` lists those that may change) is refused with the keys listed.

Logs (``<workdir>/tensorboard``): ``train/loss`` (mean over the logging interval), ``train/lr``, ``train/grad_norm``,
``train/steps_per_sec``, and a sample grid (``samples``) every ``training.snapshot_freq`` steps.
"""
from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch
from absl import logging

from .. import configs as configs_lib
from ..atomic import remove_stale_temp_files
from ..configs import validation as validation_lib
from ..data import get_data_scaler, get_dataset, mix_seed
from ..ema import ExponentialMovingAverage
from ..losses import get_loss_fn
from ..networks import count_parameters, get_network
from . import checkpoints as ckpt_lib
from . import lifecycle
from .utils import (get_device, get_rng_state, open_summary_writer, plot_points, seed_everything, set_deterministic,
                    set_rng_state)

__all__ = ["train", "NonFiniteLossError", "build_optimizer", "learning_rate", "prepare_workdir", "WorkdirError"]


class NonFiniteLossError(FloatingPointError):
    """Training met a non-finite loss or gradient; the last good checkpoint is kept."""


class WorkdirError(ValueError):
    """A workdir that cannot be used (a file, not a folder)."""


def prepare_workdir(workdir: str, create: bool = True) -> str:
    """Check that ``workdir`` is (or can become) a folder; create it when ``create``."""
    if not workdir:
        raise WorkdirError("--workdir is empty")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"workdir {workdir} exists and is not a folder")
    if create:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            from ..atomic import WriteError
            raise WriteError(workdir, e) from e
    return workdir


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


def _read_stored_config(config_path: str):
    try:
        return configs_lib.get_config(config_path)
    except configs_lib.ConfigError as e:
        raise configs_lib.ConfigError(f"the run's own config cannot be read ({e}); fix or move {config_path} "
                                      f"before resuming") from None


def _check_identity(stored, config, where: str):
    """Refuse a config that differs from the run's in a key that defines the run; returns the resumable changes."""
    identity, resumable = validation_lib.identity_differences(stored, config)
    if identity:
        raise configs_lib.ConfigError(
            f"the config differs from the run's ({where}) in keys that define the run: "
            f"{validation_lib.describe_differences(identity)}; resume with the run's own config (omit --config) or "
            f"train in a new workdir")
    return resumable


def train(config, workdir: str, device: Optional[str] = None) -> dict:
    """Train ``config`` in ``workdir`` up to ``training.n_iters`` updates, resuming from the newest good checkpoint.

    Returns ``dict(step, loss, checkpoint, nothing_to_do)``.  Raises ``ConfigError`` for unusable values (before
    anything is written), ``lifecycle.WorkdirLockedError`` when another process trains in ``workdir``,
    ``lifecycle.Stopped`` after a graceful stop (its checkpoint written), ``NonFiniteLossError`` on a non-finite loss,
    gradient or weights (nothing is saved for that step, so the latest checkpoint stays the last good one), and
    ``atomic.WriteError`` when a file cannot be written.
    """
    configs_lib.validate(config, "train")
    try:
        device = get_device(device or config.device)
    except RuntimeError as e:
        raise configs_lib.ConfigError(f"config key 'device' must name a device (auto, cpu, cuda, cuda:1, ...): "
                                      f"{e}") from None
    prepare_workdir(workdir)
    with lifecycle.WorkdirLock(workdir, "train"), \
            lifecycle.handle_signals("graceful", context=f"training in {workdir}"):
        return _train(config, workdir, device)


def _train(config, workdir: str, device) -> dict:
    tc = config.training
    removed = remove_stale_temp_files([workdir, ckpt_lib.checkpoint_dir(workdir)])
    removed += remove_stale_temp_files([os.path.join(workdir, "snapshots")], recursive=True)
    if removed:
        logging.info("removed %d temporary file(s) left by an earlier, killed run", len(removed))

    config_path = os.path.join(workdir, "config.json")
    changed = []
    if os.path.isfile(config_path):
        changed = _check_identity(_read_stored_config(config_path), config, config_path)

    set_deterministic(bool(config.deterministic))
    seed_everything(int(config.seed))
    try:
        sde = configs_lib.build_sde(config)
        model = get_network(config).to(device)
        ema = ExponentialMovingAverage(model, decay=float(config.model.ema_rate))
        optimizer = build_optimizer(config, model.parameters())
        loss_fn = get_loss_fn(config, sde)
        dataset = get_dataset(config, "train")
    except (ValueError, KeyError, TypeError) as e:
        raise configs_lib.ConfigError(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    batch_size = int(tc.batch_size)
    if config.data.dataset.lower() != "toy" and batch_size > len(dataset):
        raise configs_lib.ConfigError(f"config key 'training.batch_size' must be an integer in [1, {len(dataset)}] "
                                      f"(the size of the {config.data.dataset} training split), got {batch_size}")
    scaler = get_data_scaler(config)
    logging.info("%s: %s network with %s parameters on %s; %s SDE; data %s", config.name, config.model.name,
                 f"{count_parameters(model):,}", device, sde, config.data.dataset)

    step = 0
    latest, state, skipped = ckpt_lib.newest_good_checkpoint(workdir, map_location="cpu")  # RNG states on the CPU
    if skipped and latest is None:
        raise ckpt_lib.CheckpointError(
            f"no usable checkpoint in {ckpt_lib.checkpoint_dir(workdir)}: "
            + "; ".join(str(e) for e in skipped) + ". Move the corrupt files away to train from scratch")
    if skipped:
        logging.warning("%s; resuming from %s (step %d), the newest good one; the corrupt file%s kept",
                        "; ".join(str(e) for e in skipped), latest, int(state["step"]),
                        " is" if len(skipped) == 1 else "s are")
    if state is not None:
        if not os.path.isfile(config_path) and "config" in state:
            changed = _check_identity(configs_lib.config_from_json(state["config"]), config, latest)
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt_lib.CheckpointError(
                f"cannot resume from {latest}: it does not fit the network / optimiser of this config "
                f"({str(e).splitlines()[0]}). Resume with the run's own config ({config_path}) or train in a new "
                f"workdir.") from None
        set_rng_state(state["rng"])
        step = int(state["step"])
        del state
        logging.info("resumed from %s (step %d)", latest, step)

    n_iters = int(tc.n_iters)
    if step >= n_iters:
        logging.info("nothing to do: %s is at step %d >= training.n_iters = %d", workdir, step, n_iters)
        return {"step": step, "loss": float("nan"), "checkpoint": latest, "nothing_to_do": True}
    if changed:
        logging.warning("resuming with changed settings: %s", validation_lib.describe_differences(changed))

    writer = open_summary_writer(workdir)
    config_json = config.to_json(indent=2)
    saved = {"step": step if latest is not None else -1, "path": latest}

    def save(at_step):
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": get_rng_state(), "config": config.to_json()}
        try:
            path = ckpt_lib.save_checkpoint(workdir, state, at_step, keep=int(tc.keep_checkpoints))
        except ckpt_lib.NonFiniteStateError as e:
            raise NonFiniteLossError(f"{e}; training stopped. The last good checkpoint ({saved['path'] or 'none yet'})"
                                     f" is kept; lower optim.lr") from None
        saved.update(step=at_step, path=path)
        # the run's identity is recorded once this invocation has a checkpoint (a failed write changes nothing; a
        # kill right here leaves the previous config.json, which differs at most in resumable keys)
        current = None
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                current = f.read()
        if current != config_json:
            ckpt_lib.atomic_write_text(config_json, config_path)
        return path

    def stop_if_requested():
        signum = lifecycle.stop_requested()
        if signum is None:
            return
        name = lifecycle.signal_name(signum)
        if step > saved["step"] and step > 0:
            path = save(step)
            msg = f"stopped by {name} at step {step}: checkpoint {path} written; run the same command to resume"
        elif saved["path"]:
            msg = f"stopped by {name} at step {step}: the latest checkpoint is {saved['path']}; run the same " \
                  f"command to resume"
        else:
            msg = f"stopped by {name} before the first update: nothing to save"
        raise lifecycle.Stopped(signum, msg)

    seed = int(config.seed)
    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=step, desc=f"train {config.name}", dynamic_ncols=True,
               disable=None if tc.progress else True)
    interval_loss, interval_n, t_last, step_last = 0.0, 0, time.perf_counter(), step
    last_loss = float("nan")
    try:
        while step < n_iters:
            stop_if_requested()
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
                    f"({saved['path'] or 'none yet'}) is kept; lower optim.lr, raise training.eps or check the data.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = float(config.optim.grad_clip)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm ({grad_norm}) at step {step} (loss {loss_value:.4g}): training "
                    f"stopped. The last good checkpoint ({saved['path'] or 'none yet'}) is kept; lower optim.lr.")
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
                save(step)
            snap = int(tc.snapshot_freq)
            if tc.snapshot_sampling and snap > 0 and step % snap == 0:
                try:
                    _snapshot(config, sde, ema.model, writer, workdir, step, device)
                except FloatingPointError as e:      # solvers.NonFiniteError: the model has diverged
                    raise NonFiniteLossError(
                        f"the snapshot samples at step {step} are not finite ({str(e).splitlines()[0]}): the model "
                        f"has diverged; training stopped (checkpoint {saved['path']} kept); lower optim.lr") from None
    finally:
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
    logging.info("training done at step %d (loss %.5f); checkpoint %s", step, last_loss, saved["path"])
    return {"step": step, "loss": last_loss, "checkpoint": saved["path"], "nothing_to_do": False}
