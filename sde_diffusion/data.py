"""Datasets: CIFAR-10 (official python tarball), scikit-learn's 8x8 digits, and toy 1-D / 2-D mixtures.

Every dataset gives ``(x, y)`` batches: ``x`` float32 in *data space* (images in [0, 1], NCHW; toy points as they are)
and ``y`` int64 labels (zeros where a dataset has none).  ``get_data_scaler(config)`` maps data space to model space
([-1, 1] when ``data.centered``) and ``get_data_inverse_scaler`` back.

Batches are a pure function of ``(seed, step)``: ``dataset.batch(step, batch_size, seed)`` — finite datasets walk a
fresh permutation per epoch (epoch e uses permutation seed f(seed, e), the last incomplete batch is dropped), toys draw
fresh points; flips and dequantisation noise come from a generator seeded by (seed, step).  A resumed run therefore
sees exactly the batches an uninterrupted one would, without storing loader state.
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import tarfile
import urllib.error
import urllib.request
import zlib
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from . import targets
from .atomic import atomic_path

Tensor = torch.Tensor

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FILENAME = "cifar-10-python.tar.gz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
DIGITS_TRAIN_SIZE = 1617

__all__ = ["DatasetError", "mix_seed", "verify_md5", "restricted_loads", "load_digits_split", "load_cifar10", "download_cifar10", "ArrayDataset",
           "ToyDataset", "get_dataset", "get_data_scaler", "get_data_inverse_scaler", "get_toy_target",
           "TOY_DATASETS", "sample_toy", "CIFAR10_URL", "CIFAR10_MD5"]


class DatasetError(RuntimeError):
    """A dataset that is missing, corrupt or cannot be downloaded."""


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): distinct (seed, step) pairs give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h = z ^ (z >> 31)
    return h & 0x7FFFFFFFFFFFFFFF


def _generator(*values: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*values))


# ============================================================================================ digits
def load_digits_split(split: str) -> Tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits: images float32 (N, 1, 8, 8) = pixel / 16 in [0, 1], labels int64 (N,).

    Fixed 90/10 split: ``numpy.random.RandomState(0).permutation(1797)``, the first 1617 indices are ``train``, the
    last 180 ``test``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits
    d = load_digits()
    perm = np.random.RandomState(0).permutation(len(d.images))
    idx = perm[:DIGITS_TRAIN_SIZE] if split == "train" else perm[DIGITS_TRAIN_SIZE:]
    images = torch.from_numpy(d.images[idx].astype(np.float32) / 16.0)[:, None]
    labels = torch.from_numpy(d.target[idx].astype(np.int64))
    return images, labels


# ============================================================================================ CIFAR-10
def _md5(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _missing_message(root: str) -> str:
    return (f"CIFAR-10 not found: expected {os.path.join(root, CIFAR10_FILENAME)} (or the extracted folder "
            f"{os.path.join(root, 'cifar-10-batches-py')}/). Download the official python version from "
            f"{CIFAR10_URL} (md5 {CIFAR10_MD5}) and put it there, or set --config.data.root to the folder that holds "
            f"it, or pass --config.data.download=True on a machine with network access.")


def download_cifar10(root: str, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 60.0) -> str:
    """Download the CIFAR-10 tarball into ``root`` (temporary file, md5 check, then rename); returns its path."""
    os.makedirs(root, exist_ok=True)
    dest = os.path.join(root, CIFAR10_FILENAME)
    with atomic_path(dest, suffix=".part") as tmp:
        try:
            with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
                while True:
                    block = resp.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DatasetError(f"could not download CIFAR-10 from {url} ({e}). " + _missing_message(root)) from e
        got = _md5(tmp)
        if got != md5:
            raise DatasetError(f"downloaded CIFAR-10 from {url} has md5 {got}, expected {md5}: the download is "
                               f"corrupt or truncated; try again. " + _missing_message(root))
    return dest


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, limited to the latin-1 codec."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed in a CIFAR-10 batch")
    return text.encode("latin-1")


def _numpy_global(module: str, name: str):
    import importlib
    return getattr(importlib.import_module(module), name)


#: the only globals a CIFAR-10 batch may reference: numpy's array / scalar reconstruction (under numpy 1's and 2's
#: module names) and the latin-1 encoding of ``bytes`` in protocol-2 pickles; everything else is refused
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler for the official CIFAR-10 batches (dicts of bytes, lists, ints and numpy arrays): any other
    global (a function or class a crafted file could call) raises ``UnpicklingError`` before anything runs."""

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _ALLOWED_GLOBALS:
            try:
                return _numpy_global(module, name)
            except (ImportError, AttributeError):
                raise pickle.UnpicklingError(f"{module}.{name} is not available in this numpy") from None
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def restricted_loads(raw: bytes):
    """``pickle.loads(raw, encoding="bytes")`` admitting only the numpy / builtin types of the official batches."""
    import io
    return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()


