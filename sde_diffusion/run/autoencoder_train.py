"""Training the KL autoencoder of latent diffusion (``--mode train_autoencoder``) and loading it as the loops' codec.

``train_autoencoder(config, workdir)`` fits ``config.autoencoder`` (see ``configs/ldm_digits.py``) by
``autoencoder.autoencoder_loss`` (reconstruction + beta KL) with Adam, gradient clipping and an EMA of the weights.
Update k draws its batch from ``dataset.batch(k, ...)`` and its posterior noise from ``(config.seed, k)``, so a resumed
run continues as an uninterrupted one would.  At every checkpoint the scale factor (1 / std of the EMA encoder's
posterior means over the whole training split) is measured and stored with the weights.

Reliability, as ``run/train.py``: one training per workdir (the OS lock ``.lock-train``), SIGTERM / SIGINT finish the
current update, checkpoint it and stop (``lifecycle.Stopped``), checkpoints are written atomically with their SHA-256
digest (``run/checkpoints.py``) and training resumes from the newest one that verifies.

Layout of ``<workdir>``: ``config.json``; ``checkpoints/ckpt_<step:08d>.pt`` = ``{"format", "step", "kind":
"autoencoder", "model", "ema", "optimizer", "config", "scale_factor", "latent_shape", "latent_stats", "sha256"}``;
``autoencoder.json`` (test reconstruction error of the EMA weights next to the mean-image baseline, KL, scale
factor); ``reconstructions.png`` (rows of test images over their reconstructions); ``tensorboard/``.

``load_codec(config, device, expected=None)`` -> ``LatentCodec`` of ``config.model.autoencoder_workdir`` (its latest
checkpoint; the setting may also name one checkpoint file), cached per checkpoint file; a missing, corrupt or
incompatible autoencoder is one ``AutoencoderError`` line.

Provenance (issue 13).  ``codec.identity`` = ``{"path", "step", "sha256", "scale_factor"}`` names the checkpoint the
codec came from; ``sha256`` is the digest (``checkpoints.state_digest``) of its EMA weights and scale factor, so it
survives copying or moving the workdir but not retraining.  A latent run stores the identity in each of its
checkpoints (``"autoencoder"``); a later load passes it as ``expected``.  When the workdir's latest autoencoder is
another one (retrained, replaced), the recorded step's checkpoint is used if the workdir still holds it with the same
digest (the autoencoder was trained on after the latent run started); otherwise ``check_identity`` raises
``AutoencoderMismatchError`` naming both identities.  A checkpoint recorded before identities existed is not checked.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional, Union

import torch
from absl import logging

from .. import configs as configs_lib
from ..atomic import remove_stale_temp_files
from ..autoencoder import (LatentCodec, autoencoder_loss, build_autoencoder, is_latent, kl_divergence, latent_shape,
                           measure_scale_factor)
from ..data import get_data_scaler, get_dataset, mix_seed
from ..ema import ExponentialMovingAverage
from ..networks import count_parameters
from . import checkpoints as ckpt_lib
from . import lifecycle
from .utils import get_device, open_summary_writer, optimizer_step, save_image_grid, seed_everything

__all__ = ["train_autoencoder", "load_autoencoder", "load_codec", "evaluate_autoencoder", "AutoencoderError",
           "AutoencoderMismatchError", "check_identity", "describe_identity", "weights_digest", "DATA_KEYS"]

_KIND = "autoencoder"
#: data keys an autoencoder and the latent config using it must agree on
DATA_KEYS = ("dataset", "image_size", "num_channels", "centered")


class AutoencoderError(ckpt_lib.CheckpointError):
    """An autoencoder workdir or checkpoint that cannot be used (missing, not an autoencoder, incompatible)."""


class AutoencoderMismatchError(AutoencoderError):
    """The autoencoder found is not the one a latent model was trained on (its weights digest differs)."""


def _train_command(workdir: str) -> str:
    return f"python main.py --mode train_autoencoder --config ldm_digits --workdir {workdir}"


def _train_batches(config, dataset, batch_size=500):
    scaler = get_data_scaler(config)
    for x, _ in dataset.iterate(batch_size):
        yield scaler(x)


@torch.no_grad()
def evaluate_autoencoder(config, model, device="cpu") -> dict:
    """Test-split reconstruction error of the posterior means (per pixel, model space), next to the error of the
    training split's mean image (the trivial reconstruction), and the mean KL per example."""
    scaler = get_data_scaler(config)
    train_x = torch.cat([x for x, _ in get_dataset(config, "train").iterate(1000)])
    mean_image = scaler(train_x).mean(0, keepdim=True).to(device)
    sq, sq_base, kl, n = 0.0, 0.0, 0.0, 0
    for x, _ in get_dataset(config, "test").iterate(500):
        x = scaler(x.to(device))
        mean, logvar = model.encode(x)
        x_hat = model.decode(mean)
        sq += float((x_hat - x).pow(2).sum())
        sq_base += float((mean_image - x).pow(2).sum())
        kl += float(kl_divergence(mean, logvar).sum())
        n += x.shape[0]
    dim = int(x[0].numel())
    return {"num_examples": n, "test_mse": sq / (n * dim), "mean_image_mse": sq_base / (n * dim),
            "test_kl": kl / n}


