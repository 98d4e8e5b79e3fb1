"""Checkpoints: plain state dicts written atomically, the last k kept, loadable with ``torch.load(weights_only=True)``,
each carrying a SHA-256 digest of its contents that every load verifies.

Layout: ``<workdir>/checkpoints/ckpt_<step:08d>.pt`` holding
``{"format": 2, "step", "model", "ema": {"decay", "num_updates", "model"}, "optimizer", "rng", "config" (JSON),
"sha256"}``; ``<workdir>/config.json`` is the config of the run.

Integrity.  ``sha256`` is the digest of a canonical serialisation of everything else in the file (``state_digest``:
every tensor's dtype, shape and raw bytes, every number, string and key, in sorted key order), computed from the
in-memory state before it is serialised; ``load_checkpoint`` recomputes it from what it read and raises
``CorruptCheckpointError`` naming the file when they differ (a flipped byte inside a tensor, a damaged config, ...).
Files that cannot be unpickled at all (truncated, zeroed) raise the same error.  Checkpoints written before digests
existed (``format`` 1) load with a warning.  ``save_checkpoint`` refuses a state with non-finite floating-point
tensors (``NonFiniteStateError``): a checkpoint on disk always holds finite weights.  The bytes are serialised in
memory and written with one ``write`` + ``fsync`` into a temporary file that is renamed onto the target, so a kill
never leaves a half-written checkpoint and a full disk raises ``atomic.WriteError`` (path + cause) with the previous
checkpoints untouched.  A file already present at the target path (only possible when training resumed from an
earlier checkpoint because that one was corrupt) is renamed to ``<name>.corrupt`` first, never deleted.

``load_model(workdir, ...) -> (config, sde, ema_model)`` and ``load_score_fn(workdir, ...) -> (config, sde,
score_fn)`` give the EMA weights for sampling and evaluation.
"""
from __future__ import annotations

import glob
import hashlib
import io
import math
import os
import re
from typing import List, Optional, Tuple, Union

import torch
from absl import logging

from .. import configs as configs_lib
from ..atomic import atomic_write_bytes, atomic_write_text
from ..networks import get_network, get_score_fn

CKPT_RE = re.compile(r"ckpt_(\d+)\.pt$")
FORMAT_VERSION = 2
DIGEST_KEY = "sha256"

__all__ = ["checkpoint_dir", "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "save_checkpoint",
           "load_checkpoint", "load_model", "load_score_fn", "CheckpointError", "CorruptCheckpointError",
           "NonFiniteStateError", "atomic_write_text", "state_digest", "non_finite_entries", "newest_good_checkpoint"]


class CheckpointError(RuntimeError):
    pass


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read or whose contents do not match its recorded digest."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"checkpoint {path} is corrupt: {reason}")
        self.path, self.reason = path, reason


class NonFiniteStateError(CheckpointError):
    """A state with NaN / inf tensors, which is never written as a checkpoint."""


