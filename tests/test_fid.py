"""FID / KID / IS against direct formulas, and the FID Inception's structure with random weights (no download)."""
import itertools
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from sde_diffusion.evaluation import fid, inception


def _random_cov(rng, d, rank=None):
    A = rng.standard_normal((d, rank or d))
    return A @ A.T / d + (0.0 if rank else 0.1) * np.eye(d)


# ---------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_matches_symmetric_sqrtm_reference():
    """tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}: the reference uses the symmetric form, the code the
    non-symmetric product."""
    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
        r1 = scipy.linalg.sqrtm(s1).real
        ref = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real))
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8, abs=1e-10)
        assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-8, abs=1e-10)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 2.0, 6), rng.uniform(0.1, 2.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(1.0 + 1.0)
    # identical Gaussians
    s = _random_cov(rng, 8)
    assert abs(fid.frechet_distance(np.zeros(8), s, np.zeros(8), s)) < 1e-8


def test_frechet_distance_singular_covariances():
    """Rank-deficient covariances (fewer samples than dimensions) still give a finite, non-negative distance that
    agrees with the symmetric reference."""
    rng = np.random.default_rng(2)
    d = 12
    s1, s2 = _random_cov(rng, d, rank=4), _random_cov(rng, d, rank=5)
    mu = np.zeros(d)
    val = fid.frechet_distance(mu, s1, mu, s2)
    w, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(np.clip(w, 0, None))) @ V.T
    w2 = np.linalg.eigvalsh(r1 @ s2 @ r1)
    ref = np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w2, 0, None)))
    assert np.isfinite(val) and val > -1e-6
    assert val == pytest.approx(ref, abs=1e-4)


# ---------------------------------------------------------------------- KID
def _direct_mmd2(x, y):
    d = len(x[0])

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_matches_direct_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.5
    direct = _direct_mmd2(x.tolist(), y.tolist())
    assert fid.mmd2_unbiased(x, y) == pytest.approx(direct, rel=1e-10)
    # one subset holding every point: a permutation, to which MMD^2 is invariant
    mean, std = fid.kid(x, y, num_subsets=1, subset_size=7)
    assert mean == pytest.approx(direct, rel=1e-10) and std == 0.0