def _save_reconstructions(config, model, path: str, device, n: int = 16) -> None:
    scaler = get_data_scaler(config)
    from ..data import get_data_inverse_scaler
    inverse = get_data_inverse_scaler(config)
    x, _ = next(get_dataset(config, "test").iterate(n))
    x = scaler(x.to(device))
    with torch.no_grad():
        x_hat = model.decode(model.encode(x)[0])
    grid = torch.cat([inverse(x), inverse(x_hat).clamp(0, 1)]).cpu()
    size = int(config.data.image_size)
    save_image_grid(grid, path, nrow=x.shape[0], scale=max(1, 128 // size) if size < 32 else 2)


def train_autoencoder(config, workdir: str, device: Optional[str] = None) -> dict:
    """Train ``config.autoencoder`` in ``workdir`` up to ``autoencoder.n_iters`` updates, resuming from the newest good
    checkpoint; then measure it on the test split (``autoencoder.json``).  Returns ``dict(step, loss, checkpoint,
    scale_factor, eval, nothing_to_do)``."""
    a = config.get("autoencoder")
    if a is None:
        raise configs_lib.ConfigError(f"config {config.name!r} has no 'autoencoder' section: --mode "
                                      f"train_autoencoder needs a latent config such as ldm_digits or ldm_cifar")
    n_iters = int(a.n_iters)
    if n_iters < 1:
        raise configs_lib.ConfigError(f"config key 'autoencoder.n_iters' must be >= 1, got {n_iters}")
    if float(a.beta) < 0:
        raise configs_lib.ConfigError(f"config key 'autoencoder.beta' must be >= 0, got {float(a.beta)}")
    model = build_autoencoder(config)          # ConfigError for bad architecture keys, before anything is written
    latent_shape(config)
    device = get_device(device or config.device)
    from .train import prepare_workdir
    prepare_workdir(workdir)
    with lifecycle.WorkdirLock(workdir, "train"), \
            lifecycle.handle_signals("graceful", context=f"training the autoencoder in {workdir}"):
        return _train(config, workdir, device, model)


def _train(config, workdir, device, model) -> dict:
    a = config.autoencoder
    removed = remove_stale_temp_files([workdir, ckpt_lib.checkpoint_dir(workdir)])
    if removed:
        logging.info("removed %d temporary file(s) left by an earlier, killed run", len(removed))
    seed = int(config.seed)
    seed_everything(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, 0xAE0))
        model = build_autoencoder(config)
    model.to(device)
    ema = ExponentialMovingAverage(model, decay=float(a.ema_rate))
    opt = torch.optim.Adam(model.parameters(), lr=float(a.lr))
    dataset = get_dataset(config, "train")
    scaler = get_data_scaler(config)
    n_iters, batch_size = int(a.n_iters), int(a.batch_size)
    if batch_size < 1 or batch_size > len(dataset):
        raise configs_lib.ConfigError(f"config key 'autoencoder.batch_size' must be an integer in [1, {len(dataset)}]"
                                      f", got {batch_size}")
    config_path = os.path.join(workdir, "config.json")

    step, latest = 0, None
    latest, state, skipped = ckpt_lib.newest_good_checkpoint(workdir, map_location="cpu")
    if skipped and latest is None:
        raise ckpt_lib.CheckpointError("no usable checkpoint: " + "; ".join(str(e) for e in skipped)
                                       + ". Move the corrupt files away to train from scratch")
    if state is not None:
        if state.get("kind") != _KIND:
            raise AutoencoderError(f"{latest} is not an autoencoder checkpoint (a score model's workdir?): train the "
                                   f"autoencoder in its own workdir")
        try:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise AutoencoderError(f"cannot resume from {latest}: it does not fit this autoencoder config "
                                   f"({str(e).splitlines()[0]}); resume with the run's own config ({config_path}) "
                                   f"or use a new workdir") from None
        step = int(state["step"])
        del state
        logging.info("resumed the autoencoder from %s (step %d)", latest, step)
    if step >= n_iters:
        return {"step": step, "loss": float("nan"), "checkpoint": latest, "nothing_to_do": True,
                "scale_factor": float("nan"), "eval": None}
    logging.info("%s: KL autoencoder with %s parameters on %s, latents %s, beta %g", config.name,
                 f"{count_parameters(model):,}", device, latent_shape(config), float(a.beta))

    writer = open_summary_writer(workdir)
    saved = {"path": latest, "step": step if latest else -1, "scale": float("nan")}

    def save(at_step):
        scale, stats = measure_scale_factor(ema.model, (x.to(device) for x in _train_batches(config, dataset)))
        state = {"kind": _KIND, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                 "config": config.to_json(), "scale_factor": float(scale),
                 "latent_shape": list(latent_shape(config)), "latent_stats": stats}
        path = ckpt_lib.save_checkpoint(workdir, state, at_step, keep=int(a.keep_checkpoints))
        ckpt_lib.atomic_write_text(config.to_json(indent=2), config_path)
        saved.update(path=path, step=at_step, scale=float(scale))
        return path

    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=step, desc=f"autoencoder {config.name}", dynamic_ncols=True,
               disable=None if a.progress else True)
    running, count, last = {"loss": 0.0, "mse": 0.0, "kl": 0.0}, 0, float("nan")
    t_last, step_last = time.perf_counter(), step
    try:
        while step < n_iters:
            signum = lifecycle.stop_requested()
            if signum is not None:
                name = lifecycle.signal_name(signum)
                if step > saved["step"] and step > 0:
                    path = save(step)
                    msg = f"stopped by {name} at step {step}: checkpoint {path} written; run the same command to resume"
                else:
                    msg = f"stopped by {name} at step {step}: the latest checkpoint is {saved['path'] or 'none'}"
                raise lifecycle.Stopped(signum, msg)
            x, _ = dataset.batch(step, batch_size, seed)
            x = scaler(x.to(device))
            gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 0xAE1, step))
            model.train()
            loss, stats = autoencoder_loss(model, x, beta=float(a.beta), recon=str(a.recon), generator=gen)
            value = float(loss.detach())
            if not math.isfinite(value):
                from .train import NonFiniteLossError
                raise NonFiniteLossError(f"non-finite autoencoder loss ({value}) at step {step}; the last good "
                                         f"checkpoint ({saved['path'] or 'none yet'}) is kept; lower autoencoder.lr")
            optimizer_step(model, opt, loss, float(a.grad_clip))
            ema.update(model)
            step += 1
            last = value
            running["loss"] += value
            running["mse"] += stats["mse"]
            running["kl"] += stats["kl"]
            count += 1
            bar.update(1)
            if step % int(a.log_freq) == 0 or step == n_iters:
                now = time.perf_counter()
                mean = {k: v / max(count, 1) for k, v in running.items()}
                sps = (step - step_last) / max(now - t_last, 1e-9)
                bar.set_postfix(loss=f"{mean['loss']:.4f}", mse=f"{mean['mse']:.4f}", kl=f"{mean['kl']:.1f}")
                logging.info("autoencoder step %d: loss %.4f, mse/pixel %.5f, kl %.2f, %.1f steps/s", step,
                             mean["loss"], mean["mse"], mean["kl"], sps)
                if writer is not None:
                    for k, v in mean.items():
                        writer.add_scalar(f"autoencoder/{k}", v, step)
                running, count, t_last, step_last = {k: 0.0 for k in running}, 0, now, step
            if step % int(a.checkpoint_freq) == 0 or step == n_iters:
                save(step)
    finally:
        bar.close()
    result = evaluate_autoencoder(config, ema.model, device=device)
    result.update(step=step, scale_factor=saved["scale"], latent_shape=list(latent_shape(config)),
                  beta=float(a.beta))
    ckpt_lib.atomic_write_text(json.dumps(result, indent=2), os.path.join(workdir, "autoencoder.json"))
    try:
        _save_reconstructions(config, ema.model, os.path.join(workdir, "reconstructions.png"), device)
    except Exception as e:   # noqa: BLE001 — a picture is not worth failing a finished training for
        logging.warning("could not write reconstructions.png: %s", e)
    if writer is not None:
        writer.add_scalar("autoencoder/test_mse", result["test_mse"], step)
        writer.flush()
        writer.close()
    logging.info("autoencoder done at step %d: test mse/pixel %.5f (mean image %.5f), scale factor %.4f", step,
                 result["test_mse"], result["mean_image_mse"], saved["scale"])
    return {"step": step, "loss": last, "checkpoint": saved["path"], "scale_factor": saved["scale"],
            "eval": result, "nothing_to_do": False}


