"""Up-front checks of a config's values: every error names the key, the allowed range and the value it got.

``validate(config, mode)`` checks the sections ``mode`` (``train``, ``sample``, ``eval``) uses and raises
``ConfigError`` on the first bad value, before anything is built, loaded or written.  Names (``training.sde``,
``model.name``, ``sampling.method``, ...) are checked where they are resolved (their registries give the list of
valid names); this module checks types and numeric ranges, which no registry does.

Run-identity keys: ``RESUMABLE_KEYS`` are the keys a resumed training may change (length, logging, checkpointing,
sampling and evaluation settings, device, data location); any other difference between a workdir's ``config.json``
and the config of a resume is refused (``identity_differences``).
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Tuple

from . import ConfigError

__all__ = ["validate", "flatten", "config_differences", "identity_differences", "RESUMABLE_KEYS"]

#: keys (or prefixes ending in '.') that may differ between a run's config.json and a resume of it
RESUMABLE_KEYS = ("training.n_iters", "training.log_freq", "training.checkpoint_freq", "training.keep_checkpoints",
                  "training.snapshot_freq", "training.snapshot_sampling", "training.snapshot_num_samples",
                  "training.progress", "sampling.", "eval.", "device", "data.root", "data.download",
                  "compute.")


def _get(config, key):
    node = config
    for part in key.split("."):
        if part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def _number(config, key, *, integer=False, lo=None, hi=None, lo_open=False, hi_open=False, text=None):
    v = _get(config, key)
    if v is _MISSING:
        return
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    rng = text or _range_text(lo, hi, lo_open, hi_open)
    if isinstance(v, bool) or not ok_type:
        raise ConfigError(f"config key {key!r} must be {kind} {rng}, got {v!r} ({type(v).__name__})")
    if not integer and not math.isfinite(v):
        raise ConfigError(f"config key {key!r} must be {kind} {rng}, got {v!r}")
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        raise ConfigError(f"config key {key!r} must be {kind} {rng}, got {v!r}")


def _range_text(lo, hi, lo_open, hi_open):
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def _choice(config, key, allowed):
    v = _get(config, key)
    if v is _MISSING:
        return
    if not isinstance(v, str) or v.lower() not in allowed:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed)}, got {v!r}")


def _bool(config, key):
    v = _get(config, key)
    if v is not _MISSING and not isinstance(v, bool):
        raise ConfigError(f"config key {key!r} must be true or false, got {v!r} ({type(v).__name__})")


def _common(config):
    _number(config, "seed", integer=True, lo=0)
    _bool(config, "deterministic")
    dev = _get(config, "device")
    if dev is not _MISSING and not isinstance(dev, str):
        raise ConfigError(f"config key 'device' must be a device name (auto, cpu, cuda, cuda:1, ...), got {dev!r}")
    _choice(config, "data.dataset", ("cifar10", "digits", "toy"))
    if str(_get(config, "data.dataset")).lower() == "toy":
        from ..data import TOY_DATASETS
        _choice(config, "data.name", TOY_DATASETS)
        _number(config, "data.dim", integer=True, lo=1)
    else:
        _number(config, "data.image_size", integer=True, lo=1)
        _number(config, "data.num_channels", integer=True, lo=1)
    _number(config, "model.num_classes", integer=True, lo=0)
    _choice(config, "model.source", ("ours", "export", "diffusers"))
    source, path = _get(config, "model.source"), _get(config, "model.path")
    if source is not _MISSING and str(source).lower() != "ours" and (not isinstance(path, str) or not path):
        raise ConfigError(f"config key 'model.path' must name the folder to load with model.source = {source} "
                          f"(--config.model.path=DIR), got {path!r}")
    _number(config, "model.num_scales", integer=True, lo=1)
    _number(config, "model.beta_min", lo=0, lo_open=True)
    _number(config, "model.beta_max", lo=0, lo_open=True)
    _number(config, "model.sigma_min", lo=0, lo_open=True)
    _number(config, "model.sigma_max", lo=0, lo_open=True)
    sde = str(_get(config, "training.sde")).lower()
    if sde in ("vp", "vpsde", "subvp", "subvpsde") and config.model.beta_max < config.model.beta_min:
        raise ConfigError(f"config key 'model.beta_max' must be >= model.beta_min = {config.model.beta_min:g}, "
                          f"got {config.model.beta_max!r}")
    if sde in ("ve", "vesde") and config.model.sigma_max <= config.model.sigma_min:
        raise ConfigError(f"config key 'model.sigma_max' must be > model.sigma_min = {config.model.sigma_min:g}, "
                          f"got {config.model.sigma_max!r}")
    _number(config, "model.nf", integer=True, lo=1)
    _number(config, "model.sigma_data", lo=0, lo_open=True)
    _choice(config, "model.precond", ("none", "edm"))
    if str(_get(config, "model.precond")).lower() == "edm" and _get(config, "model.parameterization") != "x0":
        raise ConfigError(f"config key 'model.parameterization' must be x0 with model.precond = edm (the wrapper "
                          f"outputs EDM's denoiser D), got {_get(config, 'model.parameterization')!r}")
    _number(config, "model.dropout", lo=0, hi=1, hi_open=True)
    _number(config, "model.ema_rate", lo=0, hi=1)
    _bool(config, "model.learned_variance")
    if _get(config, "model.learned_variance") is True and str(_get(config, "training.loss")) != "ddpm":
        raise ConfigError(f"config key 'model.learned_variance' needs training.loss = ddpm (Improved DDPM's hybrid "
                          f"loss trains v), got training.loss = {_get(config, 'training.loss')!r}")


def _compute(config, mode):
    """The ``compute`` section (issue 17): threads for every mode, the speed options for training."""
    c = "compute."
    _number(config, c + "threads", integer=True, lo=0, text=">= 0 (0 = PyTorch's default)")
    _number(config, c + "dist_timeout", lo=0, lo_open=True, text="> 0 (seconds)")
    if mode != "train":
        return
    _number(config, c + "grad_accum", integer=True, lo=1)
    _choice(config, c + "autocast", ("none", "bf16", "fp16", "auto"))
    _choice(config, c + "adam_impl", ("auto", "fused", "foreach", "loop"))
    _bool(config, c + "ema_foreach")
    _bool(config, c + "channels_last")
    _bool(config, c + "compile")
    _number(config, c + "dataloader_workers", integer=True, lo=0, text=">= 0 (0 = batches assembled in the loop)")
    _bool(config, c + "pin_memory")
    _bool(config, c + "cudnn_benchmark")
    _bool(config, c + "tf32")
    accum, batch = _get(config, c + "grad_accum"), _get(config, "training.batch_size")
    if accum is not _MISSING and isinstance(batch, int) and batch % accum:
        raise ConfigError(f"config key 'compute.grad_accum' must divide training.batch_size = {batch} "
                          f"(micro-batches of equal size), got {accum}")


def _training(config):
    t = "training."
    _number(config, t + "batch_size", integer=True, lo=1)
    _number(config, t + "n_iters", integer=True, lo=1,
            text=">= 1 (a run already at or past n_iters has nothing to do and says so)")
    _number(config, t + "log_freq", integer=True, lo=1)
    _number(config, t + "checkpoint_freq", integer=True, lo=1)
    _number(config, t + "keep_checkpoints", integer=True, lo=0, text=">= 0 (0 keeps every checkpoint)")
    _number(config, t + "snapshot_freq", integer=True, lo=0, text=">= 0 (0 = no snapshots)")
    _number(config, t + "snapshot_num_samples", integer=True, lo=1)
    _number(config, t + "eps", lo=0, hi=1, lo_open=True, hi_open=True)
    _number(config, t + "p_uncond", lo=0, hi=1)
    _bool(config, t + "fm_ot")
    _number(config, t + "P_mean")
    _number(config, t + "P_std", lo=0, lo_open=True)
    _number(config, t + "vlb_weight", lo=0)
    _choice(config, t + "reduce", ("mean", "sum"))
    _bool(config, t + "snapshot_sampling")
    _bool(config, t + "progress")
    o = "optim."
    _choice(config, o + "optimizer", ("adam", "adamw"))
    _number(config, o + "lr", lo=0, lo_open=True)
    _number(config, o + "beta1", lo=0, hi=1, hi_open=True)
    _number(config, o + "beta2", lo=0, hi=1, hi_open=True)
    _number(config, o + "eps", lo=0, lo_open=True)
    _number(config, o + "weight_decay", lo=0)
    _number(config, o + "warmup", integer=True, lo=0, text=">= 0 (0 = no warm-up)")
    _number(config, o + "grad_clip", lo=0, text=">= 0 (0 = no clipping)")


def _sampling(config):
    s = "sampling."
    _number(config, s + "num_steps", integer=True, lo=1)
    _number(config, s + "num_samples", integer=True, lo=1)
    _number(config, s + "batch_size", integer=True, lo=1)
    _number(config, s + "eps", lo=0, lo_open=True, hi=1)
    _number(config, s + "seed", integer=True, lo=0)
    _bool(config, s + "denoise")
    _choice(config, s + "autocast", ("none", "bf16", "fp16"))
    m = _get(config, s + "method")
    if m is not _MISSING and not isinstance(m, str):
        raise ConfigError(f"config key 'sampling.method' must be a sampler name, got {m!r}")


def _eval(config):
    e = "eval."
    _number(config, e + "batch_size", integer=True, lo=1)
    _number(config, e + "num_samples", integer=True, lo=1)
    _number(config, e + "seed", integer=True, lo=0)
    _number(config, e + "sample_seed", integer=True, lo=0)
    _bool(config, e + "enable_bpd")
    _bool(config, e + "enable_sampling")
    _bool(config, e + "enable_elbo")
    _number(config, e + "elbo_batch_size", integer=True, lo=1)
    _number(config, e + "elbo_num_steps", integer=True, lo=0, text=">= 0 (0 = every level of the chain)")
    _number(config, e + "elbo_num_t", integer=True, lo=0, text=">= 0 (0 = no continuous bound)")
    _choice(config, e + "elbo_importance", ("logsnr", "uniform"))
    _bool(config, e + "elbo_clip_denoised")


def validate(config, mode: str = "train") -> None:
    """Raise ``ConfigError`` (key, allowed range, value) for the first unusable value ``mode`` would use."""
    _common(config)
    _compute(config, mode)
    if mode == "train":
        _training(config)
        if bool(_get(config, "training.snapshot_sampling")) and int(_get(config, "training.snapshot_freq")) > 0:
            _sampling(config)
    elif mode == "sample":
        _sampling(config)
    elif mode == "eval":
        _number(config, "training.eps", lo=0, hi=1, lo_open=True, hi_open=True)
        _eval(config)
        if bool(_get(config, "eval.enable_sampling")):
            _sampling(config)


# ------------------------------------------------------------------------------------------------ differences
def flatten(config) -> Dict[str, object]:
    """``{"a.b": value}`` of a ConfigDict / dict, JSON-normalised (tuples as lists)."""
    d = json.loads(config.to_json()) if hasattr(config, "to_json") else json.loads(json.dumps(config))
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v
    walk(d, "")
    return out


def config_differences(old, new) -> List[Tuple[str, object, object]]:
    """``[(key, old value, new value)]`` for every key whose value differs (``<absent>`` where one lacks it)."""
    a, b = flatten(old), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out.append((k, va, vb))
    return out


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE_KEYS)


def identity_differences(old, new) -> Tuple[list, list]:
    """(differences in run-identity keys, differences in keys a resume may change)."""
    diffs = config_differences(old, new)
    return [d for d in diffs if not _resumable(d[0])], [d for d in diffs if _resumable(d[0])]


def describe_differences(diffs, limit: int = 8) -> str:
    parts = [f"{k} ({json.dumps(a)} -> {json.dumps(b)})" for k, a, b in diffs[:limit]]
    if len(diffs) > limit:
        parts.append(f"and {len(diffs) - limit} more")
    return ", ".join(parts)
