"""Score networks: a registry by name, and the helpers that turn (network, SDE) into a score function.

* ``register_network(name)`` — class decorator; the class is built as ``cls(config)``.
* ``get_network(config)`` — builds ``config.model.name`` (``mlp``, ``unet``) and records the output
  parameterisation on the module (``model.parameterization``).
* ``get_score_fn(sde, model, train=False, y=None)`` — ``score_fn(x, t)`` for ``solvers.sample``.

Every network has ``forward(x, t, y=None)``: ``x: (B, *D)``, ``t: (B,)`` continuous time in [0, T], ``y`` optional
int64 labels (B,) when ``model.num_classes > 0`` (index ``num_classes`` is the null label; ``y=None`` means null).
"""
from __future__ import annotations

from typing import Dict, Type

from torch import nn

_NETWORKS: Dict[str, Type[nn.Module]] = {}


def register_network(name: str):
    """Class decorator: make a network buildable by ``get_network(config)`` with ``config.model.name = name``."""
    def deco(cls):
        if name in _NETWORKS:
            raise ValueError(f"a network named {name!r} is already registered")
        _NETWORKS[name] = cls
        cls.network_name = name
        return cls
    return deco


def available_networks():
    return sorted(_NETWORKS)


def get_network(config) -> nn.Module:
    """Build the network named by ``config.model.name`` (float32, on the CPU)."""
    name = config.model.name
    if name not in _NETWORKS:
        raise ValueError(f"unknown network {name!r}; available: {', '.join(available_networks())}")
    model = _NETWORKS[name](config)
    model.parameterization = check_parameterization(config.model.parameterization)
    model.num_classes = int(config.model.num_classes)
    return model


from . import layers, mlp, unet  # noqa: E402,F401  (registers the networks)
from .utils import (PARAMETERIZATIONS, check_parameterization, count_parameters, get_noise_fn,  # noqa: E402
                    get_score_fn)

__all__ = ["register_network", "get_network", "available_networks", "get_score_fn", "get_noise_fn",
           "count_parameters", "PARAMETERIZATIONS", "check_parameterization"]
