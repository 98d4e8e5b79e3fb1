"""Checkpoints: plain state dicts written atomically, the last k kept, loadable with ``torch.load(weights_only=True)``.

Layout: ``<workdir>/checkpoints/ckpt_<step:08d>.pt`` holding
``{"format": 1, "step", "model", "ema": {"decay", "num_updates", "model"}, "optimizer", "rng", "config" (JSON)}``;
``<workdir>/config.json`` is the config of the run.

``load_model(workdir, ...) -> (config, sde, ema_model)`` and ``load_score_fn(workdir, ...) -> (config, sde,
score_fn)`` give the EMA weights for sampling and evaluation.
"""
from __future__ import annotations

import glob
import os
import re
from typing import List, Optional, Tuple, Union

import torch

from .. import configs as configs_lib
from ..atomic import atomic_path, atomic_write_text
from ..networks import get_network, get_score_fn

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")
FORMAT_VERSION = 1

__all__ = ["checkpoint_dir", "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "save_checkpoint",
           "load_checkpoint", "load_model", "load_score_fn", "CheckpointError", "atomic_write_text"]


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def list_checkpoints(workdir: str) -> List[Tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first (temporary files are ignored)."""
    out = []
    for path in glob.glob(os.path.join(checkpoint_dir(workdir), "ckpt_*.pt")):
        m = CKPT_RE.search(os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(workdir: str) -> Optional[str]:
    ckpts = list_checkpoints(workdir)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(workdir: str, checkpoint: Union[None, int, str] = None) -> str:
    """None / -1 / "latest" -> the latest checkpoint; an int (or digit string) -> that step; else a file path."""
    if checkpoint is None or checkpoint == -1 or checkpoint in ("", "latest", "-1"):
        path = latest_checkpoint(workdir)
        if path is None:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first "
                                  f"(python main.py --mode train --workdir {workdir} ...)")
        return path
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        step = int(checkpoint)
        path = os.path.join(checkpoint_dir(workdir), f"ckpt_{step:08d}.pt")
        if not os.path.isfile(path):
            have = ", ".join(str(s) for s, _ in list_checkpoints(workdir)) or "none"
            raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)} (steps: {have})")
        return path
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint file {checkpoint!r} does not exist")
    return checkpoint


def _atomic_torch_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())


def save_checkpoint(workdir: str, state: dict, step: int, keep: int = 3) -> str:
    """Write ``state`` as ``ckpt_<step>.pt`` (temporary file in the same folder + ``os.replace``), then delete all but
    the newest ``keep`` checkpoints (``keep <= 0`` keeps all).  Returns the path."""
    directory = checkpoint_dir(workdir)
    os.makedirs(directory, exist_ok=True)
    for stale in glob.glob(os.path.join(directory, ".tmp-*")):   # left by a process killed mid-write
        try:
            os.remove(stale)
        except OSError:
            pass
    path = os.path.join(directory, f"ckpt_{int(step):08d}.pt")
    _atomic_torch_save(dict(state, format=FORMAT_VERSION, step=int(step)), path)
    if keep > 0:
        for _, old in list_checkpoints(workdir)[:-keep]:
            os.remove(old)
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """``torch.load(path, weights_only=True)`` with a clear error for unreadable files."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # noqa: BLE001 — any failure to read means the file is unusable
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or "model" not in state or "ema" not in state:
        raise CheckpointError(f"{path} is not a sde_diffusion checkpoint")
    return state


def _config_for(workdir: str, state: dict, config):
    if config is not None:
        return config
    if "config" in state:
        return configs_lib.config_from_json(state["config"])
    path = os.path.join(workdir, "config.json")
    if os.path.isfile(path):
        return configs_lib.get_config(path)
    raise CheckpointError(f"no config given and none stored in {workdir}")


def load_model(workdir: str, config=None, checkpoint: Union[None, int, str] = None, device="cpu"):
    """Build the network and load the checkpoint's EMA weights: returns ``(config, sde, ema_model)``.

    ``config`` defaults to the one stored in the checkpoint; ``checkpoint`` is None (latest), a step or a path.
    The model is in eval mode with ``requires_grad`` off (gradients w.r.t. inputs still work).
    """
    path = resolve_checkpoint(workdir, checkpoint)
    state = load_checkpoint(path, map_location=device)
    config = _config_for(workdir, state, config)
    sde = configs_lib.build_sde(config)
    model = get_network(config)
    try:
        model.load_state_dict(state["ema"]["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the EMA weights in {path} do not fit the network of this config ({e}); sample with "
                              f"the config the run was trained with (<workdir>/config.json)") from e
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.checkpoint_step = int(state["step"])
    return config, sde, model


def load_score_fn(workdir: str, config=None, checkpoint: Union[None, int, str] = None, device="cpu", y=None):
    """``(config, sde, score_fn)`` with ``score_fn(x, t)`` from the EMA weights (labels ``y`` for conditional
    models, see ``networks.get_score_fn``)."""
    config, sde, model = load_model(workdir, config=config, checkpoint=checkpoint, device=device)
    return config, sde, get_score_fn(sde, model, train=False, y=y)
