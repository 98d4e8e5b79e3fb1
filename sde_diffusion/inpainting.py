"""Inpainting and colourisation: sampling x(0) given some linear coordinates of it (Song et al. 2021, App. I).

Both problems observe coordinates of the data in an orthogonal basis z = Q x:
  * inpainting: Q = I, the observed coordinates are the known pixels;
  * colourisation: Q mixes the channels of each pixel with the orthogonal matrix whose first row is (1, 1, 1)/sqrt(3);
    the first coordinate z_grey = sqrt(3) * mean(channels) is the grey-scale image (observed), the two others carry the
    colour (free).
Because Q is orthogonal and the forward noise isotropic, z(t) = a(t) z(0) + sigma(t) Q z with Q z ~ N(0, I): each
coordinate of z diffuses exactly like a pixel.

Two tools, usable together with every fixed-step sampler (``solvers.sample(..., constraint=c)`` and any score_fn):

1. ``c(x, t, generator)`` - the *replacement* constraint.  It overwrites the observed coordinates of the state by the
   forward-noised data z_obs(t) = a(t) z_obs(0) + sigma(t) n, with fresh noise n at every call (Song et al.'s
   inpainting / colourisation samplers).  Cheap, but on its own **biased**: the free coordinates are driven by
   grad log p_t(x_free | x_obs(t)) instead of grad log p_t(x_free | x_obs(0)).  On a correlated Gaussian the bias is
   large (see tests/test_inpainting.py and the README); it vanishes only when free and observed coordinates are
   independent.

2. ``c.conditional_score(score_fn, covariance)`` - the score of p_t(x | y) for the observation y = z_obs(0):
   grad log p_t(x) + grad_x log p(y | x_t), with p(x_0 | x_t) replaced by the Gaussian with Tweedie's moments
   (Boys et al. 2023, "Tweedie moment projected diffusions"):

       E[x0 | x_t] = D(x_t) = (x_t + sigma^2 s(x_t)) / a,     Cov[x0 | x_t] = (sigma^2 / a) dD/dx_t,
       p(y | x_t) ~ N(y; A D(x_t), S),  S = A Cov A^T,  grad_x log p(y | x_t) ~ (A dD/dx)^T S^{-1} (y - A D(x_t)),

   where A selects the observed coordinates of z.  For Gaussian data both moments are exact and S is constant in x,
   so this is the **exact** conditional score: every sampler then draws the exact conditional Gaussian (tested).
   ``covariance="tweedie"`` computes S with one vector-Jacobian product per observed coordinate (fine for toy data
   and small masks); ``covariance="isotropic"`` uses Cov[x0 | x_t] ~ r_t^2 I with r_t^2 = v sigma^2 / (a^2 v + sigma^2),
   the posterior variance of N(mu, v I) data (Pi-GDM's choice, Song et al. 2023): one VJP per step, for images.

Use both: ``solvers.sample(sde, c.conditional_score(score_fn), shape, "pc", n, constraint=c)`` and finish with
``c.finalize(x)`` (the sampler's last Tweedie denoising step also moves the observed coordinates).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .sdes import expand_as_batch

Tensor = torch.Tensor
ScoreFn = Callable[[Tensor, Tensor], Tensor]

__all__ = ["ObservedSubspace", "Inpaint", "Colorize", "grey_basis", "to_grey"]


def grey_basis(dtype=torch.float64, device=None) -> Tensor:
    """The orthogonal 3x3 matrix Q whose first row is (1, 1, 1)/sqrt(3) (grey); rows 2, 3 span the colour plane."""
    Q = torch.tensor([[1.0, 1.0, 1.0],
                      [1.0, -1.0, 0.0],
                      [1.0, 1.0, -2.0]], dtype=torch.float64)
    Q = Q / Q.norm(dim=1, keepdim=True)
    return Q.to(dtype=dtype, device=device)


def to_grey(x: Tensor) -> Tensor:
    """Grey-scale image: the mean over the channel axis 1, kept as one channel: (B, 3, *S) -> (B, 1, *S)."""
    return x.mean(dim=1, keepdim=True)


class ObservedSubspace:
    """Data observed through some coordinates of an orthogonal transform z = Q x of the data.

    Args:
        sde: the forward SDE (its ``marginal_coeffs`` noise the observations).
        observed: z(0) = Q x(0) on the observed coordinates (other entries are ignored); shape broadcastable to
            the state ``(B, *D)`` (e.g. ``(1, *D)`` or ``(*D)`` to inpaint one image many times).
        mask: 1 where z is observed, 0 where free; broadcastable to the state.
    Subclasses define ``transform`` (x -> z) and ``inverse`` (z -> x = Q^T z).
    """

    def __init__(self, sde, observed: Tensor, mask: Tensor):
        self.sde = sde
        self.observed = torch.as_tensor(observed)
        self.mask = torch.as_tensor(mask)
        if not ((self.mask == 0) | (self.mask == 1)).all():
            raise ValueError("mask must contain only 0 (free) and 1 (observed)")

    # orthogonal change of basis; identity here (inpainting)
    def transform(self, x: Tensor) -> Tensor:
        return x

    def inverse(self, z: Tensor) -> Tensor:
        return z

    def _shape_like(self, x: Tensor):
        """(observed, mask) in x's dtype/device, broadcast to x's shape."""
        kw = dict(dtype=x.dtype, device=x.device)
        return (torch.broadcast_to(self.observed.to(**kw), x.shape),
                torch.broadcast_to(self.mask.to(**kw), x.shape))

    def _coeffs(self, t, x: Tensor):
        a, s = self.sde.marginal_coeffs(torch.as_tensor(t, dtype=torch.float64))
        return expand_as_batch(a, x), expand_as_batch(s, x)

    # ------------------------------------------------------------------ replacement
    def __call__(self, x: Tensor, t, generator: Optional[torch.Generator] = None) -> Tensor:
        """Replace the observed coordinates of x by a(t) z_obs(0) + sigma(t) n, n ~ N(0, I) drawn fresh."""
        obs, mask = self._shape_like(x)
        a, s = self._coeffs(t, x)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        z = self.transform(x)
        z = mask * (a * obs + s * noise) + (1 - mask) * z
        return self.inverse(z)

    def finalize(self, x: Tensor) -> Tensor:
        """Paste the clean observations (t = 0) into x: the last step after sampling."""
        obs, mask = self._shape_like(x)
        return self.inverse(mask * obs + (1 - mask) * self.transform(x))

    # ------------------------------------------------------------------ conditional score
    def conditional_score(self, score_fn: ScoreFn, covariance: str = "tweedie", data_var: float = 1.0) -> ScoreFn:
        """``(x, t) -> grad log p_t(x) + grad_x log p(y | x_t)`` with Tweedie's moments (module docstring).

        ``covariance``: ``"tweedie"`` (exact second-order Tweedie covariance; one VJP per observed coordinate;
        exact for Gaussian data) or ``"isotropic"`` (Cov[x0 | x_t] ~ data_var sigma^2 / (a^2 data_var + sigma^2) I;
        one VJP).  Works under no_grad / inference_mode callers; the result carries no graph.
        """
        if covariance not in ("tweedie", "isotropic"):
            raise ValueError(f"covariance must be 'tweedie' or 'isotropic', got {covariance!r}")
        if data_var <= 0:
            raise ValueError(f"data_var must be positive, got {data_var}")

        def fn(x: Tensor, t: Tensor) -> Tensor:
            with torch.inference_mode(False), torch.enable_grad():
                xg = x.detach().clone().requires_grad_(True)
                tg = t.detach().clone() if isinstance(t, Tensor) else t
                s = score_fn(xg, tg)
                a, sig = self._coeffs(t, x)
                obs, mask = self._shape_like(x)
                zD = self.transform((xg + sig ** 2 * s) / a)            # A D(x_t) on the observed coordinates
                resid = (mask * (obs - zD)).detach()
                if covariance == "isotropic":
                    r2 = data_var * sig ** 2 / (a ** 2 * data_var + sig ** 2)
                    u = resid / r2                                      # S^{-1} (y - A D), S = r^2 I
                else:
                    u = self._tweedie_solve(xg, zD, mask, resid, sig ** 2 / a)
                # (A dD/dx)^T u: one VJP of z_D with u (u is zero off the observed coordinates)
                (guide,) = torch.autograd.grad(zD, xg, grad_outputs=u)
            return s.detach() + guide
        return fn

    def _tweedie_solve(self, xg: Tensor, zD: Tensor, mask: Tensor, resid: Tensor, c: Tensor) -> Tensor:
        """u with S u = resid on the observed coordinates, S = (sigma^2/a) A (dD/dx) A^T, per sample.

        Row k of A dD/dx (for every sample at once: the Jacobian is block-diagonal over the batch) is one VJP of z_D
        with the indicator of each sample's k-th observed coordinate.  A plain loop over k: for the few observed
        coordinates this is meant for, faster than autograd's vmap (``is_grads_batched``)."""
        B = xg.shape[0]
        flat_mask = mask.reshape(B, -1) > 0
        counts = flat_mask.sum(1)
        m = int(counts.max())
        if m == 0:
            return torch.zeros_like(resid)
        # obs_idx[b, k]: flat index of sample b's k-th observed coordinate (padded with 0 where k >= counts[b])
        order = torch.argsort((~flat_mask).to(torch.int8), dim=1, stable=True)
        obs_idx = order[:, :m]
        valid = torch.arange(m, device=xg.device)[None] < counts[:, None]         # (B, m)
        onehots = torch.zeros(m, B, flat_mask.shape[1], dtype=xg.dtype, device=xg.device)
        onehots.scatter_(2, obs_idx.T[:, :, None], valid.T[:, :, None].to(xg.dtype))
        onehots = onehots.reshape(m, *xg.shape)
        rows = torch.stack([torch.autograd.grad(zD, xg, grad_outputs=v, retain_graph=True)[0]
                            for v in onehots])                                  # (m, B, *D): rows k of A dD/dx
        rows = self.transform(rows.reshape(m * B, *xg.shape[1:])).reshape(m, B, -1)
        J = torch.gather(rows, 2, obs_idx[None].expand(m, B, m))                   # J[k, b, l] = (A dD A^T)_{b, k, l}
        c = torch.broadcast_to(c, xg.shape).reshape(B, -1)[:, 0]
        S = J.permute(1, 0, 2) * c[:, None, None]
        S = 0.5 * (S + S.transpose(1, 2))
        eye = torch.eye(m, dtype=S.dtype, device=S.device)
        pad = ~(valid[:, :, None] & valid[:, None, :])
        S = torch.where(pad, eye.expand_as(S), S)                                  # padded rows: identity
        r = torch.gather(resid.reshape(B, -1), 1, obs_idx) * valid
        sol = torch.linalg.solve(S, r[..., None])[..., 0] * valid
        u = torch.zeros(B, flat_mask.shape[1], dtype=xg.dtype, device=xg.device)
        u.scatter_(1, obs_idx, sol)
        return u.reshape(xg.shape)


