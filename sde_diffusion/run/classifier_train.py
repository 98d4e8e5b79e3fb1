"""Training the time-dependent classifier p(y | x_t, t) that classifier guidance differentiates (``--mode
train_classifier``).

``train_classifier(config, workdir)`` fits ``config.classifier`` (see ``configs/digits_classifier.py``) by the noisy
cross-entropy ``sde_diffusion.classifier.classifier_loss``: data of ``config.data`` scaled to model space, perturbed by
the SDE of ``config.training.sde`` / ``config.model`` (the score model's) at t ~ U(eps, T).  Update k draws its batch
from ``dataset.batch(k, ...)`` and its times and noise from a generator seeded by ``(config.seed, k)``, so a run
resumed from a checkpoint continues exactly as an uninterrupted one would (the classifier has no dropout).

Layout of ``<workdir>``: ``config.json``; ``checkpoints/ckpt_<step:08d>.pt`` = ``{"format", "step", "kind":
"classifier", "classifier": state_dict, "optimizer", "config"}`` written atomically (the last
``classifier.keep_checkpoints`` kept); ``eval.json`` = test-set accuracy at the times ``classifier.eval_times``;
``tensorboard/`` (``classifier/loss``).

``load_classifier(workdir) -> (config, sde, model)`` loads it for ``guidance.classifier_score`` (through
``classifier.log_p_y_fn(model, sde)``).
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
from ..classifier import classifier_accuracy, classifier_loss, get_classifier
from ..data import get_data_scaler, get_dataset, mix_seed
from ..networks import count_parameters
from . import checkpoints as ckpt_lib
from .utils import get_device, open_summary_writer, optimizer_step, seed_everything

__all__ = ["build_classifier", "train_classifier", "load_classifier", "evaluate_classifier", "ClassifierError"]

_KIND = "classifier"


class ClassifierError(ValueError):
    """A classifier config or workdir that cannot be used."""


def _section(config):
    if "classifier" not in config:
        raise ClassifierError(f"config {config.name!r} has no 'classifier' section: train a classifier with a "
                              f"classifier config (digits_classifier, cifar_classifier)")
    return config.classifier


def build_classifier(config, sde) -> torch.nn.Module:
    """The network of ``config.classifier`` for the data of ``config.data`` (float32, CPU)."""
    c = _section(config)
    k = int(c.num_classes)
    if k < 2:
        raise ClassifierError(f"classifier.num_classes must be >= 2, got {k}")
    if c.name == "conv":
        if config.data.dataset.lower() == "toy":
            raise ClassifierError("the conv classifier needs image data; use classifier.name=toy_mlp for toy data")
        return get_classifier("conv", num_classes=k, in_channels=int(config.data.num_channels),
                              channels=tuple(int(ch) for ch in c.channels), emb_dim=int(c.emb_dim), T=float(sde.T),
                              data_std=float(c.data_std))
    if c.name == "toy_mlp":
        dim = int(config.data.dim) if config.data.dataset.lower() == "toy" else int(
            config.data.num_channels * config.data.image_size ** 2)
        return get_classifier("toy_mlp", dim=dim, num_classes=k, hidden=int(c.hidden), depth=int(c.depth),
                              emb_dim=int(c.emb_dim), T=float(sde.T), data_std=float(c.data_std))
    raise ClassifierError(f"unknown classifier.name {c.name!r}; available: conv, toy_mlp")


def _labelled_dataset(config, split):
    if config.data.dataset.lower() == "toy":
        raise ClassifierError("toy datasets carry no class labels: a classifier needs labelled data (digits, cifar10)")
    return get_dataset(config, split)


def evaluate_classifier(config, sde, model, device="cpu", max_examples: int = 10_000) -> dict:
    """Test-set accuracy of argmax p(y | x_t, t) at each of ``classifier.eval_times`` (fixed noise seed)."""
    test = _labelled_dataset(config, "test")
    scaler = get_data_scaler(config)
    xs, ys = [], []
    for x, y in test.iterate(1000):
        xs.append(x)
        ys.append(y)
        if sum(len(v) for v in ys) >= max_examples:
            break
    x0 = scaler(torch.cat(xs)[:max_examples]).to(device)
    y0 = torch.cat(ys)[:max_examples].to(device)
    gen = torch.Generator(device=device).manual_seed(int(config.eval.seed))
    model.eval()
    acc = {f"{float(t):g}": classifier_accuracy(model, sde, x0, y0, float(t), generator=gen, batch_size=1000)
           for t in _section(config).eval_times}
    return {"num_examples": int(x0.shape[0]), "accuracy": acc}


def train_classifier(config, workdir: str, device: Optional[str] = None) -> dict:
    """Train ``config.classifier`` in ``workdir`` up to ``classifier.n_iters`` updates, resuming from the latest
    checkpoint; then measure the test accuracy (``eval.json``).  Returns ``dict(step, loss, checkpoint, eval)``."""
    c = _section(config)
    device = get_device(device or config.device)
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, "config.json")
    ckpt_lib.atomic_write_text(config.to_json(indent=2), config_path)
    seed = int(config.seed)
    seed_everything(seed)
    sde = configs_lib.build_sde(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, 0xC1A5))
        model = build_classifier(config, sde).to(device)
    dataset = _labelled_dataset(config, "train")
    scaler = get_data_scaler(config)
    opt = torch.optim.AdamW(model.parameters(), lr=float(c.lr), weight_decay=float(c.weight_decay))
    n_iters, batch_size = int(c.n_iters), int(c.batch_size)
    if n_iters < 1:
        raise ClassifierError(f"classifier.n_iters must be >= 1, got {n_iters}")

    step = 0
    latest = ckpt_lib.latest_checkpoint(workdir)
    if latest is not None:
        state = _read(latest)
        try:
            model.load_state_dict(state["classifier"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ClassifierError(f"cannot resume from {latest}: it does not fit this classifier config ({e}); "
                                  f"resume with the run's own config ({config_path}) or use a new workdir") from e
        step = int(state["step"])
        logging.info("resumed the classifier from %s (step %d)", latest, step)
    logging.info("%s: %s classifier with %s parameters on %s; %s SDE; data %s", config.name, c.name,
                 f"{count_parameters(model):,}", device, sde, config.data.dataset)

    writer = open_summary_writer(workdir)

    def save(at_step):
        state = {"kind": _KIND, "classifier": model.state_dict(), "optimizer": opt.state_dict(),
                 "config": config.to_json()}
        return ckpt_lib.save_checkpoint(workdir, state, at_step, keep=int(c.keep_checkpoints))

    from tqdm.auto import tqdm
    bar = tqdm(total=n_iters, initial=step, desc=f"train {config.name}", dynamic_ncols=True,
               disable=None if c.progress else True)
    running, count, last_loss, last_ckpt = 0.0, 0, float("nan"), latest
    t_last, step_last = time.perf_counter(), step
    try:
        while step < n_iters:
            x, y = dataset.batch(step, batch_size, seed)
            x = scaler(x.to(device))
            y = y.to(device)
            gen = torch.Generator(device=device).manual_seed(mix_seed(seed, 0xC1A55, step))
            model.train()
            loss = classifier_loss(model, sde, x, y, generator=gen, eps=float(c.eps))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ClassifierError(f"non-finite classifier loss ({value}) at step {step}; the last good "
                                      f"checkpoint ({last_ckpt or 'none yet'}) is kept; lower classifier.lr")
            optimizer_step(model, opt, loss, float(c.grad_clip))
            step += 1
            running, count, last_loss = running + value, count + 1, value
            bar.update(1)
            if step % int(c.log_freq) == 0 or step == n_iters:
                now = time.perf_counter()
                mean = running / max(count, 1)
                sps = (step - step_last) / max(now - t_last, 1e-9)
                bar.set_postfix(loss=f"{mean:.4f}", sps=f"{sps:.1f}")
                logging.info("classifier step %d: loss %.4f, %.1f steps/s", step, mean, sps)
                if writer is not None:
                    writer.add_scalar("classifier/loss", mean, step)
                running, count, t_last, step_last = 0.0, 0, now, step
            if step % int(c.checkpoint_freq) == 0 or step == n_iters:
                last_ckpt = save(step)
    finally:
        bar.close()
    model.eval()
    result = evaluate_classifier(config, sde, model, device=device)
    result["step"] = step
    ckpt_lib.atomic_write_text(json.dumps(result, indent=2), os.path.join(workdir, "eval.json"))
    if writer is not None:
        for t, a in result["accuracy"].items():
            writer.add_scalar(f"classifier/test_accuracy_t{t}", a, step)
        writer.flush()
        writer.close()
    logging.info("classifier done at step %d; test accuracy by t: %s", step, result["accuracy"])
    return {"step": step, "loss": last_loss, "checkpoint": last_ckpt or ckpt_lib.latest_checkpoint(workdir),
            "eval": result}


def _read(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # noqa: BLE001 - any failure to read means the file is unusable
        raise ckpt_lib.CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("kind") != _KIND or "classifier" not in state:
        raise ClassifierError(f"{path} is not a classifier checkpoint (a score model's workdir?): train one with "
                              f"python main.py --mode train_classifier --config digits_classifier --workdir DIR")
    return state


def load_classifier(workdir: str, checkpoint: Union[None, int, str] = None, device="cpu"):
    """``(config, sde, model)``: the classifier of the latest (or named) checkpoint in ``workdir``, in eval mode with
    ``requires_grad`` off (gradients with respect to inputs still flow)."""
    if not workdir:
        raise ClassifierError("classifier guidance needs sampling.classifier_workdir, the workdir of a classifier "
                              "trained with --mode train_classifier")
    if not os.path.isdir(workdir):
        raise ClassifierError(f"classifier workdir {workdir!r} does not exist: train one with python main.py "
                              f"--mode train_classifier --config digits_classifier --workdir {workdir}")
    try:
        path = ckpt_lib.resolve_checkpoint(workdir, checkpoint)
    except ckpt_lib.CheckpointError as e:
        raise ClassifierError(f"classifier workdir {workdir!r}: {e}") from None
    state = _read(path)
    config = configs_lib.config_from_json(state["config"])
    sde = configs_lib.build_sde(config)
    model = build_classifier(config, sde)
    try:
        model.load_state_dict(state["classifier"])
    except RuntimeError as e:
        raise ClassifierError(f"the weights in {path} do not fit the classifier of its own config ({e})") from e
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.checkpoint_step = int(state["step"])
    return config, sde, model
