"""Sample-quality numbers for 8x8 digits that need no download: a small CNN trained on the digits training split.

For a batch of images in [0, 1] (``(N, 1, 8, 8)``, pixel/16 as ``sde_diffusion.data.load_digits_split`` gives them;
values are clamped to [0, 1]):

  (i)   ``confident_share``: share of images the classifier labels with probability >= 0.9;
  (ii)  ``coverage_classes`` / ``coverage_fraction``: how many of the 10 classes occur among the confident labels
        (``class_counts`` is their histogram);
  (iii) ``frechet_distance``: Fréchet distance between Gaussians fitted to the classifier's 64-d penultimate features
        of the images and of the 180 real test digits (the reference; never seen by the classifier or the model).

The floor (``DigitsEvaluator.floor``) is the same numbers for real digits: the training split (what a perfect model of
the training data would produce), drawn at the sample size being compared, since the Fréchet distance of n samples is
biased upwards by O(1/n); with only 180 reference images the floor itself varies by about +-1.5 between draws
(10.5 to 12.9 for three draws of 1000 training digits).  ``test_confident_share`` / ``test_coverage_classes`` add the
numbers for the real test digits (unseen by the classifier).  The classifier is trained once (seeded, 20 epochs, one
thread; a few seconds on a CPU) and cached as ``digits_classifier.pt`` in ``cache_dir`` (atomic write; loaded when
present).

``classify(images) -> probs (N, 10)`` serves per-class accuracy of class-conditional samples.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_path
from .fid import feature_statistics, frechet_distance

Tensor = torch.Tensor

__all__ = ["DigitsClassifier", "DigitsEvaluator", "train_classifier", "load_or_train_classifier", "classify",
           "CLASSIFIER_FILENAME", "NUM_CLASSES", "CONFIDENCE"]

CLASSIFIER_FILENAME = "digits_classifier.pt"
NUM_CLASSES = 10
CONFIDENCE = 0.9
_VERSION = 2          # bump when the architecture or the training recipe changes: cached files are then retrained


@functools.lru_cache(maxsize=2)
def _cached_split(split: str) -> Tuple[Tensor, Tensor]:
    from ..data import load_digits_split
    return load_digits_split(split)


def _load_split(split: str) -> Tuple[Tensor, Tensor]:
    x, y = _cached_split(split)
    return x.clone(), y.clone()


class DigitsClassifier(nn.Module):
    """conv3x3(16) - conv3x3(32) - maxpool - conv3x3(32) - maxpool - fc(64) [features] - fc(10)."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 2 * 2, self.feature_dim)
        self.fc2 = nn.Linear(self.feature_dim, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate layer (N, 64) of images (N, 1, 8, 8) in [0, 1], before its ReLU (no dead coordinates, so the
        Gaussian fitted for the Fréchet distance has a full-rank covariance)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)           # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)           # 2x2
        return self.fc1(h.flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.relu(self.features(x)))


