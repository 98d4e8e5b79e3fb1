"""Small helpers for the loops: device choice, seeding, RNG state capture, image grids."""
from __future__ import annotations

import logging
import os
import random
from typing import Optional

import numpy as np
import torch

Tensor = torch.Tensor
log = logging.getLogger("sde_diffusion")


def open_summary_writer(workdir: str):
    """A TensorBoard ``SummaryWriter`` on ``<workdir>/tensorboard``, or None (with a warning) without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logging.getLogger(__name__).warning("tensorboard is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def get_device(name: Optional[str] = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU; otherwise the named device."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels (``torch.use_deterministic_algorithms``; cuDNN deterministic, no benchmark)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(bool(enabled), warn_only=False)
    torch.backends.cudnn.deterministic = bool(enabled)
    torch.backends.cudnn.benchmark = not enabled


def get_rng_state() -> dict:
    """Every RNG state as plain tensors / lists / numbers (loadable with ``torch.load(weights_only=True)``)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": list(py_state[1]),
                   "gauss_next": py_state[2] if py_state[2] is None else float(py_state[2])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def image_grid(images: Tensor, nrow: Optional[int] = None, padding: int = 1, pad_value: float = 1.0) -> Tensor:
    """(B, C, H, W) in [0, 1] -> (C, H', W') grid, ``nrow`` images per row (default ~sqrt(B))."""
    B, C, H, W = images.shape
    nrow = nrow or max(1, int(np.ceil(np.sqrt(B))))
    ncol = int(np.ceil(B / nrow))
    grid = torch.full((C, ncol * (H + padding) + padding, nrow * (W + padding) + padding), pad_value,
                      dtype=images.dtype)
    for k in range(B):
        r, c = divmod(k, nrow)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top:top + H, left:left + W] = images[k]
    return grid


def save_image_grid(images: Tensor, path: str, nrow: Optional[int] = None, scale: int = 1) -> None:
    """Save (B, C, H, W) images in [0, 1] as one PNG grid; ``scale`` enlarges small images (nearest)."""
    from PIL import Image
    grid = image_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def plot_points(points: Tensor, path: Optional[str] = None, reference: Optional[Tensor] = None, title: str = ""):
    """Scatter (2-D) or histogram (1-D) of toy samples; saved to ``path`` and returned as an (3, H, W) float array."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = points.detach().cpu().reshape(points.shape[0], -1).numpy()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    if pts.shape[1] == 1:
        if reference is not None:
            ax.hist(reference.reshape(-1).cpu().numpy(), bins=80, density=True, alpha=0.4, label="data")
        ax.hist(pts[:, 0], bins=80, density=True, alpha=0.6, label="samples")
        ax.legend()
    else:
        if reference is not None:
            ref = reference.reshape(reference.shape[0], -1).cpu().numpy()
            ax.scatter(ref[:, 0], ref[:, 1], s=1, alpha=0.3, c="grey")
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.6)
        ax.set_aspect("equal")
    ax.set_title(title)
    fig.tight_layout()
    if path:
        fig.savefig(path)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(np.float32) / 255.0
    plt.close(fig)
    return rgb.transpose(2, 0, 1)


def optimizer_step(model, opt, loss, grad_clip: float) -> None:
    """One plain update: zero the gradients, backpropagate ``loss``, clip the global norm to ``grad_clip`` (0: no
    clipping), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