class Inpaint(ObservedSubspace):
    """Inpainting: ``known`` data (B or 1, *D) observed where ``mask`` = 1 (mask broadcastable to the data: e.g.
    (1, 1, H, W) keeps whole pixels across channels)."""

    def __init__(self, sde, known: Tensor, mask: Tensor):
        super().__init__(sde, known, mask)


class Colorize(ObservedSubspace):
    """Colourisation: the grey image (channel mean, (B or 1, 1, *S)) of 3-channel data (B, 3, *S) is observed.

    In the basis z = Q x (Q = ``grey_basis()`` applied to the channel axis 1) the grey coordinate is
    z_0 = sqrt(3) * grey and is fixed; the two colour coordinates are free.  ``Colorize.from_color(sde, x)`` observes
    the grey image of a colour image."""

    def __init__(self, sde, grey: Tensor):
        grey = torch.as_tensor(grey)
        if grey.dim() < 2 or grey.shape[1] != 1:
            raise ValueError(f"grey image must have one channel on axis 1, got shape {tuple(grey.shape)}")
        zeros = torch.zeros_like(grey)
        observed = torch.cat([math.sqrt(3.0) * grey, zeros, zeros], dim=1)
        mask = torch.zeros((1, 3) + (1,) * (grey.dim() - 2), dtype=grey.dtype)
        mask[:, 0] = 1
        super().__init__(sde, observed, torch.broadcast_to(mask, (1,) + tuple(observed.shape[1:])))

    @classmethod
    def from_color(cls, sde, x: Tensor) -> "Colorize":
        return cls(sde, to_grey(x))

    def transform(self, x: Tensor) -> Tensor:
        if x.shape[1] != 3:
            raise ValueError(f"colourisation works on 3 channels (axis 1), got shape {tuple(x.shape)}")
        return torch.einsum("ij,bj...->bi...", grey_basis(x.dtype, x.device), x)

    def inverse(self, z: Tensor) -> Tensor:
        return torch.einsum("ji,bj...->bi...", grey_basis(z.dtype, z.device), z)
