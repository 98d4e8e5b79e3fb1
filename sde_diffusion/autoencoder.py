"""Latent diffusion (Rombach et al. 2022): a KL-regularised convolutional autoencoder and the codec the loops use.

* ``KLAutoencoder`` — encoder x (B, C, H, W) -> the posterior q(z | x) = N(mean, diag exp(logvar)) with mean, logvar
  of shape (B, c, H / f, W / f), f = 2^(len(ch_mult) - 1); decoder z -> x_hat (B, C, H, W).  ResNet blocks with
  GroupNorm and SiLU, stride-2 convolutions down, nearest-neighbour + conv up (LDM's ``Encoder`` / ``Decoder`` at the
  size of 8x8 digits, no attention).
* ``kl_divergence(mean, logvar)`` — KL(N(mean, diag e^logvar) || N(0, I)) per example, in closed form
  ½ Σ (μ² + σ² − 1 − log σ²).
* ``autoencoder_loss`` — reconstruction + β·KL (LDM's "KL-reg." first stage, ``autoencoder.beta``), perceptual-free:
  the reconstruction term is the per-example sum of squared (``l2``) or absolute (``l1``) errors in model space, of a
  decoder fed a reparameterised sample z = μ + σ ε.  No LPIPS and no patch discriminator: on 8x8 images a perceptual
  network has nothing to see.
* ``measure_scale_factor`` — 1 / std of the posterior means over a data set (LDM's ``scale_factor``, measured on the
  first batch there, here on the whole training split): the diffusion model sees unit-variance latents.
* ``LatentCodec`` — the frozen autoencoder and its scale factor: ``encode(x)`` = scale · mean (or a posterior sample,
  ``model.latent_sample``) before the diffusion loss, ``decode(z)`` = decoder(z / scale) after sampling.
  ``identity`` names the checkpoint it came from: ``{"path", "step", "sha256", "scale_factor"}``, ``sha256`` the digest
  of the EMA weights and the scale factor (what decoding depends on).  A latent run records it in each checkpoint, and
  ``run.autoencoder_train.load_codec(..., expected=...)`` refuses an autoencoder whose digest differs (issue 13).

Configuration (core, no I/O): a config diffuses in latent space when ``model.autoencoder_workdir`` names the workdir
of a ``--mode train_autoencoder`` run; its ``autoencoder`` section (``configs/ldm_digits.py``) describes the
autoencoder, and ``latent_shape(config)`` / ``network_config(config)`` give the latent shape and the config view the
score network is built from (``data.num_channels`` / ``image_size`` of the latents).  Loading the checkpoint is
``run.autoencoder_train.load_codec``.
"""
from __future__ import annotations

import copy
import math
from typing import Iterable, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

Tensor = torch.Tensor

__all__ = ["KLAutoencoder", "kl_divergence", "autoencoder_loss", "measure_scale_factor", "LatentCodec",
           "is_latent", "latent_shape", "network_config", "build_autoencoder", "RECONSTRUCTIONS", "LOGVAR_RANGE"]

RECONSTRUCTIONS = ("l2", "l1")
#: log-variance clamp of the posterior (LDM's DiagonalGaussianDistribution)
LOGVAR_RANGE = (-30.0, 20.0)


def _groups(ch: int) -> int:
    for g in (8, 4, 2, 1):
        if ch % g == 0:
            return g
    return 1


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class _Encoder(nn.Module):
    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, latent_channels):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(cin, w))
                cin = w
            if i < len(widths) - 1:
                blocks.append(nn.Conv2d(cin, cin, 3, stride=2, padding=1))     # downsample by 2
        blocks.append(_ResBlock(cin, cin))                                     # middle
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.blocks(self.conv_in(x))
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, latent_channels):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(latent_channels, cin, 3, padding=1)
        blocks = [_ResBlock(cin, cin)]                                         # middle
        for i in reversed(range(len(widths))):
            for _ in range(num_res_blocks):
                blocks.append(_ResBlock(cin, widths[i]))
                cin = widths[i]
            if i > 0:
                blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cin, 3, padding=1)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(cin), cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.blocks(self.conv_in(z))
        return self.conv_out(F.silu(self.norm_out(h)))


