"""From a network's raw output to the noise prediction and the score.

Output parameterisations (``model.parameterization``), for x_t = a(t) x0 + sigma(t) z:

* ``noise``  — the network predicts z (epsilon-prediction, DDPM):  eps_hat = out,   score = -out / sigma(t).
* ``score``  — the network predicts sigma(t) * score (NCSN++'s ``scale_by_sigma``):  score = out / sigma(t),
               eps_hat = -out.
* ``direct`` — the network output is the score itself (NCSN without scaling):  score = out,
               eps_hat = -sigma(t) out.
* ``x0``     — the clean data (EDM's denoiser D; ``networks.precond.EDMPrecond`` makes any network one).
* ``v``      — Salimans & Ho's v = a~ eps - sigma~ x0 (``prediction`` generalises it to any path).
* ``velocity`` — the flow-matching velocity a' x0 + sigma' eps (= eps - x0 on the linear interpolant).

The first two differ only by a sign and by nothing a loss can see; they are kept apart because checkpoints from the
two conventions are not interchangeable.  Every parameterisation maps to one declared output of ``prediction.Model``
(``OUTPUT_OF``), which converts it into whatever a sampler or a loss asks for.
"""
from __future__ import annotations

import contextlib

from typing import Callable, Optional

import torch
from torch import nn

from ..prediction import Model
from ..sdes import expand_as_batch

Tensor = torch.Tensor

PARAMETERIZATIONS = ("noise", "score", "direct", "x0", "v", "velocity")
#: the ``prediction.Model`` output each parameterisation declares (``score`` is declared as eps = -out)
OUTPUT_OF = {"noise": "eps", "score": "eps", "direct": "score", "x0": "x0", "v": "v", "velocity": "velocity"}
#: the parameterisations whose output converts to the noise without the path's (a, sigma): DDPM's / SMLD's losses
NOISE_PARAMETERIZATIONS = ("noise", "score", "direct")


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


def split_variance_output(model: nn.Module, out: Tensor, x: Tensor):
    """(prediction, v) of a network's raw output: a ``model.learned_variance`` network stacks Improved DDPM's
    variance interpolation v after the prediction along dim 1 (2 C channels); other networks give (out, None)."""
    if not getattr(model, "learned_variance", False):
        return out, None
    if out.dim() < 2 or out.shape[1] != 2 * x.shape[1]:
        raise ValueError(f"a learned-variance network must return 2 x {x.shape[1]} entries along dim 1 for x of "
                         f"shape {tuple(x.shape)}, got {tuple(out.shape)}")
    pred, v = out.chunk(2, dim=1)
    return pred, v


def get_noise_fn(model: nn.Module, train: bool = False, y=None,
                 parameterization: Optional[str] = None, with_variance: bool = False):
    """``noise_fn(x, t, std) -> eps_hat``: the network's prediction of the unit noise z in x = a x0 + std z.

    ``std`` (shape () or (B,)) is needed only by the ``direct`` parameterisation.  ``train`` sets the module's mode
    (dropout); gradients are not switched off here — wrap calls in ``torch.no_grad()`` when you need none.
    ``with_variance``: return ``(eps_hat, v)`` with v the learned variance interpolation (None for a network without
    ``model.learned_variance``).
    """
    param = check_parameterization(parameterization or getattr(model, "parameterization", "noise"))
    if param not in NOISE_PARAMETERIZATIONS:
        raise ValueError(f"model.parameterization {param!r} needs the path to give the noise (the ddpm / smld losses "
                         f"train {', '.join(NOISE_PARAMETERIZATIONS)}): use training.loss = dsm, fm or edm")

    def noise_fn(x, t, std):
        model.train(train)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        out, v = split_variance_output(model, model(x, t, _labels(y, x)), x)
        if param == "noise":
            eps = out
        elif param == "score":
            eps = -out
        else:
            eps = -expand_as_batch(torch.as_tensor(std, dtype=x.dtype, device=x.device), x) * out
        return (eps, v) if with_variance else eps
    return noise_fn