# ------------------------------------------------------------------------------------------------ loading
def load_autoencoder(workdir: str, checkpoint: Union[None, int, str] = None, device="cpu"):
    """``(config, ema_model, info)``: the EMA autoencoder of the latest (or named) checkpoint in ``workdir``, frozen,
    with ``info = {"path", "step", "scale_factor", "latent_shape", "sha256"}`` (``sha256``: ``weights_digest``)."""
    if not workdir:
        raise AutoencoderError("a latent config needs model.autoencoder_workdir, the workdir of an autoencoder "
                               "trained with --mode train_autoencoder")
    if not os.path.isdir(workdir):
        raise AutoencoderError(f"autoencoder workdir {workdir!r} (model.autoencoder_workdir) does not exist: train "
                               f"it first with {_train_command(workdir)}")
    try:
        path = ckpt_lib.resolve_checkpoint(workdir, checkpoint)
        state = ckpt_lib.load_checkpoint(path, map_location="cpu")
    except ckpt_lib.CheckpointError as e:
        raise AutoencoderError(f"autoencoder workdir {workdir!r} (model.autoencoder_workdir): "
                               f"{str(e).replace('--mode train ', '--mode train_autoencoder ')}") from None
    if state.get("kind") != _KIND or "scale_factor" not in state:
        raise AutoencoderError(f"{path} is not an autoencoder checkpoint (model.autoencoder_workdir must name the "
                               f"workdir of --mode train_autoencoder, not of a score model)")
    try:
        config = configs_lib.config_from_json(state["config"])
        model = build_autoencoder(config)
        model.load_state_dict(state["ema"]["model"])
    except (configs_lib.ConfigError, RuntimeError, KeyError, ValueError) as e:
        raise AutoencoderError(f"the autoencoder in {path} cannot be rebuilt from its own config "
                               f"({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = {"path": path, "step": int(state["step"]), "scale_factor": float(state["scale_factor"]),
            "latent_shape": tuple(int(s) for s in state["latent_shape"]),
            "sha256": weights_digest(state["ema"]["model"], state["scale_factor"])}
    return config, model, info


