"""Exported models: a checkpoint's EMA weights as ``model.safetensors`` plus the run's ``config.json``, loadable for
sampling without the optimiser state, the RNG states or the training history.

``export_model(workdir, checkpoint=None, out_dir=None, overwrite=False)`` (``--mode export``) writes
``<out_dir>/config.json`` (the config stored in the checkpoint, verbatim) and then ``<out_dir>/model.safetensors``
(``safetensors_io``: every EMA tensor under its ``state_dict`` name), each atomically (a temporary file renamed onto
the target), into ``<workdir>/export/step_<step>`` by default.  An existing export in that folder is never replaced
unless ``overwrite`` (``--overwrite``): the error names the folder.  The weights file's ``__metadata__`` records
``format`` = ``sde_diffusion``, ``format_version``, ``step``, ``ema_decay``, the source checkpoint's name,
``config_sha256`` (of config.json's bytes) and ``weights_sha256`` (``checkpoints.state_digest`` of the tensors: dtypes,
shapes and bytes), so that ``load_export`` detects a damaged weights file and a config.json from another export.

``load_export(path, config=None, device="cpu") -> (config, sde, network)`` (``--mode sample
--config.model.source=export --config.model.path=DIR``) rebuilds the network from the config (the exported one unless
given) and loads the weights strictly; ``network.checkpoint_step`` is the exported step.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Union

from .. import configs as configs_lib
from .. import safetensors_io
from ..atomic import atomic_write_bytes
from ..networks import get_network
from .checkpoints import CheckpointError, load_checkpoint, non_finite_entries, resolve_checkpoint, state_digest

__all__ = ["export_model", "load_export", "ExportError", "WEIGHTS_FILE", "CONFIG_FILE", "FORMAT_VERSION"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "sde_diffusion"
FORMAT_VERSION = "1"


class ExportError(CheckpointError):
    """An export that cannot be written (one is there already, bad weights) or read back (missing, damaged,
    mismatched files)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_model(workdir: str, checkpoint: Union[None, int, str] = None, out_dir: Optional[str] = None,
                 overwrite: bool = False) -> dict:
    """Write the EMA weights and config of a checkpoint (the latest by default) as an export (module doc); returns
    ``dict(weights=path, config=path, step=int, num_tensors=int, num_parameters=int)``."""
    path = resolve_checkpoint(workdir, checkpoint)
    state = load_checkpoint(path)
    step = int(state["step"])
    config_text = state.get("config")
    if not isinstance(config_text, str):
        stored = os.path.join(workdir, CONFIG_FILE)
        if not os.path.isfile(stored):
            raise ExportError(f"{path} stores no config and {stored} does not exist: nothing describes the network")
        with open(stored, encoding="utf-8") as f:
            config_text = f.read()
    config = configs_lib.config_from_json(config_text)               # a config that cannot be read is not exported
    if str(config.model.get("autoencoder_workdir", "") or ""):
        raise ExportError(f"{workdir} is a latent model (model.autoencoder_workdir = "
                          f"{config.model.autoencoder_workdir}): exporting it would need its autoencoder too, which "
                          f"export does not bundle yet; sample it from its workdir with --mode sample")
    weights = {k: v for k, v in state["ema"]["model"].items()}
    bad = non_finite_entries(weights)
    if bad:
        raise ExportError(f"the EMA weights in {path} hold non-finite values ({', '.join(bad[:3])}): not exported")
    out_dir = out_dir or os.path.join(workdir, "export", f"step_{step:08d}")
    w_path, c_path = os.path.join(out_dir, WEIGHTS_FILE), os.path.join(out_dir, CONFIG_FILE)
    present = [p for p in (w_path, c_path) if os.path.exists(p)]
    if present and not overwrite:
        raise ExportError(f"{out_dir} already holds an export ({', '.join(os.path.basename(p) for p in present)}): "
                          f"pass --overwrite to replace it, or choose another --out_dir")
    config_bytes = config_text.encode("utf-8")
    metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": str(step),
                "ema_decay": repr(float(state["ema"].get("decay", float("nan")))),
                "source_checkpoint": os.path.basename(path), "config_sha256": _sha256(config_bytes),
                "weights_sha256": state_digest(weights)}
    payload = safetensors_io.serialize(weights, metadata)
    # config first, weights last: a kill in between leaves a config whose weights are missing (load_export says so),
    # never weights next to a config of another export (the digest would say so)
    atomic_write_bytes(config_bytes, c_path, durable=True)
    atomic_write_bytes(payload, w_path, durable=True)
    n_params = sum(int(t.numel()) for t in weights.values() if t.is_floating_point())
    return dict(weights=w_path, config=c_path, step=step, num_tensors=len(weights), num_parameters=n_params,
                out_dir=out_dir)


def _export_files(path: str):
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return path, os.path.join(os.path.dirname(path), CONFIG_FILE)
    if not os.path.isdir(path):
        raise ExportError(f"model.path {path!r} is neither an export folder nor a .safetensors file "
                          f"(write one with --mode export)")
    return os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)


def read_export(path: str):
    """``(config_text, tensors, metadata)`` of an export folder (or its weights file), verified."""
    w_path, c_path = _export_files(path)
    for p in (w_path, c_path):
        if not os.path.isfile(p):
            raise ExportError(f"{p} does not exist: {path} is not a complete export (--mode export writes "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        tensors, meta = safetensors_io.read(w_path)
    except safetensors_io.SafetensorsError as e:
        raise ExportError(str(e)) from None
    if meta.get("format") != FORMAT_NAME:
        raise ExportError(f"{w_path} is not a sde_diffusion export (its metadata has format={meta.get('format')!r}); "
                          f"diffusers models load with --config.model.source=diffusers")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{w_path} is export format version {meta.get('format_version')!r}; this version reads "
                          f"{FORMAT_VERSION}")
    with open(c_path, "rb") as f:
        config_bytes = f.read()
    if _sha256(config_bytes) != meta.get("config_sha256"):
        raise ExportError(f"{c_path} is not the config exported with {w_path} (SHA-256 differs): keep the two files "
                          f"of an export together")
    if state_digest(tensors) != meta.get("weights_sha256"):
        raise ExportError(f"{w_path} is damaged: its tensors do not match the SHA-256 digest recorded at export")
    try:
        text = config_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExportError(f"{c_path} is not UTF-8 text: {e}") from None
    return text, tensors, meta


def load_export(path: str, config=None, device="cpu"):
    """``(config, sde, network)`` from an export (module doc); the network in eval mode, ``requires_grad`` off."""
    text, tensors, meta = read_export(path)
    if config is None:
        config = configs_lib.config_from_json(text)
    sde = configs_lib.build_sde(config)
    net = get_network(config)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as e:
        raise ExportError(f"the weights in {path} do not fit the network of this config "
                          f"({str(e).splitlines()[0]} ...): sample with the exported config") from None
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.checkpoint_step = int(meta.get("step", "0"))
    return config, sde, net