_VERIFIED = {}


def verify_md5(path: str, expected: str) -> None:
    """Raise ``DatasetError`` unless the file's md5 is ``expected`` (remembered per path, size and mtime)."""
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, expected)
        if key in _VERIFIED:
            return
        got = _md5(path)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    if got != expected:
        raise DatasetError(f"{path} has md5 {got}, expected {expected}: it is not the official CIFAR-10 python "
                           f"tarball (corrupt or truncated, or another file); delete it and download it again from "
                           f"{CIFAR10_URL}")
    _VERIFIED[key] = True


def _decode_batch(raw: bytes, name: str, source: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        d = restricted_loads(raw)
        if not isinstance(d, dict):
            raise TypeError(f"a batch is a dict, got {type(d).__name__}")
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DatasetError(f"CIFAR-10 batch {name!r} in {source} is corrupt ({type(e).__name__}: {e}); delete the "
                           f"file and download it again from {CIFAR10_URL} (md5 {CIFAR10_MD5})") from e
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetError(f"CIFAR-10 batch {name!r} in {source} has data {data.shape} and labels {labels.shape}; "
                           f"expected (N, 3072) and (N,)")
    return data, labels


def load_cifar10(root: str, split: str = "train", download: bool = False,
                 md5: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """CIFAR-10 from the official ``cifar-10-python.tar.gz`` (read in place) or its extracted folder.

    Returns images uint8 (N, 3, 32, 32) and labels int64 (N,).  ``train`` = data_batch_1..5 (50 000), ``test`` =
    test_batch (10 000).  Missing data -> ``DatasetError`` saying where to put the file; with ``download=True`` the
    tarball is fetched from the official address.  Every tarball, local or downloaded, must have the md5 ``md5``
    (default ``CIFAR10_MD5``, the official file's) before it is opened: a different file -> ``DatasetError``.  The
    batches are unpickled by ``restricted_loads``, which admits only the numpy / builtin types of the official files
    (a crafted pickle cannot run code); a truncated or corrupt tarball or batch -> ``DatasetError``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    names = CIFAR10_TRAIN_BATCHES if split == "train" else CIFAR10_TEST_BATCHES
    tar_path = os.path.join(root, CIFAR10_FILENAME)
    folder = os.path.join(root, "cifar-10-batches-py")
    parts = []
    if not os.path.isfile(tar_path) and os.path.isdir(folder):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise DatasetError(f"CIFAR-10 folder {folder} lacks {name}. " + _missing_message(root))
            with open(path, "rb") as f:
                parts.append(_decode_batch(f.read(), name, path))
    else:
        if not os.path.isfile(tar_path):
            if not download:
                raise DatasetError(_missing_message(root))
            download_cifar10(root, md5=md5 or CIFAR10_MD5)
        verify_md5(tar_path, md5 or CIFAR10_MD5)
        wanted = {f"cifar-10-batches-py/{n}": n for n in names}
        found = {}
        try:
            with tarfile.open(tar_path, "r:gz") as tar:
                for member in tar:
                    if member.name in wanted and member.isfile():
                        found[wanted[member.name]] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DatasetError(f"{tar_path} is corrupt or truncated ({type(e).__name__}: {e}); delete it and download "
                               f"it again from {CIFAR10_URL} (md5 {CIFAR10_MD5})") from e
        missing = [n for n in names if n not in found]
        if missing:
            raise DatasetError(f"{tar_path} lacks {', '.join(missing)}: not the official CIFAR-10 python tarball, or "
                               f"truncated; download it again from {CIFAR10_URL} (md5 {CIFAR10_MD5})")
        parts = [_decode_batch(found[n], n, tar_path) for n in names]
    data = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)


# ============================================================================================ toy data
def _ring(num_components: int = 8, radius: float = 1.0, std: float = 0.1) -> targets.GaussianMixture:
    angles = 2 * math.pi * torch.arange(num_components, dtype=torch.float64) / num_components
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return targets.GaussianMixture(torch.ones(num_components), means, std ** 2)


#: analytic toy targets (exact scores available through ``target.score_fn(sde)``)
TOY_TARGETS = {
    "ring": lambda: _ring(8, 1.0, 0.1),
    "bimodal": lambda: targets.GaussianMixture([0.3, 0.7], [[-1.0], [1.0]], [0.2 ** 2, 0.2 ** 2]),
    "trimodal": lambda: targets.GaussianMixture([0.25, 0.5, 0.25], [[-1.5], [0.0], [1.5]],
                                                [0.15 ** 2, 0.3 ** 2, 0.15 ** 2]),
}


def get_toy_target(name: str) -> Optional[targets.GaussianMixture]:
    """The analytic ``targets.GaussianMixture`` behind a toy dataset, or None (moons, checkerboard)."""
    return TOY_TARGETS[name]() if name in TOY_TARGETS else None


def _moons(n: int, g: torch.Generator, noise: float = 0.05) -> Tensor:
    """Two interleaving half circles (scikit-learn's make_moons), centred and scaled to unit-ish spread."""
    upper = torch.rand(n, generator=g, dtype=torch.float64) < 0.5
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x - 0.5, y - 0.25], dim=1) + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return pts / 0.8


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    """Uniform on the black squares of a 4x4 checkerboard on [-2, 2]^2, scaled by 1/2 (to [-1, 1]^2)."""
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2 = torch.rand(n, generator=g, dtype=torch.float64) - torch.randint(0, 2, (n,), generator=g).double() * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1) / 2


