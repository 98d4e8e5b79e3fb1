"""Inception-v3 as used for FID: the 2015-12-05 TensorFlow graph, in PyTorch, with the layout of pytorch-fid's port.

The network is torchvision's Inception-v3 layout (so the weights' key names are ``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight``) with the differences of the TF graph that the FID weights
``pt_inception-2015-12-05-6726825d.pth`` were ported from:

  * the average pools inside the A, C and first E blocks exclude the zero padding from the mean (TF's ``SAME`` pooling);
  * the last E block (``Mixed_7c``) pools its fourth branch with a 3x3 *max* pool instead of an average pool;
  * 1008 output classes (the TF graph's softmax), no auxiliary classifier.

Input: images ``(B, C, H, W)`` in [0, 1], C = 1 or 3 (grey images are repeated to RGB), resized to 299x299 and scaled to
[-1, 1] by one of two conventions (``preprocess``):

  * ``"pytorch_fid"`` (default): ``F.interpolate(x, 299, mode="bilinear", align_corners=False)`` on the [0, 1] floats,
    then ``2 x - 1``: pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``.
  * ``"tf"``: what the original TensorFlow graph does and torch-fidelity (``interpolate_bilinear_2d_like_tensorflow1x``,
    ``FeatureExtractorInceptionV3``) and clean-fid (``mode="legacy_tensorflow"``) reproduce: the images are 8-bit
    (floats are rounded to the nearest of the 256 levels), resized by TF1's ``tf.image.resize_bilinear``
    (``align_corners=False``, *no* half-pixel offset: output pixel o samples the input at o * in/out, so the image is
    shifted by half a pixel against pytorch's and its last rows/columns are clamped; see ``resize_bilinear_tf1``), then
    scaled by (x - 128) / 128, the graph's ``Sub``/``Mul`` constants.
  On 32x32 images the two give pool3 features that differ by tens of per cent (measured with random weights; see the
  README), so FID numbers of different conventions do not compare.

Output: the 2048-d pool3 features used by FID/KID and the 1008 logits used by the Inception Score.  Like the original IS code (which multiplies pool3 by the softmax weight matrix
only), ``logits_unbiased = pool3 @ fc.weight^T``; ``logits`` adds the bias.

Weights are read from a local file only: nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

__all__ = ["FIDInceptionV3", "load_fid_inception", "resize_bilinear_tf1", "PREPROCESS", "FID_WEIGHTS_FILENAME",
           "FID_WEIGHTS_URL", "FEATURE_DIM", "NUM_CLASSES"]

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FEATURE_DIM = 2048
NUM_CLASSES = 1008
PREPROCESS = ("pytorch_fid", "tf")      # the input conventions of FIDInceptionV3 (see the module docstring)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, as in TF) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3 stride-1 average pool whose border means are over the valid pixels only (TF 'SAME')."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1 (Mixed_5b/c/d)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 (Mixed_6a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..e)."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 (Mixed_7a)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded 1x3/3x1 outputs (Mixed_7b: TF average pool; Mixed_7c: max pool, as in the TF graph)."""

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(pool)
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


def _tf1_source_grid(in_size: int, out_size: int, device) -> Tuple[Tensor, Tensor, Tensor]:
    """TF1 ``resize_bilinear(align_corners=False, half_pixel_centers=False)`` along one axis: output index o reads the
    input at s = o * scale with scale = in / out in float32 (``CalculateResizeScale`` and the legacy scaler of
    tensorflow/core/kernels/image_resizer_state.h, resize_bilinear_op.cc's ``compute_interpolation_weights``):
    lower = floor(s), upper = min(lower + 1, in - 1), weight s - lower.  (``F.interpolate(align_corners=False)``
    instead samples at (o + 1/2) * scale - 1/2, clamped at 0.)"""
    scale = torch.tensor(float(in_size), dtype=torch.float32) / float(out_size)
    s = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    lower = s.floor()
    weight = s - lower
    lower = lower.long()
    upper = (lower + 1).clamp(max=in_size - 1)
    return lower, upper, weight


