"""Time-dependent classifiers p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021; Song et al. 2021, App. I).

A classifier sees data perturbed by the same SDE as the score model: x_t = a(t) x0 + sigma(t) z with t ~ U(eps, T), and
is trained by cross-entropy on the clean label.  Its gradient grad_x log p(y | x_t, t) is what
``guidance.classifier_score`` adds to the score.

* ``ToyClassifier``: an MLP for vectors (B, D), e.g. 2-D mixtures.
* ``ConvClassifier``: a small conv net for images (B, C, H, W), e.g. 28x28 digits.
Both embed t with ``TimeEmbedding`` (sinusoidal features of t/T, then an MLP) and take the input scaled by
c_in(t) = 1 / sqrt(a(t)^2 data_std^2 + sigma(t)^2), so x_t reaches the network with unit scale on VP and VE alike;
``classifier_logits`` applies that scaling and is the one way the loss, the accuracy and ``log_p_y_fn`` call a model.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sdes import SDE, expand_as_batch

Tensor = torch.Tensor

__all__ = ["TimeEmbedding", "ToyClassifier", "ConvClassifier", "get_classifier", "classifier_logits",
           "classifier_loss", "log_p_y_fn", "classifier_accuracy", "train_classifier", "perturb"]


class TimeEmbedding(nn.Module):
    """t (B,) -> (B, dim): sinusoidal features of ``scale * t / T`` at geometric frequencies, then a 2-layer MLP."""

    def __init__(self, dim: int, T: float = 1.0, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 2, got {dim}")
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.scale = float(scale) / float(T)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        arg = self.scale * t.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1))


class ToyClassifier(nn.Module):
    """MLP classifier for x: (B, D): input and time embedding concatenated, ``depth`` SiLU layers of ``hidden``."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                 T: float = 1.0, data_std: float = 1.0):
        super().__init__()
        self.num_classes, self.data_std = int(num_classes), float(data_std)
        self.embed = TimeEmbedding(emb_dim, T=T)
        layers: List[nn.Module] = []
        width = dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.reshape(x.shape[0], -1), self.embed(t).to(x.dtype)], dim=1)
        return self.head(self.body(h))


class _TimeConvBlock(nn.Module):
    """conv3x3 -> GroupNorm -> + per-channel time bias -> SiLU, twice, with a 1x1 skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(min(groups, c_out), c_out)
        self.time = nn.Linear(emb_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)) + self.time(emb)[:, :, None, None])
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class ConvClassifier(nn.Module):
    """Small time-conditioned conv net for images (B, C, H, W): one block per entry of ``channels``, 2x average
    pooling between blocks, global mean pooling, linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128),
                 emb_dim: int = 128, groups: int = 8, T: float = 1.0, data_std: float = 0.5):
        super().__init__()
        self.num_classes, self.data_std = int(num_classes), float(data_std)
        self.embed = TimeEmbedding(emb_dim, T=T)
        self.emb_act = nn.SiLU()
        self.blocks = nn.ModuleList()
        c = in_channels
        for ch in channels:
            self.blocks.append(_TimeConvBlock(c, ch, emb_dim, groups))
            c = ch
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.emb_act(self.embed(t).to(x.dtype))
        h = x
        for i, block in enumerate(self.blocks):
            if i > 0 and min(h.shape[-2:]) >= 2:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
        return self.head(h.mean(dim=(-2, -1)))


_CLASSIFIERS = {"toy_mlp": ToyClassifier, "conv": ConvClassifier}


def get_classifier(name: str, **kwargs) -> nn.Module:
    """Build a classifier by name: ``toy_mlp`` (``ToyClassifier``) or ``conv`` (``ConvClassifier``)."""
    if name not in _CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; available: {', '.join(sorted(_CLASSIFIERS))}")
    return _CLASSIFIERS[name](**kwargs)


