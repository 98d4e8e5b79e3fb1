"""A DDPM / DDPM++-class U-Net in pure PyTorch (Ho et al. 2020; Song et al. 2021, NCSN++/DDPM++ without FIR or
progressive growing).

Layout (``nf``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``):

    conv_in -> for each level: num_res_blocks residual blocks (+ self-attention at attn_resolutions), then a
    downsampling (strided conv, or a BigGAN down-block) -> middle: res, attn, res -> for each level in reverse:
    num_res_blocks + 1 residual blocks on [h, skip] (+ attention), then an upsampling -> GroupNorm, swish, conv_out.

Residual blocks are ``ddpm`` (DDPM's ResnetBlock) or ``biggan`` (BigGAN-style, with up/down inside the block);
``skip_rescale`` divides every residual sum by sqrt(2) (DDPM++).  GroupNorm uses min(C // 4, 32) groups.
Conditioning: time embedding (+ optional label embedding) is added to every residual block.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import register_network
from .layers import TimeEmbedding, conv1x1, conv3x3, dense, get_act, pointwise

Tensor = torch.Tensor


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=max(1, min(channels // 4, 32)), num_channels=channels, eps=1e-6)


_REFERENCE_OPS = False


@contextlib.contextmanager
def reference_ops(enabled: bool = True):
    """Within the block, the U-Net computes its 1x1 projections with ``Conv2d`` and attention with two einsums and
    a softmax (the original formulation) instead of GEMMs and ``scaled_dot_product_attention``: the same maths and
    parameters, kept for the before/after benchmark (``experiments/throughput.py --variants reference_ops``) and the
    equality test."""
    global _REFERENCE_OPS
    prev, _REFERENCE_OPS = _REFERENCE_OPS, bool(enabled)
    try:
        yield
    finally:
        _REFERENCE_OPS = prev


class AttnBlock(nn.Module):
    """Single-head self-attention over spatial positions (DDPM's AttnBlock): with h = GN(x) as (B, L = H W, C),
    [q, k, v] = h W_qkv^T + b_qkv, out = x + (softmax(q k^T / sqrt(C)) v) W_proj^T + b_proj.

    ``qkv`` / ``proj`` stay 1x1 ``Conv2d`` parameters (checkpoints unchanged); the forward uses their weights as
    (C_out, C_in) matrices with ``F.linear`` on the (B, L, C) view and ``F.scaled_dot_product_attention`` (fused
    kernels: flash / memory-efficient on CUDA, a fused one on CPU), as diffusers' attention does."""

    def __init__(self, channels: int, skip_rescale: bool = False):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv1x1(channels, 3 * channels)
        self.proj = conv1x1(channels, channels, init_scale=0.0)
        self.skip_rescale = skip_rescale

    def forward(self, x):
        B, C, H, W = x.shape
        if _REFERENCE_OPS:
            q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
            w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=-1)
            h = self.proj(torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W))
        else:
            h = self.norm(x).flatten(2).transpose(1, 2)                    # (B, L, C); a view for channels-last x
            q, k, v = F.linear(h, self.qkv.weight.flatten(1), self.qkv.bias).chunk(3, dim=-1)
            h = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(C)) v
            h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)
            h = h.transpose(1, 2).reshape(B, C, H, W)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2) if with_conv else None

    def forward(self, x):
        if self.conv is not None:
            return self.conv(x)
        return F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x):
        h = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(h) if self.conv is not None else h