def discrete_levels(sde):
    """(a_table, sigma_table) of the N levels a discrete loss trains at: DDPM's (sqrt(abar_i), sqrt(1 - abar_i)) on
    VP, SMLD's (1, sigma_i) on VE (``losses.ddpm_loss`` / ``losses.smld_loss``)."""
    if hasattr(sde, "alphas_cumprod"):
        abar = sde.alphas_cumprod.to(torch.float64)
        return abar.sqrt(), (1.0 - abar).sqrt()
    if hasattr(sde, "discrete_sigmas"):
        sig = sde.discrete_sigmas.to(torch.float64)
        return torch.ones_like(sig), sig
    raise ValueError(f"a discrete-time model needs a VP or VE SDE with a discrete chain, got {type(sde).__name__}")


def get_model(sde, model: nn.Module, train: bool = False, y=None, parameterization: Optional[str] = None,
              time_convention: Optional[str] = None) -> Model:
    """The ``prediction.Model`` of a network under ``sde``: what ``solvers.sample`` takes.

    The output is declared from ``model.parameterization`` (``noise`` -> eps, ``score`` -> eps = -out, ``direct`` ->
    score, ``x0``, ``v``, ``velocity`` as themselves; ``OUTPUT_OF``); the time convention from
    ``model.time_convention`` (set by ``get_network``: ``discrete`` for networks trained with DDPM's or SMLD's loss,
    which see t_i = i T / (N - 1) at level i; those must predict the noise).  ``train``: dropout on; ``y``:
    labels of a class-conditional network (an int, an int64 tensor (B,), or None for the null label)."""
    param = check_parameterization(parameterization or getattr(model, "parameterization", "noise"))
    convention = time_convention or getattr(model, "time_convention", "continuous")
    if convention not in ("continuous", "discrete"):
        raise ValueError(f"unknown time convention {convention!r}; available: continuous, discrete")

    learned = bool(getattr(model, "learned_variance", False))

    def fn(x, t):
        model.train(train)
        out, v = split_variance_output(model, model(x, t, _labels(y, x)), x)
        out = -out if param == "score" else out
        return (out, v) if learned else out

    output = OUTPUT_OF[param]
    if convention == "discrete" and param not in NOISE_PARAMETERIZATIONS:
        raise ValueError(f"a discrete-time model (trained with DDPM's or SMLD's loss) must predict the noise, got "
                         f"model.parameterization {param!r}")
    if convention == "continuous":
        return Model(fn, output, learned_variance=learned)
    scale = sde.T / max(sde.N - 1, 1)
    return Model(fn, output, discrete=discrete_levels(sde), model_time=lambda idx: idx * scale,
                 learned_variance=learned)


def get_score_fn(sde, model: nn.Module, train: bool = False, y=None,
                 parameterization: Optional[str] = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``score_fn(x: (B, *D), t: (B,)) -> (B, *D)``, the network's estimate of grad_x log p_t(x) under ``sde``
    (``get_model(...)``'s score: eps-type outputs are divided by the noise level the network was trained at)."""
    return get_model(sde, model, train=train, y=y, parameterization=parameterization).score_fn(sde)


@contextlib.contextmanager
def autocast_network(model: nn.Module, device_type: str, dtype: Optional[torch.dtype]):
    """Within the block every call of ``model`` runs under ``torch.autocast(device_type, dtype)`` and returns float32
    (``dtype=None``: unchanged).  Only the network's own ops are cast (its convolutions and GEMMs in ``dtype``); what
    the caller does with the output — a solver's arithmetic, a guidance term — stays in float32."""
    if dtype is None:
        yield model
        return
    original = model.forward

    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            out = original(*args, **kwargs)
        return out.float() if torch.is_tensor(out) and out.is_floating_point() else out
    model.forward = forward             # the instance attribute shadows the class's forward for __call__
    try:
        yield model
    finally:
        del model.forward
