"""Evaluation: the test-set loss of the EMA weights (the likelihood issue extends this with bits/dim).

``evaluate(config, workdir, checkpoint=None, device=None) -> dict`` (checkpoint: a step or path; default
``eval.checkpoint``, -1 = the latest) writes ``<workdir>/eval/eval_<step>.json`` and
the scalar ``eval/test_loss`` to TensorBoard.  The loss uses the training objective with a fixed generator
(``eval.seed``), so repeated evaluations of one checkpoint agree.
"""
from __future__ import annotations

import json
import os

import torch
from absl import logging

from ..data import get_data_scaler, get_dataset
from ..losses import get_loss_fn
from .checkpoints import atomic_write_text, load_model
from .utils import get_device

__all__ = ["test_loss", "evaluate"]


@torch.no_grad()
def test_loss(config, sde, model, device="cpu") -> dict:
    """Mean training loss over the test split (labels kept, never dropped), with t and z from ``eval.seed``."""
    device = torch.device(device)
    dataset = get_dataset(config, "test")
    scaler = get_data_scaler(config)
    loss_fn = get_loss_fn(config, sde)
    gen = torch.Generator(device=device).manual_seed(int(config.eval.seed))
    total, count = 0.0, 0
    for x, y in dataset.iterate(int(config.eval.batch_size)):
        x = scaler(x.to(device))
        y = y.to(device) if int(config.model.num_classes) > 0 else None
        loss = loss_fn(model, x, y, train=False, generator=gen)
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    return {"test_loss": total / max(count, 1), "num_examples": count}


def evaluate(config, workdir: str, checkpoint=None, device=None) -> dict:
    device = get_device(device or config.device)
    if checkpoint is None and int(config.eval.checkpoint) >= 0:
        checkpoint = int(config.eval.checkpoint)
    config, sde, model = load_model(workdir, config=config, checkpoint=checkpoint, device=device)
    step = model.checkpoint_step
    result = dict(test_loss(config, sde, model, device), step=step)
    path = os.path.join(workdir, "eval", f"eval_{step:08d}.json")
    atomic_write_text(json.dumps(result, indent=2), path)
    try:
        from torch.utils.tensorboard import SummaryWriter
        with SummaryWriter(os.path.join(workdir, "tensorboard")) as writer:
            writer.add_scalar("eval/test_loss", result["test_loss"], step)
    except ImportError:   # tensorboard not installed: the JSON file is the record
        pass
    logging.info("step %d: test loss %.6f over %d examples -> %s", step, result["test_loss"],
                 result["num_examples"], path)
    return dict(result, path=path)