def test_kid_is_unbiased_near_zero_for_equal_laws():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    same, same_std = fid.kid(x, y, num_subsets=20, subset_size=200)
    shifted, _ = fid.kid(x, y + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 50 * max(abs(same), same_std)


# ---------------------------------------------------------------------- Inception Score
def test_inception_score_closed_forms():
    C = 10
    # identical predictions: KL = 0, IS = 1
    assert fid.inception_score(np.zeros((50, C)), splits=5)[0] == pytest.approx(1.0)
    # confident, balanced predictions over C classes: IS = C
    logits = 60.0 * np.eye(C)[np.arange(100) % C]
    mean, std = fid.inception_score(logits, splits=2)
    assert mean == pytest.approx(C, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # confident predictions on k of the C classes: IS = k
    logits = 60.0 * np.eye(C)[np.arange(90) % 3]
    assert fid.inception_score(logits, splits=1)[0] == pytest.approx(3.0, rel=1e-6)


# ---------------------------------------------------------------------- cached statistics
def test_statistics_cache_is_written_once_atomically(tmp_path):
    path = str(tmp_path / "sub" / "stats.npz")
    feats = np.random.default_rng(5).standard_normal((30, 4))
    first = fid.cached_statistics(path, lambda: feats)
    assert os.path.isfile(path)
    assert [f for f in os.listdir(tmp_path / "sub")] == ["stats.npz"]          # no temporary left behind

    def must_not_run():
        raise AssertionError("statistics recomputed although cached")

    second = fid.cached_statistics(path, must_not_run)
    np.testing.assert_allclose(second["mu"], feats.mean(0))
    np.testing.assert_allclose(second["sigma"], np.cov(feats, rowvar=False))
    np.testing.assert_allclose(first["sigma"], second["sigma"])
    assert int(second["num"]) == 30


class _StubFeatures(torch.nn.Module):
    """Stands in for the Inception: pool3 = flattened pixels, logits = a fixed projection."""

    def __init__(self):
        super().__init__()
        self.proj = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        f = x.flatten(1).float()
        return {"pool3": f, "logits_unbiased": f @ self.proj}


def test_inception_metrics_plumbing(tmp_path):
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 2, 2, generator=g)
    metrics = fid.InceptionMetrics(None, model=_StubFeatures(), batch_size=16)
    cache = str(tmp_path / "ref.npz")
    ref = metrics.reference_statistics(lambda: real, cache)
    ref_cached = metrics.reference_statistics(lambda: 1 / 0, cache)
    np.testing.assert_allclose(ref["sigma"], ref_cached["sigma"])
    good = metrics.compute(torch.rand(64, 3, 2, 2, generator=g), ref_cached, kid_subsets=5, kid_subset_size=32)
    bad = metrics.compute(torch.rand(64, 3, 2, 2, generator=g) * 0.2, ref_cached, kid_subsets=5, kid_subset_size=32)
    assert set(good) == {"fid", "kid_mean", "kid_std", "is_mean", "is_std"}
    assert bad["fid"] > 5 * good["fid"] and bad["kid_mean"] > good["kid_mean"]


# ---------------------------------------------------------------------- the FID Inception
@pytest.fixture(scope="module")
def random_inception():
    torch.manual_seed(0)
    return inception.FIDInceptionV3()


def test_inception_layout_matches_pytorch_fid_keys(random_inception):
    sd = random_inception.state_dict()
    # torchvision's Inception3(num_classes=1008, aux_logits=False) layout, as pytorch-fid's weights use (the key set,
    # shapes and parameter count were checked once against torchvision 0.29's inception.py)
    assert len([k for k in sd if not k.endswith("num_batches_tracked")]) == 472
    assert tuple(sd["Conv2d_1a_3x3.conv.weight"].shape) == (32, 3, 3, 3)
    assert tuple(sd["Mixed_5b.branch_pool.conv.weight"].shape) == (32, 192, 1, 1)
    assert tuple(sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape) == (192, 192, 1, 7)
    assert tuple(sd["Mixed_7c.branch3x3dbl_3b.bn.running_var"].shape) == (384,)
    assert tuple(sd["fc.weight"].shape) == (1008, 2048)
    assert sum(p.numel() for p in random_inception.parameters()) == 23_850_960
    assert random_inception.Mixed_7b.pool == "avg" and random_inception.Mixed_7c.pool == "max"


def test_inception_shapes_and_determinism(random_inception):
    """Two single-image forwards at 299x299 (about 1 s on a CPU): a grey image and the same image as RGB."""
    grey = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = random_inception(grey)
        again = random_inception(grey.expand(-1, 3, -1, -1).clone())   # grey is repeated to RGB
    assert out["pool3"].shape == (1, inception.FEATURE_DIM)
    assert out["logits"].shape == (1, inception.NUM_CLASSES)
    assert torch.isfinite(out["pool3"]).all() and out["pool3"].abs().max() > 0
    assert torch.equal(out["pool3"], again["pool3"]) and torch.equal(out["logits"], again["logits"])
    torch.testing.assert_close(out["logits"], out["logits_unbiased"] + random_inception.fc.bias)


def test_inception_weights_round_trip(random_inception, tmp_path):
    """A state dict saved without the num_batches_tracked buffers (as in the ported file) loads into the same
    network; a file of other tensors is refused."""
    sd = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / inception.FID_WEIGHTS_FILENAME)
    loaded = inception.load_fid_inception(str(tmp_path))          # a folder holding the file works too
    assert not loaded.training
    loaded_sd = loaded.state_dict()
    assert all(torch.equal(loaded_sd[k], v) for k, v in sd.items())
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        inception.load_fid_inception(str(tmp_path / "wrong.pth"))


def test_missing_inception_weights_error(tmp_path):
    for path in (None, "", str(tmp_path / "nope.pth")):
        with pytest.raises(FileNotFoundError) as err:
            inception.load_fid_inception(path)
        msg = str(err.value)
        assert inception.FID_WEIGHTS_FILENAME in msg and "eval.inception_weights" in msg
        assert "pytorch-fid" in msg