def resize_bilinear_tf1(x: Tensor, size) -> Tensor:
    """Bilinear resize of ``x: (B, C, H, W)`` (float) to ``size = (h, w)`` as TF 1.x's ``tf.image.resize_bilinear``
    (align_corners=False) computes it, the resize inside the 2015-12-05 Inception graph that FID was defined with.

    Same arithmetic as TF's kernel: top = tl + (tr - tl) * wx, bottom = bl + (br - bl) * wx,
    out = top + (bottom - top) * wy, in x's dtype with float32 source coordinates.  Written from TensorFlow's kernel;
    torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x(method="slow")`` is the same computation and the
    tests compare the two bit for bit.
    """
    if x.dim() != 4 or not torch.is_floating_point(x):
        raise ValueError(f"expected a float tensor (B, C, H, W), got {x.dtype} of shape {tuple(x.shape)}")
    h, w = int(size[0]), int(size[1])
    ylo, yhi, wy = _tf1_source_grid(x.shape[2], h, x.device)
    xlo, xhi, wx = _tf1_source_grid(x.shape[3], w, x.device)
    wx, wy = wx.to(x.dtype), wy.to(x.dtype).view(h, 1)
    top, bottom = x.index_select(2, ylo), x.index_select(2, yhi)                 # (B, C, h, W)
    tl, tr = top.index_select(3, xlo), top.index_select(3, xhi)
    bl, br = bottom.index_select(3, xlo), bottom.index_select(3, xhi)
    top = tl + (tr - tl) * wx
    bottom = bl + (br - bl) * wx
    return top + (bottom - top) * wy


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3.  ``forward(images in [0, 1]) -> {"pool3": (B, 2048), "logits": (B, 1008),
    "logits_unbiased": (B, 1008)}``.  Built with random weights; use ``load_fid_inception`` for the real ones.
    ``preprocess``: the input convention, ``"pytorch_fid"`` or ``"tf"`` (module docstring); with ``"tf"`` uint8
    images (0..255) are accepted too."""

    def __init__(self, resize_input: bool = True, normalize_input: bool = True, preprocess: str = "pytorch_fid"):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
        self.resize_input = resize_input
        self.normalize_input = normalize_input
        self.preprocess_convention = preprocess
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1|3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if self.preprocess_convention == "tf":
            # 8-bit levels as float32 0..255 (the TF graph's input is a uint8 image), TF1 resize, (x - 128) / 128
            x = images.float() if images.dtype == torch.uint8 else torch.round(images.float().clamp(0, 1) * 255)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if self.resize_input:
                x = resize_bilinear_tf1(x, (299, 299))      # identity at 299x299
            if self.normalize_input:
                x = (x - 128) / 128
            return x
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize_input and tuple(x.shape[-2:]) != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if self.normalize_input:
            x = 2 * x - 1
        return x

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        x = self.preprocess(images)
        x = self.Conv2d_1a_3x3(x)                                # 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)                                # 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)                                # 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)             # 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)                                # 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)                                # 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)             # 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))       # 288 x 35 x 35
        x = self.Mixed_6a(x)                                     # 768 x 17 x 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7a(x)                                     # 1280 x 8 x 8
        x = self.Mixed_7c(self.Mixed_7b(x))                      # 2048 x 8 x 8
        pool3 = x.mean(dim=(2, 3))                               # global average pool: (B, 2048)
        unbiased = pool3 @ self.fc.weight.t()
        return {"pool3": pool3, "logits": unbiased + self.fc.bias, "logits_unbiased": unbiased}


def load_fid_inception(path: Optional[str], device="cpu", preprocess: str = "pytorch_fid") -> FIDInceptionV3:
    """The FID Inception with the pytorch-fid port of the 2015-12-05 TF weights read from ``path``, with the input
    convention ``preprocess`` (``"pytorch_fid"`` | ``"tf"``, see the module docstring).  torch-fidelity's port
    (``weights-inception-2015-12-05-6726825d.pth``) uses the same tensor names and loads too.

    Raises ``FileNotFoundError`` naming the expected file and where to get it when ``path`` is empty or missing, and
    ``ValueError`` when the file's tensors do not fit the network.
    """
    hint = (f"FID/KID/IS need the Inception weights file {FID_WEIGHTS_FILENAME} (pytorch-fid's port of the "
            f"2015-12-05 TensorFlow Inception). Nothing is downloaded here: fetch it on a machine with internet "
            f"access from {FID_WEIGHTS_URL} (or `pip install pytorch-fid` and copy it from the torch hub cache, "
            f"~/.cache/torch/hub/checkpoints/) and set --config.eval.inception_weights=/path/to/{FID_WEIGHTS_FILENAME}")
    if not path:
        raise FileNotFoundError(f"no Inception weights given (eval.inception_weights is empty). {hint}")
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
        path = os.path.join(path, FID_WEIGHTS_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path!r}. {hint}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model = FIDInceptionV3(preprocess=preprocess)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own and not k.startswith("AuxLogits."))
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    bad_shape = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or missing or bad_shape:
        raise ValueError(f"{path} does not hold the FID Inception weights ({FID_WEIGHTS_FILENAME}): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {bad_shape[:5]}")
    model.load_state_dict({k: state[k] for k in own if k in state}, strict=False)
    return model.to(device).eval()