def train_classifier(seed: int = 0, epochs: int = 20, batch_size: int = 64, lr: float = 3e-3,
                     verbose: bool = False) -> Tuple[DigitsClassifier, float]:
    """Train on the digits training split; returns (model in eval mode, test accuracy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)      # a tiny model: threads cost more than they gain, and one thread is reproducible
    try:
        return _train(seed, epochs, batch_size, lr, verbose)
    finally:
        torch.set_num_threads(threads)


def _train(seed, epochs, batch_size, lr, verbose):
    x, y = _load_split("train")
    xt, yt = _load_split("test")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"epoch {epoch}: loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return model, acc


def _atomic_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_or_train_classifier(cache_dir: Optional[str] = None, seed: int = 0,
                             device="cpu") -> Tuple[DigitsClassifier, Dict[str, object]]:
    """The cached classifier from ``cache_dir/digits_classifier.pt`` if present (and of this version), else a newly
    trained one, saved there.  Returns (model, info) with info = {"test_accuracy", "seed", "trained", "path"}."""
    path = os.path.join(cache_dir, CLASSIFIER_FILENAME) if cache_dir else None
    if path and os.path.isfile(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("version") == _VERSION and int(blob.get("seed", -1)) == int(seed):
            model = DigitsClassifier()
            model.load_state_dict(blob["state_dict"])
            info = {"test_accuracy": float(blob["test_accuracy"]), "seed": int(seed), "trained": False, "path": path}
            return model.to(device).eval(), info
    model, acc = train_classifier(seed=seed)
    if path:
        _atomic_save({"version": _VERSION, "seed": int(seed), "test_accuracy": acc,
                      "state_dict": model.state_dict()}, path)
    return model.to(device).eval(), {"test_accuracy": acc, "seed": int(seed), "trained": True, "path": path}


def _as_images(images, device) -> Tensor:
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
        raise ValueError(f"expected digit images (N, 1, 8, 8) in [0, 1], got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.float32).clamp(0.0, 1.0)


class DigitsEvaluator:
    """Classifier-based metrics for digit samples; see the module docstring."""

    def __init__(self, cache_dir: Optional[str] = None, device="cpu", seed: int = 0, confidence: float = CONFIDENCE):
        self.device = device
        self.confidence = float(confidence)
        self.model, self.info = load_or_train_classifier(cache_dir, seed=seed, device=device)
        self.test_images, self.test_labels = _load_split("test")
        self.train_images, self.train_labels = _load_split("train")
        self.reference = feature_statistics(self.features(self.test_images))

    @property
    def test_accuracy(self) -> float:
        return self.info["test_accuracy"]

    @torch.no_grad()
    def classify(self, images, batch_size: int = 1000) -> Tensor:
        """Class probabilities (N, 10) of images (N, 1, 8, 8) in [0, 1]."""
        x = _as_images(images, self.device)
        return torch.cat([torch.softmax(self.model(x[i:i + batch_size]), 1)
                          for i in range(0, x.shape[0], batch_size)]).cpu()

    @torch.no_grad()
    def features(self, images, batch_size: int = 1000) -> np.ndarray:
        """Penultimate features (N, 64) as float64."""
        x = _as_images(images, self.device)
        return torch.cat([self.model.features(x[i:i + batch_size])
                          for i in range(0, x.shape[0], batch_size)]).double().cpu().numpy()

    def metrics(self, images) -> Dict[str, object]:
        """{"confident_share", "coverage_classes", "coverage_fraction", "class_counts", "frechet_distance", "num"}."""
        probs = self.classify(images)
        conf, label = probs.max(1)
        confident = conf >= self.confidence
        counts = torch.bincount(label[confident], minlength=NUM_CLASSES)
        covered = int((counts > 0).sum())
        mu, sigma = feature_statistics(self.features(images))
        return {"confident_share": float(confident.double().mean()), "coverage_classes": covered,
                "coverage_fraction": covered / NUM_CLASSES, "class_counts": counts.tolist(),
                "frechet_distance": frechet_distance(mu, sigma, *self.reference), "num": int(probs.shape[0])}

    def floor(self, num_samples: Optional[int] = None, seed: int = 0) -> Dict[str, object]:
        """``metrics`` of ``num_samples`` real training digits (all 1617 if None or larger; drawn without
        replacement with ``numpy.random.RandomState(seed)``), plus the test digits' confident share and coverage."""
        n = len(self.train_images)
        if num_samples is not None and int(num_samples) < n:
            idx = np.sort(np.random.RandomState(seed).choice(n, int(num_samples), replace=False))
            real = self.train_images[torch.from_numpy(idx)]
        else:
            real = self.train_images
        out = self.metrics(real)
        test = self.metrics(self.test_images)
        out["test_confident_share"] = test["confident_share"]
        out["test_coverage_classes"] = test["coverage_classes"]
        return out


_DEFAULT: Dict[Optional[str], DigitsEvaluator] = {}


def classify(images, cache_dir: Optional[str] = None) -> Tensor:
    """Class probabilities (N, 10) from the (cached) digits classifier; one evaluator is kept per ``cache_dir``."""
    if cache_dir not in _DEFAULT:
        _DEFAULT[cache_dir] = DigitsEvaluator(cache_dir)
    return _DEFAULT[cache_dir].classify(images)
