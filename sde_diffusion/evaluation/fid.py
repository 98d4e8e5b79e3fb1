"""Sample-quality metrics on feature vectors: Fréchet distance (FID), kernel inception distance (KID), Inception Score.

* Fréchet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; Heusel et al. 2017):
      d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}),
  with ``scipy.linalg.sqrtm`` of the (non-symmetric) product.  If the product is singular enough that the square root
  is not finite, eps I is added to both covariances; a numerically complex result is accepted only if the imaginary
  part of its diagonal is negligible, and its real part is used.
* KID (Bińkowski et al. 2018): the unbiased estimator of MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets of both feature sets (mean and std over subsets).
* Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` folds; fold i
  holds rows [i N // splits, (i + 1) N // splits), the assignment of the original code and of torch-fidelity, which
  also shuffles the rows first (``shuffle_seed=2020`` reproduces it).
* Precision / recall (Kynkäänniemi et al. 2019) of the pool3 features: ``sde_diffusion.metrics.precision_recall``.

Feature statistics of a data set (mean and covariance) are cached to ``.npz`` files, written atomically.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np
import scipy.linalg
import torch

from ..atomic import atomic_path

__all__ = ["frechet_distance", "feature_statistics", "kid", "mmd2_unbiased", "polynomial_kernel", "inception_score",
           "save_statistics", "load_statistics", "cached_statistics", "compute_features", "InceptionMetrics",
           "PROTOCOLS"]


# ---------------------------------------------------------------------- Fréchet distance
def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and unbiased covariance (d, d) of features (n, d), in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (n >= 2, d), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2): what is called FID."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not fit: mu {mu1.shape}, {mu2.shape}; sigma {s1.shape}, {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)    # singular products are handled below
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            # singular product: regularise both covariances (as pytorch-fid / the TF reference do)
            offset = eps * np.eye(s1.shape[0])
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"sqrtm(S1 S2) has a significant imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


# ---------------------------------------------------------------------- KID
def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: Optional[float] = None,
                      coef0: float = 1.0) -> np.ndarray:
    """k(x, y) = (gamma x.y + coef0)^degree with gamma = 1/d by default; (n, m)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, **kernel_kw) -> float:
    """Unbiased MMD^2: mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j) - 2 mean_{i, j} k(x_i, y_j)."""
    m, n = x.shape[0], y.shape[0]
    kxx = polynomial_kernel(x, x, **kernel_kw)
    kyy = polynomial_kernel(y, y, **kernel_kw)
    kxy = polynomial_kernel(x, y, **kernel_kw)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kid(features1, features2, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        **kernel_kw) -> Tuple[float, float]:
    """KID: mean and std of the unbiased MMD^2 over ``num_subsets`` random subsets (without replacement within a
    subset) of ``min(subset_size, n1, n2)`` features from each set."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(int(subset_size), f1.shape[0], f2.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.RandomState(seed)
    vals = np.array([mmd2_unbiased(f1[rng.choice(f1.shape[0], m, replace=False)],
                                   f2[rng.choice(f2.shape[0], m, replace=False)], **kernel_kw)
                     for _ in range(int(num_subsets))])
    return float(vals.mean()), float(vals.std())


# ---------------------------------------------------------------------- Inception Score
def inception_score(logits, splits: int = 10, shuffle_seed: Optional[int] = None) -> Tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) with p(y) the marginal within each of ``splits`` folds; mean and std over folds.

    Fold i is rows [i N // splits, (i + 1) N // splits) (so when ``splits`` does not divide N the *later* folds get
    the extra rows): the slicing of the original Inception Score code (openai/improved-gan, ``inception_score.py``)
    and of torch-fidelity's ``isc_features_to_metric``.  ``shuffle_seed``: permute the rows first with
    ``np.random.RandomState(shuffle_seed).permutation(N)``, as torch-fidelity does by default (``samples_shuffle``,
    ``rng_seed=2020``); None keeps the given order, as the original code.  Empty folds (N < splits) are skipped.
    """
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n, splits = lg.shape[0], int(splits)
    if shuffle_seed is not None:
        lg = lg[torch.from_numpy(np.random.RandomState(int(shuffle_seed)).permutation(n))]
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        if part.shape[0] == 0:
            continue
        log_marginal = torch.logsumexp(part, 0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(float(torch.exp(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------- cached statistics
def save_statistics(path: str, mu, sigma, **extra) -> None:
    """Write mu, sigma (and extra arrays) to ``path`` (.npz) atomically: a temp file in the same folder, then rename."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, mu=np.asarray(mu), sigma=np.asarray(sigma), **{k: np.asarray(v) for k, v in extra.items()})


def load_statistics(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def cached_statistics(path: Optional[str], compute_features_fn: Callable[[], np.ndarray]) -> Dict[str, np.ndarray]:
    """Statistics {"mu", "sigma", "num"} loaded from ``path`` if it exists, else computed from
    ``compute_features_fn() -> (n, d)`` and saved there (``path=None``: never cached)."""
    if path and os.path.isfile(path):
        return load_statistics(path)
    feats = np.asarray(compute_features_fn(), dtype=np.float64)
    mu, sigma = feature_statistics(feats)
    stats = {"mu": mu, "sigma": sigma, "num": np.asarray(feats.shape[0])}
    if path:
        save_statistics(path, mu, sigma, num=feats.shape[0])
    return stats


# ---------------------------------------------------------------------- features of image batches
@torch.no_grad()
def compute_features(model: torch.nn.Module, batches: Iterable[torch.Tensor], device="cpu",
                     keys=("pool3", "logits_unbiased")) -> Dict[str, np.ndarray]:
    """Run ``model`` (returning a dict, like ``FIDInceptionV3``) over image batches in [0, 1]; concatenated outputs."""
    out = {k: [] for k in keys}
    for b in batches:
        res = model(torch.as_tensor(b).to(device))
        for k in keys:
            out[k].append(res[k].double().cpu().numpy())
    return {k: np.concatenate(v, 0) for k, v in out.items()}


def _batches(images, batch_size: int):
    images = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    for i in range(0, images.shape[0], batch_size):
        yield images[i:i + batch_size]


#: the protocol details that differ between the two conventions (``FIDInceptionV3``'s ``preprocess``): under ``tf``
#: the whole computation follows torch-fidelity's defaults, so its numbers are torch-fidelity's on the same images
PROTOCOLS = {"pytorch_fid": {"kid_seed": 0, "is_shuffle_seed": None},
             "tf": {"kid_seed": 2020, "is_shuffle_seed": 2020}}


class InceptionMetrics:
    """FID, KID, IS (and precision / recall) of image samples against a reference set, through the FID Inception.

    ``InceptionMetrics(weights_path, device, preprocess=...).reference_statistics(images_fn, cache_path)`` caches the
    reference set's pool3 statistics (and features, for KID) to ``cache_path`` (.npz); ``compute(samples,
    reference)`` returns {"fid", "kid_mean", "kid_std", "is_mean", "is_std"} and, with ``prc_neighborhood=k > 0``,
    {"precision", "recall", "f_score", "prc_num_reference"}.  Images are (N, C, H, W) in [0, 1].
    """

    def __init__(self, weights_path: Optional[str], device="cpu", batch_size: int = 50, model=None,
                 preprocess: str = "pytorch_fid"):
        from .inception import load_fid_inception
        self.model = model if model is not None else load_fid_inception(weights_path, device, preprocess=preprocess)
        self.device = device
        self.batch_size = int(batch_size)

    def features(self, images) -> Dict[str, np.ndarray]:
        return compute_features(self.model, _batches(images, self.batch_size), self.device)

    def reference_statistics(self, images_fn: Callable[[], object], cache_path: Optional[str] = None):
        """{"mu", "sigma", "pool3"} of the reference images; computed once, then read from ``cache_path``."""
        if cache_path and os.path.isfile(cache_path):
            return load_statistics(cache_path)
        feats = self.features(images_fn())["pool3"]
        mu, sigma = feature_statistics(feats)
        if cache_path:
            save_statistics(cache_path, mu, sigma, pool3=feats.astype(np.float32))
        return {"mu": mu, "sigma": sigma, "pool3": feats}

    def compute(self, samples, reference: Dict[str, np.ndarray], kid_subsets: int = 100,
                kid_subset_size: int = 1000, is_splits: int = 10, kid_seed: int = 0,
                is_shuffle_seed: Optional[int] = None, prc_neighborhood: int = 0,
                prc_seed: int = 0) -> Dict[str, float]:
        """The metrics of ``samples`` against ``reference``.  Precision / recall (``prc_neighborhood`` = k > 0) use
        as many reference features as there are samples (a subset drawn with ``np.random.RandomState(prc_seed)``
        when the reference is larger): the metric depends on the set sizes and is meant for equal ones."""
        feats = self.features(samples)
        mu, sigma = feature_statistics(feats["pool3"])
        out = {"fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"])}
        if "pool3" in reference:
            out["kid_mean"], out["kid_std"] = kid(feats["pool3"], reference["pool3"], kid_subsets, kid_subset_size,
                                                  seed=kid_seed)
        out["is_mean"], out["is_std"] = inception_score(feats["logits_unbiased"], is_splits, is_shuffle_seed)
        if prc_neighborhood and "pool3" in reference:
            from ..metrics import precision_recall
            ref = np.asarray(reference["pool3"])
            n = feats["pool3"].shape[0]
            if ref.shape[0] > n:
                ref = ref[np.sort(np.random.RandomState(prc_seed).choice(ref.shape[0], n, replace=False))]
            out.update(precision_recall(ref, feats["pool3"], k=prc_neighborhood))
            out["prc_num_reference"] = int(ref.shape[0])
        return out