def weights_digest(weights: dict, scale_factor: float) -> str:
    """SHA-256 (hex) of an autoencoder's (EMA) state dict and its scale factor: everything decoding depends on."""
    return ckpt_lib.state_digest({"weights": weights, "scale_factor": float(scale_factor)})


_CACHE: dict = {}
_CACHE_SIZE = 4


def _codec_source(setting: str):
    """``(workdir, checkpoint)`` of ``model.autoencoder_workdir``: a workdir (latest checkpoint) or one checkpoint
    file ``<workdir>/checkpoints/ckpt_<step>.pt``."""
    if os.path.isfile(setting):
        folder = os.path.dirname(os.path.abspath(setting))
        workdir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
        return workdir, setting
    return setting, None


def _codec(config, workdir, checkpoint, device, sample) -> LatentCodec:
    """The codec of ``checkpoint`` (None: the latest) in ``workdir``, checked against ``config``, cached."""
    path = checkpoint
    if path is None and os.path.isdir(workdir):
        path = ckpt_lib.latest_checkpoint(workdir)
    key = None
    if path is not None and os.path.isfile(path):
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size, str(device), sample)
        if key in _CACHE:
            codec = _CACHE[key]
            _check_compatible(config, codec.config, codec.shape, codec.source)
            return codec
    ae_config, model, info = load_autoencoder(workdir, checkpoint=checkpoint, device=device)
    _check_compatible(config, ae_config, info["latent_shape"], info["path"])
    identity = {"path": os.path.abspath(info["path"]), "step": info["step"], "sha256": info["sha256"],
                "scale_factor": info["scale_factor"]}
    codec = LatentCodec(model, info["scale_factor"], info["latent_shape"], sample=sample,
                        source=f"{info['path']} (step {info['step']})", identity=identity)
    codec.config = ae_config
    if key is not None:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = codec
    return codec


