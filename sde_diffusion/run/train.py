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

Distributed (``run/distributed.py``): under ``torchrun --nproc_per_node=K`` every rank trains a
``DistributedDataParallel`` replica.  Update k's global batch (``training.batch_size`` examples, the same
``data.indices`` shard of epoch k // (n / B)'s permutation on every rank) is split into M = K * ``compute.grad_accum``
equal micro-batches (a batch size not divisible by M is refused); micro-batch j = rank * grad_accum + a takes examples
[j B/M, (j+1) B/M) and draws its t, z, dropout and label drops from ``(seed, k, j)`` (j = 0: ``(seed, k)``, as in
one process).  Gradients are averaged by DDP's all-reduce, so a K-rank run computes the same update as a one-process
run with ``compute.grad_accum = K`` (to float rounding: the sum order differs).  EMA and clipping see identical
gradients on every rank.  Only rank 0 holds the workdir lock and writes checkpoints (with every rank's RNG state),
``config.json``, TensorBoard and snapshots.  Failures (a non-finite loss, an exception in a rank's data or forward, a
failed checkpoint write) are exchanged at fixed points of every update, so all ranks stop at the same update with one
message; a graceful stop (SIGTERM / SIGINT on any rank) is agreed on the same way and checkpointed once.  A run resumed
with a different K or grad_accum continues from the checkpoint with a different noise stream and says so.

Latent diffusion (``sde_diffusion.autoencoder``): with ``model.autoencoder_workdir`` set, the frozen autoencoder of
that workdir (``run.autoencoder_train.load_codec``) encodes every batch (scale_factor x posterior mean) before the
loss, and the network is built for the latents' shape (``autoencoder.network_config``).

Logs (``<workdir>/tensorboard``): ``train/loss`` (mean over the logging interval), ``train/lr``, ``train/grad_norm``,
``train/steps_per_sec``, and a sample grid (``samples``) every ``training.snapshot_freq`` steps.
"""
from __future__ import annotations

import contextlib
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
from ..autoencoder import is_latent, network_config
from ..ema import ExponentialMovingAverage
from ..losses import get_loss_fn
from ..networks import count_parameters, get_network
from . import checkpoints as ckpt_lib
from . import distributed as dist_lib
from . import lifecycle
from .autoencoder_train import load_codec
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


def _compute(config, key: str, default):
    """``config.compute.<key>``, or ``default`` for a config written before the section existed."""
    section = config.get("compute") if hasattr(config, "get") else None
    return default if section is None or key not in section else section[key]


def build_optimizer(config, params):
    """Adam / AdamW of ``config.optim``; ``compute.adam_impl``: ``fused`` (one kernel, CPU and CUDA), ``foreach``,
    ``loop`` (per tensor) or ``auto`` (fused where this PyTorch supports it for the parameters' device, else
    foreach).  All compute the same update to float rounding."""
    params = list(params)
    o = config.optim
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    name = o.optimizer.lower()
    if name not in ("adam", "adamw"):
        raise ValueError(f"unknown optim.optimizer {o.optimizer!r}; available: adam, adamw")
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    impl = str(_compute(config, "adam_impl", "auto")).lower()
    if impl == "auto":
        impl = "fused" if _fused_supported(params) else "foreach"
    if impl == "fused":
        if not _fused_supported(params):
            raise configs_lib.ConfigError(
                f"config key 'compute.adam_impl' = 'fused' is not supported here (PyTorch {torch.__version__} on "
                f"{params[0].device.type if params else 'no parameters'}); use auto, foreach or loop")
        kw["fused"] = True
    elif impl == "foreach":
        kw["foreach"] = True
    elif impl == "loop":
        kw["foreach"] = False
    else:
        raise configs_lib.ConfigError(f"config key 'compute.adam_impl' must be one of auto, fused, foreach, loop, "
                                      f"got {impl!r}")
    return cls(params, **kw)


def _fused_supported(params) -> bool:
    import inspect
    if "fused" not in inspect.signature(torch.optim.Adam).parameters or not params:
        return False
    dev = params[0].device.type
    if dev not in ("cpu", "cuda"):
        return False
    return all(p.is_floating_point() and p.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
               and p.device.type == dev for p in params)


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


class _DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that also answers the wrapped network's own attributes (``parameterization``, ``time_convention``), which
    the score / noise functions read from the model they are given."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def native_cpu_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is the fast way to
    train (on a CPU without it, bf16 is emulated and several times slower than float32)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_autocast(name: str, device: torch.device, log: bool = False) -> str:
    """``compute.autocast`` for this device: ``auto`` is bf16 where the device computes it natively (a CUDA GPU with
    bf16 support; a CPU with AVX512-BF16 or AMX) and none elsewhere (emulated bf16 is several times slower than
    float32); ``none`` / ``bf16`` / ``fp16`` as given (``log``: a float32 CPU run that could use bf16 says so)."""
    if name == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
                  device.type == "cpu" and native_cpu_bf16())
        if log:
            logging.info("compute.autocast=auto: %s on this %s", "bf16" if native else "float32 (no native bf16)",
                         device.type.upper())
        return "bf16" if native else "none"
    if name == "none" and log and device.type == "cpu" and native_cpu_bf16():
        logging.info("this CPU computes bf16 natively (AVX512-BF16 / AMX): --config.compute.autocast=bf16 (or auto) "
                     "trains about 1.5-2.3x faster (README, Speed options); float32 is kept unless asked")
    return name


def train(config, workdir: str, device: Optional[str] = None) -> dict:
    """Train ``config`` in ``workdir`` up to ``training.n_iters`` updates, resuming from the newest good checkpoint.

    Returns ``dict(step, loss, checkpoint, nothing_to_do, world_size)``.  Raises ``ConfigError`` for unusable values
    (before anything is written), ``lifecycle.WorkdirLockedError`` when another process trains in ``workdir``,
    ``lifecycle.Stopped`` after a graceful stop (its checkpoint written), ``NonFiniteLossError`` on a non-finite loss,
    gradient or weights (nothing is saved for that step, so the latest checkpoint stays the last good one), and
    ``atomic.WriteError`` when a file cannot be written.  In a torchrun process group (``distributed.init_from_env``
    called first, as ``main.py`` does) every rank calls this; a failure on any rank raises on all of them
    (``distributed.RankFailedError`` on the others).
    """
    configs_lib.validate(config, "train")
    ctx = dist_lib.current()
    try:
        device = get_device(device or config.device)
    except RuntimeError as e:
        raise configs_lib.ConfigError(f"config key 'device' must name a device (auto, cpu, cuda, cuda:1, ...): "
                                      f"{e}") from None
    device = dist_lib.rank_device(ctx, device)
    if str(_compute(config, "autocast", "none")).lower() == "fp16" and device.type != "cuda":
        raise configs_lib.ConfigError(
            f"config key 'compute.autocast' = 'fp16' needs a CUDA device (float16 autocast with a gradient scaler), "
            f"training runs on {device}; use bf16 (CPU or CUDA) or none")
    accum = int(_compute(config, "grad_accum", 1))
    micro = ctx.world_size * accum
    if int(config.training.batch_size) % micro:
        raise configs_lib.ConfigError(
            f"config key 'training.batch_size' must be divisible by world size x compute.grad_accum = "
            f"{ctx.world_size} x {accum} = {micro} (equal micro-batches on every rank), got "
            f"{int(config.training.batch_size)}")
    with contextlib.ExitStack() as stack:
        error = None
        if ctx.is_main:               # only rank 0 touches the workdir's lock; the others wait for its verdict
            try:
                prepare_workdir(workdir)
                stack.enter_context(lifecycle.WorkdirLock(workdir, "train"))
            except Exception as e:    # noqa: BLE001 — handed to every rank by check()
                error = e
        ctx.check(error, "start-up")
        where = f"training in {workdir}" + (f" (rank {ctx.rank} of {ctx.world_size})" if ctx.enabled else "")
        stack.enter_context(lifecycle.handle_signals("graceful", context=where))
        return _train(config, workdir, device, ctx)


def _set_up(config, workdir, device, ctx):
    """Everything before the first update: build, check the run's identity, load the newest good checkpoint."""
    tc = config.training
    if ctx.is_main:
        removed = remove_stale_temp_files([workdir, ckpt_lib.checkpoint_dir(workdir)])
        removed += remove_stale_temp_files([os.path.join(workdir, "snapshots")], recursive=True)
        if removed:
            logging.info("removed %d temporary file(s) left by an earlier, killed run", len(removed))

    config_path = os.path.join(workdir, "config.json")
    changed = []
    if os.path.isfile(config_path):
        changed = _check_identity(_read_stored_config(config_path), config, config_path)

    set_deterministic(bool(config.deterministic))
    if device.type == "cuda":         # compute.cudnn_benchmark / tf32 apply on CUDA only; deterministic wins
        torch.backends.cudnn.benchmark = bool(_compute(config, "cudnn_benchmark", False)) and \
            not bool(config.deterministic)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(_compute(config, "tf32",
                                                                                                 False))
    seed_everything(int(config.seed))
    try:
        sde = configs_lib.build_sde(config)
        # latent diffusion: the frozen autoencoder's codec (None in data space); the network is built for its latents
        codec = load_codec(config, device) if is_latent(config) else None
        model = get_network(network_config(config)).to(device)
        images = len(tuple(dataset_shape(config))) == 3
        if bool(_compute(config, "channels_last", False)) and images:
            model = model.to(memory_format=torch.channels_last)
        ema = ExponentialMovingAverage(model, decay=float(config.model.ema_rate),
                                       foreach=bool(_compute(config, "ema_foreach", True)))
        optimizer = build_optimizer(config, model.parameters())
        loss_fn = get_loss_fn(config, sde)
        dataset = get_dataset(config, "train")
    except configs_lib.ConfigError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise configs_lib.ConfigError(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    batch_size = int(tc.batch_size)
    if config.data.dataset.lower() != "toy" and batch_size > len(dataset):
        raise configs_lib.ConfigError(f"config key 'training.batch_size' must be an integer in [1, {len(dataset)}] "
                                      f"(the size of the {config.data.dataset} training split), got {batch_size}")
    logging.info("%s: %s network with %s parameters on %s; %s SDE; data %s%s", config.name, config.model.name,
                 f"{count_parameters(model):,}", device, sde, config.data.dataset,
                 f"; {ctx.world_size} ranks ({ctx.backend})" if ctx.enabled else "")

    step, scaler_state = 0, None
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
        if codec is not None:         # a resumed latent run goes on with the autoencoder it was trained on
            codec = load_codec(config, device, expected=state.get("autoencoder"))
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt_lib.CheckpointError(
                f"cannot resume from {latest}: it does not fit the network / optimiser of this config "
                f"({str(e).splitlines()[0]}). Resume with the run's own config ({config_path}) or train in a new "
                f"workdir.") from None
        layout = dict(state.get("layout", {"world_size": 1, "grad_accum": 1}))
        now = {"world_size": ctx.world_size, "grad_accum": int(_compute(config, "grad_accum", 1))}
        if layout == now:
            ranks = state.get("rng_ranks")
            set_rng_state(ranks[ctx.rank] if ranks is not None else state["rng"])
        else:
            set_rng_state(state["rng"])
            if ctx.is_main:
                logging.warning(
                    "resuming a run trained with %d rank(s) x grad_accum %d on %d rank(s) x grad_accum %d: weights, "
                    "EMA, optimiser and data order continue; the loss noise of the coming updates differs from the "
                    "original layout's (each micro-batch draws its own), so the run is not bitwise that of an "
                    "uninterrupted one", layout["world_size"], layout["grad_accum"], now["world_size"],
                    now["grad_accum"])
        step = int(state["step"])
        scaler_state = state.get("grad_scaler")     # fp16 autocast's loss scale (absent otherwise)
        del state
        logging.info("resumed from %s (step %d)", latest, step)
    if codec is not None:             # snapshots decode with the same autoencoder (run.sampling.generate reads it)
        ema.model.autoencoder_identity = dict(codec.identity)
    return dict(sde=sde, model=model, ema=ema, optimizer=optimizer, loss_fn=loss_fn, dataset=dataset, step=step,
                latest=latest, changed=changed, config_path=config_path, scaler=get_data_scaler(config),
                images=images, codec=codec, scaler_state=scaler_state)


def dataset_shape(config):
    """The shape of one example: (C, H, W) for image data, (dim,) for toy data."""
    if config.data.dataset.lower() == "toy":
        return (int(config.data.dim),)
    return (int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))


def _train(config, workdir: str, device, ctx) -> dict:
    tc = config.training
    run, error = None, None
    try:
        run = _set_up(config, workdir, device, ctx)
    except Exception as e:            # noqa: BLE001 — handed to every rank by check()
        error = e
    ctx.check(error, "start-up")
    steps = ctx.gather(run["step"])
    if len(set(steps)) > 1:
        raise ckpt_lib.CheckpointError(
            f"the ranks found different checkpoints in {ckpt_lib.checkpoint_dir(workdir)} (steps {steps}): the workdir "
            f"must be one folder every rank sees (a shared filesystem on multi-node runs)")
    sde, model, ema, optimizer, loss_fn = run["sde"], run["model"], run["ema"], run["optimizer"], run["loss_fn"]
    dataset, step, latest, changed, scaler = run["dataset"], run["step"], run["latest"], run["changed"], run["scaler"]
    config_path, codec = run["config_path"], run["codec"]
    batch_size = int(tc.batch_size)
    accum = int(_compute(config, "grad_accum", 1))
    micro_batches = ctx.world_size * accum
    micro = batch_size // micro_batches
    channels_last = bool(_compute(config, "channels_last", False)) and run["images"]
    autocast = resolve_autocast(str(_compute(config, "autocast", "none")).lower(), device, log=ctx.is_main)
    use_bf16 = autocast == "bf16"
    # fp16 (CUDA only, checked in train()): the loss is scaled by the GradScaler's factor before backward and the
    # gradients unscaled before clipping, so clipping, Adam and EMA see the true gradients; an update whose scaled
    # gradients overflowed is skipped by the scaler (weights and EMA unchanged) and the factor is lowered
    grad_scaler = torch.amp.GradScaler("cuda") if autocast == "fp16" else None
    if grad_scaler is not None and run["scaler_state"] is not None:
        grad_scaler.load_state_dict(run["scaler_state"])
    del run

    n_iters = int(tc.n_iters)
    if step >= n_iters:
        if ctx.is_main:
            logging.info("nothing to do: %s is at step %d >= training.n_iters = %d", workdir, step, n_iters)
        return {"step": step, "loss": float("nan"), "checkpoint": latest, "nothing_to_do": True,
                "world_size": ctx.world_size}
    if changed and ctx.is_main:
        logging.warning("resuming with changed settings: %s", validation_lib.describe_differences(changed))

    net = _DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ctx.enabled else model
    if bool(_compute(config, "compile", False)):
        net = torch.compile(net)

    writer = open_summary_writer(workdir) if ctx.is_main else None
    config_json = config.to_json(indent=2)
    saved = {"step": step if latest is not None else -1, "path": latest}

    def save(at_step):
        """Collective: every rank's RNG state to rank 0, which writes the checkpoint (and config.json)."""
        rngs = ctx.gather(get_rng_state())
        failure, path = None, None
        if ctx.is_main:
            try:
                path = _write(at_step, rngs)
            except Exception as e:    # noqa: BLE001 — handed to every rank by check()
                failure = e
        ctx.check(failure, f"the checkpoint of step {at_step}")
        saved.update(step=at_step, path=path if ctx.is_main else os.path.join(
            ckpt_lib.checkpoint_dir(workdir), f"ckpt_{int(at_step):08d}.pt"))
        return saved["path"]

    def _write(at_step, rngs):
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rngs[0], "config": config.to_json(),
                 "layout": {"world_size": ctx.world_size, "grad_accum": accum}}
        if codec is not None:         # latent diffusion: which autoencoder the latents are of (issue 13)
            state["autoencoder"] = dict(codec.identity)
        if ctx.enabled:
            state["rng_ranks"] = rngs
        if grad_scaler is not None:
            state["grad_scaler"] = grad_scaler.state_dict()
        try:
            path = ckpt_lib.save_checkpoint(workdir, state, at_step, keep=int(tc.keep_checkpoints))
        except ckpt_lib.NonFiniteStateError as e:
            raise NonFiniteLossError(f"{e}; training stopped. The last good checkpoint ({saved['path'] or 'none yet'})"
                                     f" is kept; lower optim.lr") from None
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
        if ctx.enabled:               # every rank stops at the same update, whichever rank got the signal
            signum = int(ctx.max_value(signum or 0)) or None
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

    def forward(x, y):
        if use_bf16 or grad_scaler is not None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16 if use_bf16 else torch.float16):
                return loss_fn(net, x, y, train=True)
        return loss_fn(net, x, y, train=True)

    def backward(loss):
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()

    seed = int(config.seed)
    from .prefetch import BatchSource     # compute.dataloader_workers / pin_memory: the same batches, built ahead
    batches = BatchSource(dataset, batch_size, seed, workers=int(_compute(config, "dataloader_workers", 0)),
                          pin=bool(_compute(config, "pin_memory", False)) and device.type == "cuda")
    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=step, desc=f"train {config.name}", dynamic_ncols=True,
               disable=None if tc.progress and ctx.is_main else True)
    interval_loss, interval_n, t_last, step_last = 0.0, 0, time.perf_counter(), step
    last_loss = float("nan")
    try:
        while step < n_iters:
            stop_if_requested()
            lr = learning_rate(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            optimizer.zero_grad(set_to_none=True)
            failure, loss_sum, pending = None, 0.0, None
            try:
                x_all, y_all = batches.get(step)
                for a in range(accum):
                    j = ctx.rank * accum + a            # this micro-batch's index in the global batch
                    # everything random in micro-batch j of update `step` comes from (seed, step, j)
                    torch.manual_seed(mix_seed(seed, 0x57E9, step) if j == 0 else mix_seed(seed, 0x57E9, step, j))
                    x = scaler(x_all[j * micro:(j + 1) * micro].to(device, non_blocking=True))
                    if codec is not None:               # latent diffusion: scale * E(x), the frozen encoder
                        x = codec.encode(x)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    y = y_all[j * micro:(j + 1) * micro].to(device) if int(config.model.num_classes) > 0 else None
                    loss = forward(x, y)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise NonFiniteLossError(
                            f"non-finite loss ({loss_value}) at step {step}"
                            + (f" on rank {ctx.rank}" if ctx.enabled else "")
                            + f": training stopped. The last good checkpoint ({saved['path'] or 'none yet'}) is "
                              f"kept; lower optim.lr, raise training.eps or check the data.")
                    loss_sum += loss_value
                    scaled = loss / accum if accum > 1 else loss
                    if ctx.enabled and a == accum - 1:
                        pending = scaled                 # its backward all-reduces: first agree that all is well
                    elif ctx.enabled:
                        with net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext():
                            backward(scaled)
                    else:
                        backward(scaled)
            except Exception as e:    # noqa: BLE001 — handed to every rank by check()
                failure = e
            if ctx.enabled:
                loss_sum, failed = ctx.sum_values([loss_sum, 1.0 if failure is not None else 0.0])
                if failed > 0:
                    ctx.check(failure, f"update {step + 1}")
                backward(pending)
            elif failure is not None:
                raise failure
            loss_value = loss_sum / micro_batches
            clip = float(config.optim.grad_clip)
            if grad_scaler is not None:
                grad_scaler.unscale_(optimizer)         # clipping and the norm on the true gradients
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf"))
            grad_norm = float(grad_norm)
            if not math.isfinite(grad_norm) and grad_scaler is None:
                raise NonFiniteLossError(
                    f"non-finite gradient norm ({grad_norm}) at step {step} (loss {loss_value:.4g}): training "
                    f"stopped. The last good checkpoint ({saved['path'] or 'none yet'}) is kept; lower optim.lr.")
            if grad_scaler is None:
                optimizer.step()
                ema.update(model)
            else:                                       # fp16: an overflowed update is skipped, the scale lowered
                grad_scaler.step(optimizer)
                grad_scaler.update()
                if math.isfinite(grad_norm):
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
                if ctx.is_main:
                    logging.info("step %d: loss %.5f, lr %.3g, grad norm %.3g, %.2f steps/s", step, mean_loss, lr,
                                 grad_norm, sps)
                interval_loss, interval_n, t_last, step_last = 0.0, 0, now, step

            if step % int(tc.checkpoint_freq) == 0 or step == n_iters:
                save(step)
            snap = int(tc.snapshot_freq)
            if tc.snapshot_sampling and snap > 0 and step % snap == 0:
                failure = None
                if ctx.is_main:
                    try:
                        _snapshot(config, sde, ema.model, writer, workdir, step, device)
                    except FloatingPointError as e:      # solvers.NonFiniteError: the model has diverged
                        failure = NonFiniteLossError(
                            f"the snapshot samples at step {step} are not finite ({str(e).splitlines()[0]}): the "
                            f"model has diverged; training stopped (checkpoint {saved['path']} kept); lower optim.lr")
                    except Exception as e:               # noqa: BLE001 — handed to every rank by check()
                        failure = e
                ctx.check(failure, f"the snapshot of step {step}")
    finally:
        batches.close()
        bar.close()
        if writer is not None:
            writer.flush()
            writer.close()
    if ctx.is_main:
        logging.info("training done at step %d (loss %.5f); checkpoint %s", step, last_loss, saved["path"])
    return {"step": step, "loss": last_loss, "checkpoint": saved["path"], "nothing_to_do": False,
            "world_size": ctx.world_size}
