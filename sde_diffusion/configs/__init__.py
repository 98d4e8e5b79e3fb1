"""Named configurations and command-line overrides.

* ``get_config(name_or_path)`` — a named config (``vp_cifar``, ``subvp_cifar``, ``ve_cifar``, ``vp_digits``,
  ``toy_2d``, ``toy_1d``; class-conditional ``vp_digits_cond``, ``vp_cifar_cond``; time-dependent classifiers for
  classifier guidance ``digits_classifier``, ``cifar_classifier``; flow matching ``fm_digits``, EDM ``edm_digits``;
  learned reverse variances ``vp_digits_learned_var``; CIFAR-10 flow matching and EDM with published
  hyper-parameters ``fm_cifar``, ``edm_cifar``; latent diffusion ``ldm_digits``, ``ldm_cifar``), a
  Python file defining ``get_config()``, or a JSON file (e.g. a run's ``config.json``).
* ``apply_overrides(config, ["training.batch_size=8", ...])`` — typed overrides with errors that name the closest
  valid keys (difflib) and the expected type.
* ``build_sde(config)`` — the SDE named by ``config.training.sde`` with its parameters from ``config.model``.
"""
from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import json
import os
from typing import Iterable, List, Mapping, Union

import ml_collections

CONFIG_NAMES = ("vp_cifar", "subvp_cifar", "ve_cifar", "vp_digits", "toy_2d", "toy_1d", "vp_digits_cond",
                "vp_cifar_cond", "digits_classifier", "cifar_classifier", "fm_digits", "edm_digits",
                "vp_digits_learned_var", "ldm_digits", "ldm_cifar", "fm_cifar", "edm_cifar")

__all__ = ["get_config", "available_configs", "apply_overrides", "parse_override", "build_sde", "ConfigError",
           "config_from_json", "CONFIG_NAMES", "validate"]


#: sections whose keys are not fixed by the default config: a sampler's and a schedule's own options, checked against
#: their signatures when sampling starts (``run.sampling.sampler_options``)
OPEN_SECTIONS = ("sampling.options",)


class ConfigError(ValueError):
    """A configuration name, path, key or value that cannot be used."""


def available_configs() -> List[str]:
    return list(CONFIG_NAMES)