TOY_DATASETS = ("ring", "moons", "checkerboard", "bimodal", "trimodal")


def sample_toy(name: str, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n points (n, D) float32 from a toy distribution (analytic ones through ``targets``)."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy dataset {name!r}; available: {', '.join(TOY_DATASETS)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if name in TOY_TARGETS:
        return get_toy_target(name).sample(n, generator=g).float()
    return (_moons(n, g) if name == "moons" else _checkerboard(n, g)).float()


# ============================================================================================ datasets
class ArrayDataset:
    """A finite in-memory dataset: ``x`` uint8 or float (N, *D), ``y`` int64 (N,).

    ``batch(step, batch_size, seed)`` gives the step's training batch as float32 data-space images, with optional
    horizontal flips and uniform dequantisation; ``iterate(batch_size)`` walks the set once in order (evaluation).
    """

    def __init__(self, x: Tensor, y: Tensor, *, levels: int = 256, random_flip: bool = False,
                 uniform_dequantization: bool = False, name: str = "array"):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs and {y.shape[0]} labels")
        self.x, self.y = x, y
        self.levels = levels          # number of grey levels: 256 for uint8, 17 for digits
        self.random_flip = random_flip
        self.uniform_dequantization = uniform_dequantization
        self.name = name

    def __len__(self):
        return self.x.shape[0]

    @property
    def shape(self):
        return tuple(self.x.shape[1:])

    def _to_float(self, x: Tensor) -> Tensor:
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def indices(self, step: int, batch_size: int, seed: int) -> Tensor:
        n = len(self)
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the dataset size {n}")
        per_epoch = n // batch_size
        epoch, j = divmod(int(step), per_epoch)
        perm = torch.randperm(n, generator=_generator(seed, 0x5EED, epoch))
        return perm[j * batch_size:(j + 1) * batch_size]

    def batch(self, step: int, batch_size: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
        idx = self.indices(step, batch_size, seed)
        x, y = self.x[idx], self.y[idx]
        g = _generator(seed, 0xA06, step)
        if self.uniform_dequantization:
            # (k + u) / levels with u ~ U[0, 1): a continuous density on [0, 1]
            k = x.float() if x.dtype == torch.uint8 else torch.round(x.float() * (self.levels - 1))
            x = (k + torch.rand(x.shape, generator=g)) / self.levels
        else:
            x = self._to_float(x)
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y

    def iterate(self, batch_size: int) -> Iterator[Tuple[Tensor, Tensor]]:
        for i in range(0, len(self), batch_size):
            yield self._to_float(self.x[i:i + batch_size]), self.y[i:i + batch_size]

    def loader(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        """Infinite iterator of training batches from ``start_step`` on."""
        step = int(start_step)
        while True:
            yield self.batch(step, batch_size, seed)
            step += 1


class ToyDataset:
    """An infinite toy distribution; ``batch`` draws fresh points, ``iterate`` a fixed test set of ``num_samples``.
    ``target`` is the analytic ``GaussianMixture`` (or None)."""

    def __init__(self, name: str, dim: int, num_samples: int = 10_000, split: str = "train", split_seed: int = 0):
        self.name = name
        self.target = get_toy_target(name)
        probe = sample_toy(name, 1)
        if probe.shape[1] != dim:
            raise ValueError(f"toy dataset {name!r} is {probe.shape[1]}-D but data.dim = {dim}")
        self.dim = dim
        self.num_samples = int(num_samples)
        self.split = split
        self.split_seed = split_seed

    @property
    def shape(self):
        return (self.dim,)

    def __len__(self):
        return self.num_samples

    def batch(self, step: int, batch_size: int, seed: int = 0) -> Tuple[Tensor, Tensor]:
        x = sample_toy(self.name, batch_size, _generator(seed, 0x70F, step))
        return x, torch.zeros(batch_size, dtype=torch.long)

    def iterate(self, batch_size: int) -> Iterator[Tuple[Tensor, Tensor]]:
        x = sample_toy(self.name, self.num_samples, _generator(self.split_seed, 0x7E57))
        for i in range(0, self.num_samples, batch_size):
            xb = x[i:i + batch_size]
            yield xb, torch.zeros(xb.shape[0], dtype=torch.long)

    def loader(self, batch_size: int, seed: int = 0, start_step: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
        step = int(start_step)
        while True:
            yield self.batch(step, batch_size, seed)
            step += 1


def get_dataset(config, split: str = "train"):
    """The dataset named by ``config.data.dataset`` (``cifar10`` | ``digits`` | ``toy``) for ``split``
    (``train`` | ``test``): an ``ArrayDataset`` or a ``ToyDataset``.  Flips and dequantisation apply to train only."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    d = config.data
    name = d.dataset.lower()
    train = split == "train"
    if name == "cifar10":
        x, y = load_cifar10(d.root, split, download=d.download)
        return ArrayDataset(x, y, levels=256, random_flip=train and d.random_flip,
                            uniform_dequantization=train and d.uniform_dequantization, name="cifar10")
    if name == "digits":
        x, y = load_digits_split(split)
        return ArrayDataset(x, y, levels=17, random_flip=train and d.random_flip,
                            uniform_dequantization=train and d.uniform_dequantization, name="digits")
    if name == "toy":
        return ToyDataset(d.name, int(d.dim), num_samples=config.eval.num_samples, split=split,
                          split_seed=config.eval.seed)
    raise ValueError(f"unknown data.dataset {d.dataset!r}; available: cifar10, digits, toy")


def get_data_scaler(config):
    """Data space -> model space: x -> 2x - 1 for centered image data, identity otherwise (and for toy data)."""
    if config.data.centered and config.data.dataset.lower() != "toy":
        return lambda x: 2.0 * x - 1.0
    return lambda x: x


def get_data_inverse_scaler(config):
    """Model space -> data space (inverse of ``get_data_scaler``)."""
    if config.data.centered and config.data.dataset.lower() != "toy":
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x