class KLAutoencoder(nn.Module):
    """x (B, C, H, W) <-> z (B, c, H / f, W / f), f = 2^(len(ch_mult) - 1); see the module docstring."""

    def __init__(self, in_channels: int = 1, ch: int = 32, ch_mult=(1, 2), num_res_blocks: int = 1,
                 latent_channels: int = 2):
        super().__init__()
        ch_mult = tuple(int(m) for m in ch_mult)
        if not ch_mult or min(ch_mult) < 1 or int(ch) < 1 or int(latent_channels) < 1 or int(num_res_blocks) < 0:
            raise ValueError(f"autoencoder: ch, latent_channels and ch_mult entries must be >= 1 and num_res_blocks "
                             f">= 0, got ch={ch}, latent_channels={latent_channels}, ch_mult={ch_mult}, "
                             f"num_res_blocks={num_res_blocks}")
        self.in_channels, self.latent_channels = int(in_channels), int(latent_channels)
        self.downsampling = 2 ** (len(ch_mult) - 1)
        self.encoder = _Encoder(in_channels, int(ch), ch_mult, int(num_res_blocks), int(latent_channels))
        self.decoder = _Decoder(in_channels, int(ch), ch_mult, int(num_res_blocks), int(latent_channels))

    def encode(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, C, H, W) in model space -> (mean, logvar), each (B, c, H / f, W / f)."""
        if x.shape[-1] % self.downsampling or x.shape[-2] % self.downsampling:
            raise ValueError(f"autoencoder input of size {tuple(x.shape[-2:])} is not divisible by its downsampling "
                             f"factor {self.downsampling}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, sample: bool = True):
        """(x_hat, mean, logvar): the reconstruction of a posterior sample (``sample``) or of the mean."""
        mean, logvar = self.encode(x)
        z = mean
        if sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return self.decode(z), mean, logvar


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag exp(logvar)) || N(0, I)) per example: ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²); (B, *D) -> (B,)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def autoencoder_loss(model: KLAutoencoder, x: Tensor, beta: float = 1e-3, recon: str = "l2",
                     generator: Optional[torch.Generator] = None) -> Tuple[Tensor, dict]:
    """Mean over the batch of [reconstruction(x, decoder(z)) + beta KL(q(z | x) || N(0, I))], z ~ q(z | x).

    Returns ``(loss, stats)`` with the batch means ``recon`` (per example, summed over pixels), ``kl`` and ``mse``
    (per pixel, of the sampled reconstruction)."""
    if recon not in RECONSTRUCTIONS:
        raise ValueError(f"autoencoder.recon must be one of {', '.join(RECONSTRUCTIONS)}, got {recon!r}")
    x_hat, mean, logvar = model(x, generator=generator, sample=True)
    err = x_hat - x
    rec = (err.pow(2) if recon == "l2" else err.abs()).flatten(1).sum(1)
    kl = kl_divergence(mean, logvar)
    loss = (rec + float(beta) * kl).mean()
    stats = {"recon": float(rec.mean().detach()), "kl": float(kl.mean().detach()),
             "mse": float(err.pow(2).mean().detach())}
    return loss, stats


@torch.no_grad()
def measure_scale_factor(model: KLAutoencoder, batches: Iterable[Tensor]) -> Tuple[float, dict]:
    """1 / std of the posterior means over every element of ``batches`` (model-space images); returns
    ``(scale_factor, {"latent_mean", "latent_std", "num_examples"})``.  The std is taken about the global mean, so
    scale · mean has variance exactly 1 over these data (its mean, about 0 under the KL term, is kept: LDM does not
    centre either)."""
    total, total_sq, count, n = 0.0, 0.0, 0, 0
    for x in batches:
        mean, _ = model.encode(x)
        m = mean.double()
        total += float(m.sum())
        total_sq += float(m.pow(2).sum())
        count += m.numel()
        n += x.shape[0]
    if count == 0:
        raise ValueError("measure_scale_factor needs at least one example")
    mu = total / count
    var = max(total_sq / count - mu * mu, 0.0)
    std = math.sqrt(var)
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"the latent means have std {std}: the encoder has collapsed (raise autoencoder.beta's "
                         f"counterpart, the reconstruction weight, or train longer)")
    return 1.0 / std, {"latent_mean": mu, "latent_std": std, "num_examples": n}


class LatentCodec:
    """The frozen autoencoder between model space and the diffusion's latent space.

    ``encode(x)``: x (B, C, H, W) in model space -> scale · mean(x) (or scale · z, z ~ q(z | x), when ``sample``);
    ``decode(z)``: decoder(z / scale) -> (B, C, H, W) in model space.  ``shape`` is one latent's (c, h, w);
    ``identity`` the checkpoint's ``{"path", "step", "sha256", "scale_factor"}`` (empty for a codec built in memory)."""

    def __init__(self, model: KLAutoencoder, scale_factor: float, shape: Tuple[int, int, int], sample: bool = False,
                 source: str = "", identity: Optional[dict] = None):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.scale_factor = float(scale_factor)
        self.shape = tuple(int(s) for s in shape)
        self.sample = bool(sample)
        self.source = source
        self.identity = dict(identity or {})

    @torch.no_grad()
    def encode(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        mean, logvar = self.model.encode(x)
        z = mean
        if self.sample:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return z * self.scale_factor

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.model.decode(z / self.scale_factor)

    def to(self, device) -> "LatentCodec":
        self.model.to(device)
        return self

    def __repr__(self):
        return (f"LatentCodec(latent {self.shape}, scale_factor {self.scale_factor:.4g}, "
                f"{'posterior samples' if self.sample else 'posterior means'}{', ' + self.source if self.source else ''})")


# ------------------------------------------------------------------------------------------------ config
def is_latent(config) -> bool:
    """Whether ``config`` diffuses in the latent space of an autoencoder (``model.autoencoder_workdir`` set)."""
    return bool(str(config.model.get("autoencoder_workdir", "") or "").strip())


def _section(config):
    from .configs import ConfigError
    if "autoencoder" not in config:
        raise ConfigError(f"config {config.name!r} has no 'autoencoder' section: train an autoencoder (and diffuse in "
                          f"its latent space) with a latent config such as ldm_digits")
    return config.autoencoder


def build_autoencoder(config) -> KLAutoencoder:
    """The ``KLAutoencoder`` of ``config.autoencoder`` for the images of ``config.data`` (float32, CPU)."""
    from .configs import ConfigError
    if config.data.dataset.lower() == "toy":
        raise ConfigError("the autoencoder is convolutional: data.dataset must be an image dataset, not toy")
    a = _section(config)
    try:
        return KLAutoencoder(in_channels=int(config.data.num_channels), ch=int(a.ch), ch_mult=tuple(a.ch_mult),
                             num_res_blocks=int(a.num_res_blocks), latent_channels=int(a.latent_channels))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def latent_shape(config) -> Tuple[int, int, int]:
    """(c, H / f, W / f): one latent of ``config.autoencoder`` for the images of ``config.data``."""
    from .configs import ConfigError
    a = _section(config)
    f = 2 ** (len(tuple(a.ch_mult)) - 1)
    size = int(config.data.image_size)
    if size % f:
        raise ConfigError(f"data.image_size {size} is not divisible by the autoencoder's downsampling factor {f} "
                          f"(autoencoder.ch_mult = {tuple(a.ch_mult)})")
    return int(a.latent_channels), size // f, size // f


def network_config(config):
    """The config the score network is built from: ``config`` itself in data space; for a latent config a copy whose
    ``data.num_channels`` / ``image_size`` / ``dim`` are the latents' (everything else unchanged)."""
    if not is_latent(config):
        return config
    c, h, w = latent_shape(config)
    view = copy.deepcopy(config)
    view.data.num_channels, view.data.image_size, view.data.dim = c, h, c * h * w
    return view