def _lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.lock()
    return config


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Rebuild a ConfigDict from ``config.to_json()`` (lists stay lists; networks accept both).

    Keys the stored config lacks (a run written by an older version) take the values of the base configuration, so
    that ``--config.a.b=v`` overrides of newer keys work on older runs."""
    def to_cd(d):
        return ml_collections.ConfigDict({k: to_cd(v) if isinstance(v, dict) else v for k, v in d.items()})

    def fill(cfg, base, prefix=""):
        for k, v in base.items():
            if k not in cfg:
                cfg[k] = v
            elif isinstance(v, ml_collections.ConfigDict):
                if not isinstance(cfg[k], ml_collections.ConfigDict):
                    raise ConfigError(f"config key {prefix + k!r} must be a section (a JSON object), got "
                                      f"{cfg[k]!r}")
                fill(cfg[k], v, prefix + k + ".")

    from .default import get_default_config
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"the config is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"the config JSON must be an object of sections, got {type(raw).__name__}")
    config = to_cd(raw)
    fill(config, get_default_config())
    return _lock(config)


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Return a fresh, locked ConfigDict: a named config, a ``.py`` file with ``get_config()``, or a ``.json`` file."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"a config name or path is required; named configs: {', '.join(CONFIG_NAMES)}")
    if name_or_path in CONFIG_NAMES:
        module = importlib.import_module(f"{__name__}.{name_or_path}")
        return _lock(module.get_config())
    looks_like_path = os.sep in name_or_path or name_or_path.endswith((".py", ".json"))
    if os.path.isfile(name_or_path):
        if name_or_path.endswith(".json"):
            try:
                with open(name_or_path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read config file {name_or_path!r}: {e}") from None
            try:
                return config_from_json(text)
            except ConfigError as e:
                raise ConfigError(f"config file {name_or_path!r}: {e}") from None
        spec = importlib.util.spec_from_file_location("_sde_diffusion_user_config", name_or_path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"config file {name_or_path!r} is neither a .py file with get_config() nor a .json file")
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ConfigError(f"config file {name_or_path!r} has a syntax error at line {e.lineno}: {e.msg}") from None
        except Exception as e:   # noqa: BLE001 — whatever the user's file raises, report it in one line
            raise ConfigError(f"config file {name_or_path!r} raised {type(e).__name__} while loading: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {name_or_path!r} defines no get_config()")
        try:
            config = module.get_config()
        except Exception as e:   # noqa: BLE001
            raise ConfigError(f"get_config() in {name_or_path!r} raised {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(config, ml_collections.ConfigDict):
            raise ConfigError(f"get_config() in {name_or_path!r} returned {type(config).__name__}, not a ConfigDict")
        return _lock(config)
    if looks_like_path:
        raise ConfigError(f"config file {name_or_path!r} does not exist")
    close = difflib.get_close_matches(name_or_path, CONFIG_NAMES, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config {name_or_path!r}: not a named config nor a file.{hint} "
                      f"Named configs: {', '.join(CONFIG_NAMES)}")


# ------------------------------------------------------------------------------------------------- overrides
def _all_keys(config, prefix="") -> List[str]:
    keys = []
    for k, v in config.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _unknown_key_error(config, key: str) -> ConfigError:
    keys = _all_keys(config)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:   # try on the last component, e.g. "batchsize" -> training.batch_size
        last = key.split(".")[-1]
        close = [k for k in keys if k.split(".")[-1] in difflib.get_close_matches(
            last, [k.split(".")[-1] for k in keys], n=3, cutoff=0.6)][:3]
    hint = f" Closest valid keys: {', '.join(close)}." if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint}")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type_name(v) -> str:
    return type(v).__name__


def parse_override(current, text: str, key: str = "?"):
    """Convert the string ``text`` to the type of the current value ``current`` (or raise ConfigError)."""
    if isinstance(text, str):
        raw = text.strip()
    else:   # already a Python value (apply_overrides with a mapping)
        raw = text
        if isinstance(current, bool) and isinstance(raw, bool) or current is None:
            return raw
        if isinstance(current, float) and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if type(current) is type(raw) or (isinstance(current, (tuple, list)) and isinstance(raw, (tuple, list))):
            return type(current)(raw) if isinstance(current, (tuple, list)) else raw
        raise ConfigError(f"config key {key!r} expects {_type_name(current)}, got {raw!r} ({_type_name(raw)})")

    def fail(expected):
        return ConfigError(f"config key {key!r} expects {expected} (current value {current!r}), got {raw!r}")

    if isinstance(current, bool):
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise fail("a bool (true/false)")
    if isinstance(current, int):
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                f = float(raw)
            except ValueError:
                raise fail("an int") from None
            if f.is_integer():
                return int(f)
            raise fail("an int") from None
    if isinstance(current, float):
        try:
            return float(raw.replace("_", ""))
        except ValueError:
            raise fail("a float") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw) if raw else ()
        except (ValueError, SyntaxError):
            value = tuple(p.strip() for p in raw.strip("()[]").split(",") if p.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        proto = current[0] if len(current) else None
        if proto is not None:
            value = [parse_override(proto, repr(v) if not isinstance(v, str) else v, f"{key}[{i}]")
                     for i, v in enumerate(value)]
        return type(current)(value)
    if current is None:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    raise fail(_type_name(current))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Union[Iterable[str], Mapping[str, object]]) -> ml_collections.ConfigDict:
    """Apply ``"a.b=v"`` strings (or a ``{"a.b": v}`` mapping) in place; returns ``config``.

    Unknown keys raise ConfigError naming the closest valid keys; values are parsed to the current value's type
    (bool: true/false/1/0; int; float; str; tuples as ``(1,2)`` or ``1,2``) and a value of the wrong type raises.
    """
    items = overrides.items() if isinstance(overrides, Mapping) else []
    if not isinstance(overrides, Mapping):
        parsed = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            parsed.append((k.strip(), v))
        items = parsed
    for key, value in items:
        key = key[len("config."):] if key.startswith("config.") else key
        parts = key.split(".")
        node = config
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise _unknown_key_error(config, key)
            node = node[part]
        leaf = parts[-1]
        if leaf not in node and ".".join(parts[:-1]) in OPEN_SECTIONS:
            # a free-form section (sampler options): a new key takes the value as a Python literal
            with config.unlocked():
                node[leaf] = parse_override(None, value, key)
            continue
        if leaf not in node:
            raise _unknown_key_error(config, key)
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys, e.g. "
                              f"{key}.{next(iter(current.keys()), '...')}")
        new = parse_override(current, value, key)
        with config.unlocked():
            try:
                setattr(node, leaf, new)
            except TypeError as e:
                raise ConfigError(f"config key {key!r}: {e}") from None
    return config


def validate(config, mode: str = "train") -> None:
    """Check the values ``mode`` uses (see ``configs.validation``); raises ``ConfigError`` naming key and range."""
    from .validation import validate as _validate
    _validate(config, mode)


# ------------------------------------------------------------------------------------------------- SDE
def build_sde(config):
    """The forward SDE of a config: ``config.training.sde`` (vp | subvp | ve | ou | brownian | linear | cosine | edm)
    with its parameters from ``config.model`` (``beta_min``, ``beta_max``, ``num_scales``; ``sigma_min``,
    ``sigma_max``; edm: ``sigma_max``)."""
    from ..sdes import get_sde
    name = config.training.sde.lower()
    m = config.model
    if name in ("vp", "vpsde", "subvp", "subvpsde"):
        return get_sde(name, beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
    if name in ("ve", "vesde"):
        return get_sde(name, sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)
    if name == "edm":      # EDM's path x0 + t eps on [0, sigma_max] (sde_diffusion.interpolants)
        return get_sde(name, sigma_max=m.sigma_max, N=m.num_scales)
    kwargs = dict(m.get("sde_kwargs", {}) or {})
    return get_sde(name, N=m.num_scales, **kwargs)