def load_codec(config, device="cpu", expected: Optional[dict] = None) -> LatentCodec:
    """The ``LatentCodec`` of ``config.model.autoencoder_workdir`` on ``device``: the workdir's latest checkpoint, or
    the checkpoint file the setting names.  Checked against ``config`` (the data keys ``DATA_KEYS`` and the latent
    shape of ``config.autoencoder`` must be the autoencoder's) and, when ``expected`` (the ``identity`` a latent run
    recorded) is given, against it: if the latest checkpoint is another autoencoder, the recorded step's checkpoint
    is used when the workdir still holds it unchanged, else ``AutoencoderMismatchError``.  Cached per (checkpoint
    file, modification time, size, device, sampling)."""
    if not is_latent(config):
        raise AutoencoderError(f"config {config.name!r} diffuses in data space (model.autoencoder_workdir is empty)")
    workdir, checkpoint = _codec_source(str(config.model.autoencoder_workdir).strip())
    sample = bool(config.model.get("latent_sample", False))
    device = torch.device(device)
    codec = _codec(config, workdir, checkpoint, device, sample)
    if not expected or _same_autoencoder(codec.identity, expected):
        return codec
    # the autoencoder was trained on (or retrained) after the latent run started: its own checkpoint may still be kept
    step = expected.get("step")
    if checkpoint is None and step is not None:
        path = os.path.join(ckpt_lib.checkpoint_dir(workdir), f"ckpt_{int(step):08d}.pt")
        if os.path.isfile(path) and os.path.realpath(path) != os.path.realpath(codec.identity["path"]):
            try:
                older = _codec(config, workdir, path, device, sample)
            except AutoencoderError:
                older = None
            if older is not None and _same_autoencoder(older.identity, expected):
                logging.info("using the autoencoder checkpoint %s (step %d), the one this latent model was trained "
                             "on; the latest in %s is step %d", path, int(step), workdir, codec.identity["step"])
                return older
    check_identity(codec, expected)
    return codec


def _same_autoencoder(identity: dict, recorded: dict) -> bool:
    return bool(identity.get("sha256")) and identity.get("sha256") == recorded.get("sha256")


def describe_identity(identity: dict) -> str:
    """``<path> (step S, sha256 <first 12 hex digits>)``."""
    sha = str(identity.get("sha256") or "?")
    return f"{identity.get('path', '?')} (step {identity.get('step', '?')}, sha256 {sha[:12]})"


def check_identity(codec: LatentCodec, recorded: Optional[dict]) -> None:
    """Raise ``AutoencoderMismatchError`` (one line naming both identities and the fix) when ``codec`` is not the
    autoencoder ``recorded`` (an ``identity`` stored by a latent run) names; ``recorded`` empty or None: no check
    (a run from before identities were recorded)."""
    if not recorded:
        return
    if not recorded.get("sha256"):
        raise AutoencoderMismatchError(f"the recorded autoencoder identity {recorded!r} has no sha256: it cannot be "
                                       f"verified")
    if _same_autoencoder(codec.identity, recorded):
        return
    raise AutoencoderMismatchError(
        f"the autoencoder {describe_identity(codec.identity)} is not the one this latent model was trained on, "
        f"{describe_identity(recorded)}: its latents are not the ones the model learnt. Point "
        f"model.autoencoder_workdir (--config.model.autoencoder_workdir=...) at the autoencoder run the model was "
        f"trained with, or directly at its checkpoint file {recorded.get('path', '')} (restore that file if it was "
        f"replaced or deleted)")


def _check_compatible(config, ae_config, shape, where):
    diffs = [f"data.{k} ({ae_config.data[k]!r} there, {config.data[k]!r} here)" for k in DATA_KEYS
             if str(ae_config.data[k]).lower() != str(config.data[k]).lower()]
    want = latent_shape(config)
    if tuple(shape) != tuple(want):
        diffs.append(f"latent shape ({tuple(shape)} there, {want} from this config's autoencoder section)")
    if diffs:
        raise AutoencoderError(f"the autoencoder {where} does not fit this latent config: {', '.join(diffs)}; train "
                               f"an autoencoder with this config (--mode train_autoencoder) or point "
                               f"model.autoencoder_workdir at a matching one")
