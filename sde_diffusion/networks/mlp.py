"""A residual MLP score network for low-dimensional (1-D / 2-D toy) data.

No normalisation layers on purpose: with LayerNorm the output saturates in |x|, so in the prior's tails (rarely seen
in training) the score stops growing like -x and the reverse ODE pushes those samples out exponentially.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import register_network
from .layers import TimeEmbedding, dense, get_act

Tensor = torch.Tensor


class _ResidualLayer(nn.Module):
    def __init__(self, width: int, act: str, dropout: float):
        super().__init__()
        self.act = get_act(act)
        self.fc0 = dense(width, width)
        self.temb = dense(width, width)
        self.drop = nn.Dropout(dropout)
        self.fc1 = dense(width, width, init_scale=0.0)

    def forward(self, h, temb):
        r = self.fc0(self.act(h)) + self.temb(temb)
        return h + self.fc1(self.drop(self.act(r)))


@register_network("mlp")
class MLPScoreNet(nn.Module):
    """x (B, *D) with prod(D) = ``model.data_dim`` (inferred from ``data.dim`` when absent) -> (B, *D).

    Config: ``model.nf`` (width), ``model.num_layers`` (residual layers), ``model.embedding_type``,
    ``model.time_scale``, ``model.fourier_scale``, ``model.nonlinearity``, ``model.dropout``, ``model.num_classes``,
    ``model.learned_variance`` (output (B, 2 D_1, D_2, ...): the prediction, then the variance interpolation v).
    """

    def __init__(self, config):
        super().__init__()
        m = config.model
        self.dim = int(config.data.dim)
        width = int(m.nf)
        self.time_embed = TimeEmbedding(width, width, m.embedding_type, m.time_scale, m.fourier_scale,
                                        m.num_classes, m.nonlinearity)
        self.inp = dense(self.dim, width)
        self.layers = nn.ModuleList(_ResidualLayer(width, m.nonlinearity, m.dropout) for _ in range(m.num_layers))
        self.act = get_act(m.nonlinearity)
        # model.learned_variance: a second block of outputs, Improved DDPM's v, stacked along dim 1
        self.num_outputs = 2 if bool(m.get("learned_variance", False)) else 1
        self.out = dense(width, self.dim * self.num_outputs, init_scale=0.0)

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        shape = x.shape
        h = self.inp(x.reshape(shape[0], -1))
        temb = self.time_embed(t, y)
        for layer in self.layers:
            h = layer(h, temb)
        out = self.out(self.act(h))
        if self.num_outputs == 1:
            return out.reshape(shape)
        return out.reshape(shape[0], self.num_outputs * shape[1], *shape[2:])   # (B, 2 D_1, D_2, ...)