# ------------------------------------------------------------------------------------------------ integrity
def _feed(h, obj) -> None:
    """Canonical, type-tagged, length-prefixed serialisation of a checkpoint state into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:
            t = t.to_dense()
        t = t.cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"d{len(obj)}:".encode())
        for k in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'l' if isinstance(obj, list) else 't'}{len(obj)}:".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        h.update(f"s{len(b)}:".encode())
        h.update(b)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(f"b{len(obj)}:".encode())
        h.update(bytes(obj))
    elif isinstance(obj, bool) or obj is None:
        h.update(f"c{obj!r};".encode())
    elif isinstance(obj, int):
        h.update(f"i{obj};".encode())
    elif isinstance(obj, float):
        h.update(f"f{obj.hex() if math.isfinite(obj) else repr(obj)};".encode())
    else:
        r = repr(obj).encode("utf-8")
        h.update(f"r{type(obj).__name__}{len(r)}:".encode())
        h.update(r)


def state_digest(state: dict) -> str:
    """SHA-256 (hex) of everything in ``state`` except its ``sha256`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return h.hexdigest()


def non_finite_entries(obj, prefix: str = "") -> List[str]:
    """Names of the floating-point tensors (and float numbers) in ``obj`` that hold NaN or inf."""
    bad = []
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            bad.append(prefix or "<tensor>")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad.extend(non_finite_entries(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad.extend(non_finite_entries(v, f"{prefix}[{i}]"))
    return bad


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


def serialize_checkpoint(state: dict, step: int) -> bytes:
    """The bytes of ``ckpt_<step>.pt`` for ``state``: format, step and digest added, non-finite states refused."""
    bad = non_finite_entries({k: state[k] for k in ("model", "ema", "optimizer") if k in state})
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteStateError(f"the state at step {int(step)} holds non-finite values ({shown}): no checkpoint "
                                  f"is written from it")
    full = dict(state, format=FORMAT_VERSION, step=int(step))
    full[DIGEST_KEY] = state_digest(full)
    buf = io.BytesIO()
    torch.save(full, buf)
    return buf.getvalue()


def save_checkpoint(workdir: str, state: dict, step: int, keep: int = 3) -> str:
    """Write ``state`` as ``ckpt_<step>.pt`` (see the module docstring), then delete all but the newest ``keep``
    checkpoints up to this step (``keep <= 0`` keeps all; later ones, left by a run resumed from an earlier
    checkpoint, are neither counted nor deleted).  Returns the path.  Raises ``NonFiniteStateError`` for a
    non-finite state and ``atomic.WriteError`` when the file cannot be written (the previous files stay)."""
    directory = checkpoint_dir(workdir)
    payload = serialize_checkpoint(state, step)
    path = os.path.join(directory, f"ckpt_{int(step):08d}.pt")
    if os.path.exists(path):
        aside, k = path + ".corrupt", 1
        while os.path.exists(aside):
            aside, k = f"{path}.corrupt{k}", k + 1
        os.replace(path, aside)
        logging.warning("%s existed (the run resumed from an earlier checkpoint); kept as %s", path, aside)
    atomic_write_bytes(payload, path, durable=True)
    if keep > 0:
        for _, old in [c for c in list_checkpoints(workdir) if c[0] <= int(step)][:-keep]:
            os.remove(old)
    return path


_warned_unverified = set()


def load_checkpoint(path: str, map_location="cpu", verify: bool = True) -> dict:
    """``torch.load(path, weights_only=True)``, its digest verified; ``CorruptCheckpointError`` (one line naming the
    file) for unreadable or altered files."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as e:   # noqa: BLE001 — any failure to read means the file is unusable
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise CorruptCheckpointError(path, f"it cannot be read ({reason})") from None
    if not isinstance(state, dict) or "model" not in state or "ema" not in state:
        raise CheckpointError(f"{path} is not a sde_diffusion checkpoint")
    if verify:
        recorded = state.get(DIGEST_KEY)
        if recorded is None:
            if int(state.get("format", 1)) >= 2:
                raise CorruptCheckpointError(path, "its SHA-256 digest is missing")
            if path not in _warned_unverified:
                _warned_unverified.add(path)
                logging.warning("%s was written before checkpoints carried digests: its contents are not verified",
                                path)
        elif state_digest(state) != recorded:
            raise CorruptCheckpointError(path, "its contents do not match the SHA-256 digest recorded when it was "
                                               "written (damaged on disk or in transfer)")
    return state


def newest_good_checkpoint(workdir: str, map_location="cpu"):
    """``(path, state, skipped)`` for the newest checkpoint that loads and verifies, newest first; ``skipped`` lists
    the ``CorruptCheckpointError`` of every newer one.  ``(None, None, skipped)`` when none is good."""
    skipped = []
    for _, path in reversed(list_checkpoints(workdir)):
        try:
            return path, load_checkpoint(path, map_location=map_location), skipped
        except CorruptCheckpointError as e:
            skipped.append(e)
    return None, None, skipped


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
    from ..autoencoder import network_config
    model = get_network(network_config(config))      # a latent config's network works on its latents' shape
    try:
        model.load_state_dict(state["ema"]["model"])
    except RuntimeError as e:
        raise CheckpointError(f"the EMA weights in {path} do not fit the network of this config ({e}); sample with "
                              f"the config the run was trained with (<workdir>/config.json)") from e
    bad = non_finite_entries(state["ema"]["model"])
    if bad:
        raise CheckpointError(f"the EMA weights in {path} hold non-finite values ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): the model is unusable; pick an earlier checkpoint "
                              f"(--checkpoint STEP)")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.checkpoint_step = int(state["step"])
    model.autoencoder_identity = state.get("autoencoder")    # latent models: the autoencoder they were trained on
    return config, sde, model


def load_score_fn(workdir: str, config=None, checkpoint: Union[None, int, str] = None, device="cpu", y=None):
    """``(config, sde, score_fn)`` with ``score_fn(x, t)`` from the EMA weights (labels ``y`` for conditional
    models, see ``networks.get_score_fn``)."""
    config, sde, model = load_model(workdir, config=config, checkpoint=checkpoint, device=device)
    return config, sde, get_score_fn(sde, model, train=False, y=y)