class ResBlock(nn.Module):
    """Residual block: GN, act, [resample], conv, +temb, GN, act, dropout, conv (zero-init); 1x1 skip when channels
    or resolution change.  Without ``up``/``down`` it is DDPM's block; with them the BigGAN-style block of
    NCSN++/DDPM++ (nearest up / average-pool down inside the block, applied to both branches)."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, act: str, skip_rescale: bool,
                 up: bool = False, down: bool = False):
        super().__init__()
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv3x3(in_ch, out_ch)
        self.temb = dense(temb_dim, out_ch)
        self.norm1 = group_norm(out_ch)
        self.drop = nn.Dropout(dropout)
        self.conv1 = conv3x3(out_ch, out_ch, init_scale=0.0)
        self.skip = conv1x1(in_ch, out_ch) if (in_ch != out_ch or up or down) else None
        self.act = get_act(act)
        self.skip_rescale = skip_rescale
        self.up, self.down = up, down

    def _resample(self, x):
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x, temb):
        h = self.act(self.norm0(x))
        h = self._resample(h)
        x = self._resample(x)
        h = self.conv0(h)
        h = h + self.temb(self.act(temb))[:, :, None, None]
        h = self.conv1(self.drop(self.act(self.norm1(h))))
        if self.skip is not None:             # the 1x1 projection as a GEMM (layers.pointwise), same parameters
            x = self.skip(x) if _REFERENCE_OPS else pointwise(self.skip, x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


@register_network("unet")
class UNet(nn.Module):
    """x (B, C, H, W) -> (B, C, H, W); H = W = ``data.image_size`` divisible by 2^(len(ch_mult) - 1).

    Config (``model.*``): ``nf``, ``ch_mult``, ``num_res_blocks``, ``attn_resolutions``, ``dropout``,
    ``resblock_type`` (``ddpm`` | ``biggan``), ``skip_rescale``, ``resamp_with_conv``, ``nonlinearity``,
    ``embedding_type`` (``positional`` | ``fourier``), ``time_scale``, ``fourier_scale``, ``num_classes``,
    ``init_scale`` (of the output conv; 0 = zero init), ``learned_variance`` (2C output channels: the prediction, then
    the variance interpolation v).
    """

    def __init__(self, config):
        super().__init__()
        m = config.model
        self.channels = int(config.data.num_channels)
        self.image_size = int(config.data.image_size)
        nf = int(m.nf)
        ch_mult = tuple(int(c) for c in m.ch_mult)
        self.num_resolutions = len(ch_mult)
        if self.image_size % (2 ** (self.num_resolutions - 1)):
            raise ValueError(f"image_size {self.image_size} is not divisible by 2^{self.num_resolutions - 1} "
                             f"(ch_mult={ch_mult})")
        attn_res = {int(r) for r in m.attn_resolutions}
        nrb = int(m.num_res_blocks)
        temb_dim = 4 * nf
        act = m.nonlinearity
        skip_rescale = bool(m.skip_rescale)
        if m.resblock_type not in ("ddpm", "biggan"):
            raise ValueError(f"resblock_type must be 'ddpm' or 'biggan', got {m.resblock_type!r}")
        biggan = m.resblock_type == "biggan"

        def resblock(i, o, **kw):
            return ResBlock(i, o, temb_dim, m.dropout, act, skip_rescale, **kw)

        self.time_embed = TimeEmbedding(nf, temb_dim, m.embedding_type, m.time_scale, m.fourier_scale,
                                        m.num_classes, act)
        self.conv_in = conv3x3(self.channels, nf)

        # --- downsampling path: remember every skip's channel count
        self.down = nn.ModuleList()
        skips = [nf]
        ch, res = nf, self.image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(nrb):
                block = nn.ModuleDict({"res": resblock(ch, nf * mult)})
                ch = nf * mult
                if res in attn_res:
                    block["attn"] = AttnBlock(ch, skip_rescale)
                self.down.append(block)
                skips.append(ch)
            if level != self.num_resolutions - 1:
                self.down.append(nn.ModuleDict({"downsample": resblock(ch, ch, down=True) if biggan
                                                else Downsample(ch, m.resamp_with_conv)}))
                skips.append(ch)
                res //= 2

        self.mid_res0 = resblock(ch, ch)
        self.mid_attn = AttnBlock(ch, skip_rescale)
        self.mid_res1 = resblock(ch, ch)

        # --- upsampling path
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            out = nf * ch_mult[level]
            for _ in range(nrb + 1):
                block = nn.ModuleDict({"res": resblock(ch + skips.pop(), out)})
                ch = out
                if res in attn_res:
                    block["attn"] = AttnBlock(ch, skip_rescale)
                self.up.append(block)
            if level != 0:
                self.up.append(nn.ModuleDict({"upsample": resblock(ch, ch, up=True) if biggan
                                              else Upsample(ch, m.resamp_with_conv)}))
                res *= 2
        assert not skips

        self.norm_out = group_norm(ch)
        self.act = get_act(act)
        # model.learned_variance: C more channels for Improved DDPM's v (zero init like the rest: v = 0, beta-tilde)
        out_ch = self.channels * (2 if bool(m.get("learned_variance", False)) else 1)
        self.conv_out = conv3x3(ch, out_ch, init_scale=m.init_scale)
        self.biggan = biggan

    def forward(self, x: Tensor, t: Tensor, y: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected images (B, {self.channels}, H, W), got {tuple(x.shape)}")
        temb = self.time_embed(t, y)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            if "downsample" in block:
                h = block["downsample"](h, temb) if self.biggan else block["downsample"](h)
            else:
                h = block["res"](h, temb)
                if "attn" in block:
                    h = block["attn"](h)
            hs.append(h)
        h = self.mid_res1(self.mid_attn(self.mid_res0(h, temb)), temb)
        for block in self.up:
            if "upsample" in block:
                h = block["upsample"](h, temb) if self.biggan else block["upsample"](h)
            else:
                h = block["res"](torch.cat([h, hs.pop()], dim=1), temb)
                if "attn" in block:
                    h = block["attn"](h)
        return self.conv_out(self.act(self.norm_out(h)))