# ---------------------------------------------------------------------- perturbation, logits, loss
def perturb(sde: SDE, x0: Tensor, t: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """x_t = a(t) x0 + sigma(t) z, z ~ N(0, I): a draw from the SDE's transition p_{0t}(x_t | x0); t: (B,)."""
    mean, std = sde.marginal(x0, t)
    z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return mean + expand_as_batch(std, x0) * z


def classifier_logits(model: nn.Module, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """Logits (B, K) of p(y | x_t, t): the model applied to c_in(t) x_t with c_in = 1/sqrt(a^2 data_std^2 + sigma^2)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    a, s = sde.marginal_coeffs(t)
    ds = float(getattr(model, "data_std", 1.0))
    c_in = torch.rsqrt(a ** 2 * ds ** 2 + s ** 2)
    return model(x * expand_as_batch(c_in, x), t)


def _sample_times(sde: SDE, n: int, eps: float, generator, dtype, device) -> Tensor:
    return eps + (sde.T - eps) * torch.rand(n, generator=generator, dtype=dtype, device=device)


def classifier_loss(model: nn.Module, sde: SDE, x0: Tensor, y: Tensor, generator: Optional[torch.Generator] = None,
                    eps: Optional[float] = None) -> Tensor:
    """Cross-entropy of the clean labels y (B,) on x_t = a x0 + sigma z, t ~ U(eps, T); a scalar."""
    eps = sde.default_eps if eps is None else float(eps)
    t = _sample_times(sde, x0.shape[0], eps, generator, x0.dtype, x0.device)
    xt = perturb(sde, x0, t, generator)
    return F.cross_entropy(classifier_logits(model, sde, xt, t), y)


def log_p_y_fn(model: nn.Module, sde: SDE) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``(x, t, y) -> (B,)`` log p(y | x_t, t) under the classifier: the argument ``guidance.classifier_score`` takes.
    Use ``model.eval()`` first if the model has train-time behaviour."""
    def fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        logp = F.log_softmax(classifier_logits(model, sde, x, t), dim=1)
        return logp.gather(1, y.long().reshape(-1, 1).to(logp.device))[:, 0]
    return fn


@torch.no_grad()
def classifier_accuracy(model: nn.Module, sde: SDE, x0: Tensor, y: Tensor, t: float,
                        generator: Optional[torch.Generator] = None, batch_size: int = 4096) -> float:
    """Fraction of labels y predicted (argmax) from x_t = a(t) x0 + sigma(t) z at the fixed time t."""
    correct = 0
    for i in range(0, x0.shape[0], batch_size):
        xb, yb = x0[i:i + batch_size], y[i:i + batch_size]
        tb = torch.full((xb.shape[0],), float(t), dtype=xb.dtype, device=xb.device)
        pred = classifier_logits(model, sde, perturb(sde, xb, tb, generator), tb).argmax(1)
        correct += int((pred == yb.to(pred.device)).sum())
    return correct / x0.shape[0]


# ---------------------------------------------------------------------- training
def _batches(data, batch_size: int, generator: Optional[torch.Generator]) -> Iterable[Tuple[Tensor, Tensor]]:
    """Endless (x, y) minibatches: from a pair of tensors (sampled with replacement) or by re-iterating an iterable."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        while True:
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
            yield x[idx], y[idx]
    else:
        while True:                                     # re-iterate (a DataLoader reshuffles each epoch)
            empty = True
            for batch in data:
                empty = False
                yield batch[0], batch[1]
            if empty:
                raise ValueError("the classifier's training data yielded no batches")


def train_classifier(model: nn.Module, sde: SDE, data: Union[Tuple[Tensor, Tensor], Iterable], num_steps: int,
                     batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0, eps: Optional[float] = None,
                     generator: Optional[torch.Generator] = None, device=None, grad_clip: Optional[float] = 1.0,
                     log_every: int = 0, callback: Optional[Callable[[Dict], None]] = None) -> Dict[str, List[float]]:
    """Train ``model`` in place by the noisy cross-entropy ``classifier_loss`` with Adam(W).

    Args:
        data: ``(x, y)`` tensors (minibatches drawn with replacement from ``generator``) or an iterable of ``(x, y)``
            batches (a DataLoader; cycled).  Labels are class indices.
        num_steps: optimiser steps.  eps: smallest training time (default ``sde.default_eps``).
        log_every: every so many steps, ``callback({"step", "loss"})`` is called (if given) and the loss recorded.
    Returns: ``{"step": [...], "loss": [...]}``, the running mean loss at each logged step.
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    device = device if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    history: Dict[str, List[float]] = {"step": [], "loss": []}
    running, count = 0.0, 0
    batches = _batches(data, batch_size, generator)
    for step in range(1, int(num_steps) + 1):
        x0, y = next(batches)
        x0 = x0.to(device=device, dtype=dtype)
        y = y.to(device=device, dtype=torch.long)
        gen = generator if generator is not None and generator.device == x0.device else None
        loss = classifier_loss(model, sde, x0, y, generator=gen, eps=eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        running += float(loss.detach())
        count += 1
        if log_every and step % int(log_every) == 0 or step == int(num_steps):
            history["step"].append(step)
            history["loss"].append(running / count)
            if callback is not None:
                callback({"step": step, "loss": running / count})
            running, count = 0.0, 0
    opt.zero_grad(set_to_none=True)
    model.eval()
    return history
