"""Score networks: a registry by name, and the helpers that turn (network, SDE) into a score function.

* ``register_network(name)`` — class decorator; the class is built as ``cls(config)``.
* ``get_network(config)`` — builds ``config.model.name`` (``mlp``, ``unet``) and records the output
  parameterisation on the module (``model.parameterization``).
* ``get_score_fn(sde, model, train=False, y=None)`` — ``score_fn(x, t)`` for ``solvers.sample``.

Every network has ``forward(x, t, y=None)``: ``x: (B, *D)``, ``t: (B,)`` continuous time in [0, T], ``y`` optional
int64 labels (B,) when ``model.num_classes > 0`` (index ``num_classes`` is the null label; ``y=None`` means null).
"""
from __future__ import annotations

from torch import nn

from ..registry import Registry

_NETWORKS = Registry("network", attr="network_name")
register_network = _NETWORKS.register    # class decorator: ``get_network(config)`` builds it for model.name = name
available_networks = _NETWORKS.names


def get_network(config) -> nn.Module:
    """Build the network named by ``config.model.name`` (float32, on the CPU)."""
    name = config.model.name
    model = _NETWORKS.get(name)(config)
    model.parameterization = check_parameterization(config.model.parameterization)
    model.num_classes = int(config.model.num_classes)
    return model


from . import layers, mlp, unet  # noqa: E402,F401  (registers the networks)
from .utils import (PARAMETERIZATIONS, check_parameterization, count_parameters, get_noise_fn,  # noqa: E402
                    get_score_fn)

__all__ = ["register_network", "get_network", "available_networks", "get_score_fn", "get_noise_fn",
           "count_parameters", "PARAMETERIZATIONS", "check_parameterization"]
