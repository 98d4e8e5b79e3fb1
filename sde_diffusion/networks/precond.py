"""EDM's preconditioning (Karras et al. 2022, sec. 5, eq. 7 and Table 1) as a wrapper: raw network F -> denoiser D.

For the VE-type path x = x0 + sigma eps the denoiser is

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))          (eq. 7)
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),   c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in = 1 / sqrt(sigma^2 + sigma_data^2),            c_noise = ln(sigma) / 4                 (Table 1, "Ours")

so that the network's input and its training target (x0 - c_skip x) / c_out have unit variance for data of std
sigma_data.  On any other Gaussian path x = a x0 + sigma eps the same D applies to y = x / a, a VE path with noise
level sigma~ = sigma / a (EDM sec. 4 / Table 1: x = s(t) (x0 + sigma(t) eps)), so D(x; t) = D(x / a; sigma / a) is the
path's data estimate, declared as output ``x0``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..sdes import expand_as_batch

Tensor = torch.Tensor

__all__ = ["EDMPrecond", "edm_coefficients"]


def edm_coefficients(sigma: Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) at noise level(s) sigma (Karras et al. 2022, Table 1, "Ours")."""
    sd2 = sigma_data ** 2
    root = torch.sqrt(sigma ** 2 + sd2)
    return sd2 / (sigma ** 2 + sd2), sigma * sigma_data / root, 1.0 / root, 0.25 * torch.log(sigma)


class EDMPrecond(nn.Module):
    """``D(x, t, y) = c_skip y + c_out F(c_in y, c_noise, labels)`` with y = x / a(t), sigma~ = sigma(t) / a(t) of the
    path ``sde``; ``parameterization = "x0"``.  ``net``: any network ``F(x, t_in, y)``; it receives c_noise as its time
    input."""

    def __init__(self, net: nn.Module, sde, sigma_data: float = 0.5):
        super().__init__()
        sigma_data = float(sigma_data)
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"EDM preconditioning needs sigma_data > 0, got {sigma_data}")
        self.net, self.sde, self.sigma_data = net, sde, sigma_data
        self.parameterization = "x0"

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        a, s = self.sde.marginal_coeffs(t.to(torch.float64))
        r = (s / a).to(x.dtype)                                           # sigma~ = sigma / a (EDM sec. 4)
        c_skip, c_out, c_in, c_noise = edm_coefficients(r, self.sigma_data)
        xs = x / expand_as_batch(a.to(x.dtype), x)                        # y = x / s(t) = x0 + sigma~ eps
        F = self.net(expand_as_batch(c_in, x) * xs, c_noise, y)
        return expand_as_batch(c_skip, x) * xs + expand_as_batch(c_out, x) * F       # eq. 7
