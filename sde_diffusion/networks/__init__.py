"""Score networks: a registry by name, and the helpers that turn (network, SDE) into a score function.

* ``register_network(name)`` — class decorator; the class is built as ``cls(config)``.
* ``get_network(config)`` — builds ``config.model.name`` (``mlp``, ``unet``), wraps it in EDM's preconditioning when
  ``model.precond = edm`` (``precond.EDMPrecond``, sigma_data = ``model.sigma_data``) and records the output
  parameterisation on the module (``model.parameterization``: noise, score, direct, x0, v, velocity).  With
  ``model.learned_variance`` the network has twice the output channels (dim 1): the prediction, then Improved DDPM's
  variance interpolation v (Nichol & Dhariwal 2021, eq. 15); it needs ``training.loss = ddpm`` (the hybrid loss).
* ``get_model(sde, model, train=False, y=None)`` — the ``prediction.Model`` every sampler takes (declared output and
  time convention: a network trained with a discrete loss is evaluated at its own noise levels).
* ``get_score_fn(sde, model, train=False, y=None)`` — the plain ``score_fn(x, t)`` of the same model.

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
    learned = bool(config.model.get("learned_variance", False))
    if learned and str(config.training.loss) != "ddpm":
        raise ValueError(f"model.learned_variance needs the discrete eps-loss with its variational term "
                         f"(training.loss = ddpm, the hybrid loss of Improved DDPM), got {config.training.loss!r}")
    model = _NETWORKS.get(name)(config)
    parameterization = check_parameterization(config.model.parameterization)
    precond = str(config.model.get("precond", "none"))
    if precond not in PRECONDITIONINGS:
        raise ValueError(f"unknown model.precond {precond!r}; available: {', '.join(PRECONDITIONINGS)}")
    if precond == "edm":
        # EDM's c_skip / c_out / c_in / c_noise around the network: the wrapper outputs the denoiser D (x0)
        if parameterization != "x0":
            raise ValueError(f"model.precond = edm makes the network a denoiser: model.parameterization must be x0, "
                             f"got {parameterization!r}")
        from ..configs import build_sde
        model = EDMPrecond(model, build_sde(config), sigma_data=float(config.model.sigma_data))
    model.parameterization = parameterization
    model.learned_variance = learned
    model.num_classes = int(config.model.num_classes)
    # DDPM's and SMLD's discrete losses train at the chain's N levels: the model is then sampled at those levels
    model.time_convention = "discrete" if str(config.training.loss) in ("ddpm", "smld") else "continuous"
    return model


from . import layers, mlp, unet  # noqa: E402,F401  (registers the networks)
from .precond import EDMPrecond, edm_coefficients  # noqa: E402

#: ``model.precond``: none, or EDM's preconditioning (Karras et al. 2022, eq. 7) around the network
PRECONDITIONINGS = ("none", "edm")
from .utils import (PARAMETERIZATIONS, check_parameterization, count_parameters, get_model,  # noqa: E402
                    get_noise_fn, get_score_fn)

__all__ = ["register_network", "get_network", "available_networks", "get_model", "get_score_fn", "get_noise_fn",
           "count_parameters", "PARAMETERIZATIONS", "check_parameterization", "EDMPrecond", "edm_coefficients",
           "PRECONDITIONINGS"]
