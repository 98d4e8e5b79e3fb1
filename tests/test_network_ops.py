"""The U-Net's GEMM 1x1 projections and fused attention compute the original maths with the original parameters.

References are independent of the code under test: the 1x1 convolution is ``F.conv2d`` in float64, attention is
softmax(q k^T / sqrt(C)) v written out in float64; the whole network is compared with its ``reference_ops()``
formulation (``Conv2d`` + two einsums), forward and every parameter's gradient, in both memory formats.  Tolerances
are float32 rounding (GEMM vs convolution kernels sum in different orders).  The checkpoint format is pinned by the
state dict's keys and shapes.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion import configs  # noqa: E402
from sde_diffusion.networks import get_network  # noqa: E402
from sde_diffusion.networks.layers import conv1x1, pointwise  # noqa: E402
from sde_diffusion.networks.unet import AttnBlock, reference_ops  # noqa: E402

CL = torch.channels_last


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_is_the_1x1_convolution(layout, bias):
    torch.manual_seed(0)
    conv = conv1x1(12, 20)
    if not bias:
        conv.bias = None
    x = torch.randn(3, 12, 5, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_(True)
    y = pointwise(conv, x)
    assert y.shape == (3, 20, 5, 7)
    assert y.is_contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    g = torch.randn(y.shape)
    y.backward(g)
    x64 = x.detach().double().requires_grad_(True)
    w64 = conv.weight.detach().double().requires_grad_(True)
    b64 = conv.bias.detach().double().requires_grad_(True) if bias else None
    ref = F.conv2d(x64, w64, b64)
    ref.backward(g.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(conv.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def _attention_reference(block, x):
    """DDPM's AttnBlock in float64: h = GN(x); q, k, v = W h + b; out = x + W_o (v softmax(q^T k / sqrt(C))^T)."""
    B, C, H, W = x.shape
    h = F.group_norm(x, block.norm.num_groups, block.norm.weight.double(), block.norm.bias.double(), block.norm.eps)
    h = h.reshape(B, C, H * W)
    wq = block.qkv.weight.double().reshape(3 * C, C)
    qkv = torch.einsum("oc,bcl->bol", wq, h) + block.qkv.bias.double()[None, :, None]
    q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
    logits = torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C)
    a = torch.exp(logits - logits.amax(-1, keepdim=True))
    a = a / a.sum(-1, keepdim=True)
    o = torch.einsum("bij,bcj->bci", a, v)
    o = torch.einsum("oc,bcl->bol", block.proj.weight.double().reshape(C, C), o) + block.proj.bias.double()[None, :,
                                                                                                           None]
    out = x + o.reshape(B, C, H, W)
    return out / math.sqrt(2.0) if block.skip_rescale else out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("skip_rescale", [False, True])
def test_attention_is_the_softmax_formula(layout, skip_rescale):
    torch.manual_seed(1)
    block = AttnBlock(16, skip_rescale=skip_rescale)
    with torch.no_grad():
        for p in block.parameters():             # the zero-initialised output projection is not all that is tested
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 16, 6, 5)
    if layout == "channels_last":
        block = block.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    y = block(x)
    ref = _attention_reference(block, x.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    with reference_ops():
        torch.testing.assert_close(block(x), y, rtol=1e-5, atol=1e-5)


def _unet(resblock_type, seed=0):
    config = configs.get_config("vp_digits")
    config.model.nf = 16
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8, 4)
    config.model.num_classes = 0
    config.model.dropout = 0.0
    config.model.resblock_type = resblock_type
    torch.manual_seed(seed)
    model = get_network(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return config, model


def _forward_and_grads(model, x, t):
    model.zero_grad(set_to_none=True)
    y = model(x, t)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return y.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("resblock_type", ["ddpm", "biggan"])
def test_unet_equals_its_reference_formulation(resblock_type, layout):
    config, model = _unet(resblock_type)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, config.data.num_channels, 8, 8, generator=g)
    t = torch.rand(4, generator=g)
    if layout == "channels_last":
        model = model.to(memory_format=CL)
        x = x.contiguous(memory_format=CL)
    y, grads = _forward_and_grads(model, x, t)
    with reference_ops():
        y_ref, grads_ref = _forward_and_grads(model, x, t)
    assert y.abs().max() > 1e-3                  # a non-trivial output
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name, gr in grads_ref.items():
        scale = gr.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(grads[name] / scale, gr / scale, rtol=1e-4, atol=1e-5, msg=name)


def test_unet_input_layout_does_not_change_the_numbers():
    config, model = _unet("ddpm")
    x = torch.randn(2, config.data.num_channels, 8, 8)
    t = torch.full((2,), 0.3)
    y = model(x, t)
    y_cl = model.to(memory_format=CL)(x.contiguous(memory_format=CL), t)
    torch.testing.assert_close(y_cl, y, rtol=1e-4, atol=1e-5)


# sha256 of "key shape" lines of vp_cifar's U-Net state dict, taken from the network before the GEMM / SDPA change:
# the checkpoint format (names, shapes) is unchanged, so old checkpoints load.
VP_CIFAR_FINGERPRINT = (304, 35_746_307, "9adc0242ee2b43503052aefa79624fb40d28b98d97112bbda308c6a8adac613d")


def _fingerprint(state):
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    return hashlib.sha256(text.encode()).hexdigest()


def test_checkpoint_format_is_unchanged():
    config = configs.get_config("vp_cifar")
    with torch.device("meta"):                   # no memory, no init cost: only names and shapes matter
        model = get_network(config)
    state = model.state_dict()
    n_params = sum(v.numel() for k, v in state.items())
    assert (len(state), n_params, _fingerprint(state)) == VP_CIFAR_FINGERPRINT
    attn = [k for k in state if ".attn." in k or k.startswith("mid_attn.")]
    assert attn and all(k.rsplit(".", 2)[-2] in ("norm", "qkv", "proj") for k in attn)
    assert all(state[k].dim() == 4 and state[k].shape[-2:] == (1, 1) for k in attn if k.endswith("qkv.weight"))
