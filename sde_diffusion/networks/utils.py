"""From a network's raw output to the noise prediction and the score.

Output parameterisations (``model.parameterization``), for x_t = a(t) x0 + sigma(t) z:

* ``noise``  — the network predicts z (epsilon-prediction, DDPM):  eps_hat = out,   score = -out / sigma(t).
* ``score``  — the network predicts sigma(t) * score (NCSN++'s ``scale_by_sigma``):  score = out / sigma(t),
               eps_hat = -out.
* ``direct`` — the network output is the score itself (NCSN without scaling):  score = out,
               eps_hat = -sigma(t) out.

The first two differ only by a sign and by nothing a loss can see; they are kept apart because checkpoints from the
two conventions are not interchangeable.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..sdes import expand_as_batch

Tensor = torch.Tensor

PARAMETERIZATIONS = ("noise", "score", "direct")


def check_parameterization(name: str) -> str:
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown model.parameterization {name!r}; available: {', '.join(PARAMETERIZATIONS)}")
    return name


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _labels(y, x: Tensor) -> Optional[Tensor]:
    if y is None:
        return None
    y = torch.as_tensor(y, device=x.device).long()
    if y.dim() == 0:
        return y.expand(x.shape[0])
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{y.shape[0]} labels for a batch of {x.shape[0]}")
    return y


def get_noise_fn(model: nn.Module, train: bool = False, y=None,
                 parameterization: Optional[str] = None) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``noise_fn(x, t, std) -> eps_hat``: the network's prediction of the unit noise z in x = a x0 + std z.

    ``std`` (shape () or (B,)) is needed only by the ``direct`` parameterisation.  ``train`` sets the module's mode
    (dropout); gradients are not switched off here — wrap calls in ``torch.no_grad()`` when you need none.
    """
    param = check_parameterization(parameterization or getattr(model, "parameterization", "noise"))

    def noise_fn(x, t, std):
        model.train(train)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out = model(x, t, _labels(y, x))
        if param == "noise":
            return out
        if param == "score":
            return -out
        return -expand_as_batch(torch.as_tensor(std, dtype=x.dtype, device=x.device), x) * out
    return noise_fn


def get_score_fn(sde, model: nn.Module, train: bool = False, y=None,
                 parameterization: Optional[str] = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``score_fn(x: (B, *D), t: (B,)) -> (B, *D)``, the network's estimate of grad_x log p_t(x) under ``sde``.

    Args:
        sde: the forward SDE the network was trained for (its marginal std sigma(t) scales the output).
        model: a network ``model(x, t, y)``; its ``parameterization`` attribute (set by ``get_network``) says how to
            read the output unless ``parameterization`` is given.
        train: run the network in training mode (dropout on).
        y: labels for a class-conditional network: an int (all samples), an int64 tensor (B,) matching the batch, or
            None (the null label: the unconditional score).
    """
    param = check_parameterization(parameterization or getattr(model, "parameterization", "noise"))
    noise_fn = get_noise_fn(model, train=train, y=y, parameterization=param)

    def score_fn(x, t):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if param == "direct":
            model.train(train)
            return model(x, t, _labels(y, x))
        _, std = sde.marginal_coeffs(t)
        std = expand_as_batch(torch.as_tensor(std, dtype=x.dtype, device=x.device), x)
        return -noise_fn(x, t, std) / std
    return score_fn
