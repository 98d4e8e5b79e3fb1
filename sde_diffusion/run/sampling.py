"""Sampling to disk: EMA weights + the sampler the config names -> ``samples.npz`` and a PNG grid.

``sample(config, workdir, checkpoint=None, device=None)`` writes ``<workdir>/samples/step_<step>/samples.npz``
(key ``samples``: float32 in data space — images (N, C, H, W) in [0, 1], toy points (N, D); ``labels`` for
class-conditional models; ``nfe``, ``step``) and ``samples.png`` next to it.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

import numpy as np
import torch
from absl import logging

import solvers

from ..data import get_data_inverse_scaler, get_dataset
from ..networks import get_score_fn
from .checkpoints import load_model
from .utils import get_device, plot_points, save_image_grid

Tensor = torch.Tensor

__all__ = ["data_shape", "sampler_options", "generate", "save_samples", "sample"]


def data_shape(config):
    """Shape of one example in model space: (C, H, W) for images, (D,) for toy data."""
    if config.data.dataset.lower() == "toy":
        return (int(config.data.dim),)
    return (int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))


def sampler_options(config, method: Optional[str] = None) -> dict:
    """The entries of ``config.sampling`` that the method accepts as options (e.g. ``snr`` for ``pc``)."""
    method = method or config.sampling.method
    accepted = solvers.get_sampler(method).options
    return {k: config.sampling[k] for k in accepted if k in config.sampling}


def _labels_for(config, n: int) -> Optional[Tensor]:
    k = int(config.model.num_classes)
    if k <= 0:
        return None
    label = int(config.sampling.class_label)
    if label < 0:
        return torch.arange(n) % k
    if label > k:
        raise ValueError(f"sampling.class_label {label} is out of range for {k} classes ({k} = null)")
    return torch.full((n,), label, dtype=torch.long)


@torch.no_grad()
def generate(config, sde, model, num_samples: Optional[int] = None, batch_size: Optional[int] = None,
             seed: Optional[int] = None, device="cpu", labels: Optional[Tensor] = None, progress: bool = False):
    """Draw samples with ``config.sampling`` (method, num_steps, eps, schedule, denoise, options).

    Returns ``dict(samples=(N, *shape) float32 in data space on the CPU, labels=(N,) or None, nfe=int)``.
    """
    s = config.sampling
    n = int(num_samples if num_samples is not None else s.num_samples)
    bs = int(batch_size if batch_size is not None else s.batch_size)
    seed = int(s.seed if seed is None else seed)
    labels = _labels_for(config, n) if labels is None else labels
    inverse = get_data_inverse_scaler(config)
    shape = data_shape(config)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    options = sampler_options(config)
    out, nfe = [], 0
    for start in range(0, n, bs):
        b = min(bs, n - start)
        y = labels[start:start + b].to(device) if labels is not None else None
        score_fn = get_score_fn(sde, model, train=False, y=y)
        res = solvers.sample(sde, score_fn, (b, *shape), method=s.method, num_steps=int(s.num_steps),
                             generator=gen, eps=float(s.eps), schedule=s.schedule, denoise=bool(s.denoise),
                             progress=progress, device=device, **options)
        out.append(res.samples.float().cpu())
        nfe += res.nfe
    x = inverse(torch.cat(out))
    if config.data.dataset.lower() != "toy":
        x = x.clamp(0.0, 1.0)
    return {"samples": x, "labels": labels, "nfe": nfe}


def save_samples(config, result: dict, out_dir: str, step: int = -1, reference: Optional[Tensor] = None) -> dict:
    """Write ``samples.npz`` and ``samples.png`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    x = result["samples"]
    arrays = {"samples": x.numpy().astype(np.float32), "nfe": np.int64(result["nfe"]), "step": np.int64(step)}
    if result.get("labels") is not None:
        arrays["labels"] = result["labels"].numpy().astype(np.int64)
    npz = os.path.join(out_dir, "samples.npz")
    tmp = npz + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, npz)
    png = os.path.join(out_dir, "samples.png")
    if x.dim() == 4:
        grid = x[:256]
        save_image_grid(grid, png, scale=max(1, 128 // x.shape[-1]) if x.shape[-1] < 32 else 2)
    else:
        plot_points(x, png, reference=reference, title=f"{config.name} samples (step {step})")
    return {"npz": npz, "png": png}


def sample(config, workdir: str, checkpoint=None, device=None, out_dir: Optional[str] = None) -> dict:
    """Sample from the EMA weights of the latest (or named) checkpoint; returns paths and the number of samples."""
    device = get_device(device or config.device)
    config, sde, model = load_model(workdir, config=config, checkpoint=checkpoint, device=device)
    step = model.checkpoint_step
    logging.info("sampling %d examples from %s (step %d) with %s, %d steps, options %s", config.sampling.num_samples,
                 workdir, step, config.sampling.method, config.sampling.num_steps, sampler_options(config))
    result = generate(config, sde, model, device=device, progress=sys.stderr.isatty())
    out_dir = out_dir or os.path.join(workdir, "samples", f"step_{step:08d}")
    reference = None
    if config.data.dataset.lower() == "toy":
        reference = get_dataset(config, "test").batch(0, min(5000, config.sampling.num_samples), 12345)[0]
    paths = save_samples(config, result, out_dir, step=step, reference=reference)
    with open(os.path.join(out_dir, "sampling_config.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "nfe": result["nfe"], "sampling": config.sampling.to_dict()}, f, indent=2)
    logging.info("wrote %s and %s (%d score evaluations)", paths["npz"], paths["png"], result["nfe"])
    return dict(paths, step=step, num_samples=int(result["samples"].shape[0]), nfe=result["nfe"])
