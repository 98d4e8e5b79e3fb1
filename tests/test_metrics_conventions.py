"""Metrics as papers report them: the TF-graph input convention (torch-fidelity / clean-fid's), Inception Score folds
and precision / recall, compared with torch-fidelity 0.4.0 on the same images and the same (random) weights.

torch-fidelity's package ``__init__`` imports its CLIP / VGG / dataset modules, which need torchvision; the modules
compared here do not.  Without torchvision the package is therefore entered without running its ``__init__`` (a
module made from its import spec, holding only its path), its submodules are imported from it as usual, and the
metric modules (``metric_isc``, ``metric_kid``, ``metric_prc``, ``metric_fid``) are executed from their installed
source minus their one ``from torch_fidelity.utils import ...`` statement: that module (file loading, caching, the
torchvision datasets) is the only torchvision user and none of the functions called here touches it.  With
torchvision installed the modules are imported plainly.  ``sys.modules`` is restored afterwards.
"""
import ast
import importlib
import importlib.util
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sde_diffusion import metrics as metrics_lib
from sde_diffusion.evaluation import fid, inception

_SPEC = importlib.util.find_spec("torch_fidelity")
pytestmark = pytest.mark.skipif(_SPEC is None, reason="torch-fidelity is not installed: "
                                                      "pip install --no-deps torch-fidelity==0.4.0")


# ---------------------------------------------------------------------- torch-fidelity without torchvision
def _without_utils_import(name: str) -> types.ModuleType:
    """torch_fidelity.<name> executed from its installed source without ``from torch_fidelity.utils import ...``."""
    path = os.path.join(_SPEC.submodule_search_locations[0], name + ".py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    tree.body = [n for n in tree.body if not (isinstance(n, ast.ImportFrom) and n.module == "torch_fidelity.utils")]
    module = types.ModuleType(f"torch_fidelity.{name}")
    module.__file__ = path
    exec(compile(tree, path, "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def tfid():
    names = ("feature_extractor_inceptionv3", "interpolate_compat_tensorflow", "metric_isc", "metric_kid",
             "metric_prc", "metric_fid")
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "torch_fidelity"}
    plain = importlib.util.find_spec("torchvision") is not None
    try:
        if plain:
            mods = {n: importlib.import_module(f"torch_fidelity.{n}") for n in names}
        else:
            sys.modules["torch_fidelity"] = importlib.util.module_from_spec(_SPEC)    # __init__ not run
            mods = {n: importlib.import_module(f"torch_fidelity.{n}") for n in names[:2]}
            mods.update({n: _without_utils_import(n) for n in names[2:]})
        short = {"feature_extractor_inceptionv3": "inceptionv3", "interpolate_compat_tensorflow": "interpolate"}
        yield types.SimpleNamespace(**{short.get(n, n.replace("metric_", "")): m for n, m in mods.items()})
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] == "torch_fidelity"]:
            del sys.modules[k]
        sys.modules.update(saved)


# ---------------------------------------------------------------------- TF1 bilinear resize
def test_tf1_resize_by_hand():
    """TF1 resize_bilinear(align_corners=False): output o samples the input at o * in/out (no half-pixel offset),
    the upper neighbour clamped at the border.  4 -> 8: out[2j] = in[j], out[2j+1] = (in[j] + in[j+1]) / 2, and the
    last output repeats in[3]; pytorch's half-pixel convention gives 0.75 in[0] + 0.25 in[1] at o = 1 instead."""
    v = torch.tensor([1.0, 2.0, 4.0, 8.0])
    x = v.view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    out = inception.resize_bilinear_tf1(x, (4, 8))[0, 0, 0]
    expected = torch.tensor([1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 8.0])
    assert torch.equal(out, expected)
    torch_half_pixel = F.interpolate(x, size=(4, 8), mode="bilinear", align_corners=False)[0, 0, 0]
    assert torch_half_pixel[1] == pytest.approx(0.75 * 1 + 0.25 * 2) and torch_half_pixel[0] == 1.0
    # downsampling 6 -> 3 picks columns 0, 2, 4 exactly (scale 2, integer source positions)
    y = torch.arange(36.0).view(1, 1, 6, 6)
    assert torch.equal(inception.resize_bilinear_tf1(y, (3, 3)), y[:, :, ::2, ::2])
    # same size: the identity
    z = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(inception.resize_bilinear_tf1(z, (5, 7)), z)


@pytest.mark.parametrize("shape,size", [((2, 3, 32, 32), (299, 299)), ((1, 3, 8, 8), (299, 299)),
                                        ((1, 3, 28, 28), (299, 299)), ((1, 3, 310, 305), (299, 299)),
                                        ((2, 1, 17, 40), (23, 11)), ((1, 3, 299, 299), (299, 299))])
def test_tf1_resize_matches_torch_fidelity_bit_for_bit(tfid, shape, size):
    g = torch.Generator().manual_seed(shape[2] * 1000 + shape[3])
    x = torch.round(torch.rand(shape, generator=g) * 255)           # the 0..255 floats both resize
    ours = inception.resize_bilinear_tf1(x, size)
    theirs = tfid.interpolate.interpolate_bilinear_2d_like_tensorflow1x(x, size=size, align_corners=False,
                                                                         method="slow")
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)


# ---------------------------------------------------------------------- the whole network, random weights
def _calibrate_batch_norm(model, images):
    """Random convolutions with BN running statistics (0, 1) shrink the activations ~10x per block; set every BN's
    statistics to those of one batch instead, so that each layer is O(1) and the features depend on the input."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                        # cumulative average: after one batch, the batch's statistics
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()
    return model


@pytest.fixture(scope="module")
def networks(tfid, tmp_path_factory):
    """Our network (both conventions) and torch-fidelity's FeatureExtractorInceptionV3 holding the same random
    weights, and the features of three test images: two 32x32 RGB (one on the 8-bit grid, one not) and a grey
    28x28 one."""
    torch.manual_seed(0)
    ours = inception.FIDInceptionV3(preprocess="tf")
    _calibrate_batch_norm(ours, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    state = ours.state_dict()
    path = tmp_path_factory.mktemp("tfid") / "weights-inception-2015-12-05-6726825d.pth"
    # the weights mapping: torch-fidelity's module names are torchvision's, as ours (its MaxPool_1/2 and AvgPool
    # hold no tensors), so the map is the identity on names; check that the key sets and shapes agree exactly
    torch.save({k: v.clone() for k, v in state.items()}, path)
    theirs = tfid.inceptionv3.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                          feature_extractor_weights_path=str(path))
    their_state = theirs.state_dict()
    assert set(their_state) == set(state)
    assert all(torch.equal(their_state[k], v) for k, v in state.items())
    pytorch_fid = inception.FIDInceptionV3(preprocess="pytorch_fid")
    pytorch_fid.load_state_dict(state)

    g = torch.Generator().manual_seed(2)
    rgb = torch.rand(2, 3, 32, 32, generator=g)
    rgb[0] = torch.round(rgb[0] * 255) / 255                            # exactly a uint8 image
    grey = torch.rand(1, 1, 28, 28, generator=g)
    out = {"ours": [], "theirs": [], "pytorch_fid": []}
    with torch.no_grad():
        for x in (rgb, grey):
            u8 = torch.round(x * 255).to(torch.uint8).expand(-1, 3, -1, -1)   # what torch-fidelity is fed
            out["ours"].append(ours(x))
            pool3, logits = theirs(u8)
            out["theirs"].append({"pool3": pool3, "logits_unbiased": logits})
            out["pytorch_fid"].append(pytorch_fid(x))
    cat = {k: {key: torch.cat([o[key] for o in v]) for key in ("pool3", "logits_unbiased")} for k, v in out.items()}
    return types.SimpleNamespace(ours=ours, theirs=theirs, features=cat, images=(rgb, grey))


def test_tf_convention_features_equal_torch_fidelity(networks):
    ours, theirs = networks.features["ours"], networks.features["theirs"]
    assert torch.isfinite(ours["pool3"]).all() and ours["pool3"].std(0).mean() > 1e-3 * ours["pool3"].abs().mean()
    for key in ("pool3", "logits_unbiased"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    # uint8 input goes straight through (no rounding twice)
    with torch.no_grad():
        u8 = torch.round(networks.images[0] * 255).to(torch.uint8)
        torch.testing.assert_close(networks.ours(u8)["pool3"], ours["pool3"][:2], rtol=1e-6, atol=1e-7)


def test_the_two_conventions_differ(networks):
    """pytorch-fid's resize and TF's give different pool3 features (|f_tf - f_pt| / |f_pt| seen: 0.32 and 0.33 for
    the 32x32 RGB images, 0.12 for the grey 28x28 one, with these calibrated random weights)."""
    tf, pt = networks.features["ours"]["pool3"], networks.features["pytorch_fid"]["pool3"]
    rel = ((tf - pt).norm(dim=1) / pt.norm(dim=1)).numpy()
    assert (rel > 0.05).all(), rel


def test_load_fid_inception_takes_the_convention(networks, tmp_path):
    path = tmp_path / inception.FID_WEIGHTS_FILENAME
    torch.save(networks.ours.state_dict(), path)
    assert inception.load_fid_inception(str(path), preprocess="tf").preprocess_convention == "tf"
    assert inception.load_fid_inception(str(path)).preprocess_convention == "pytorch_fid"
    with pytest.raises(ValueError, match="preprocess must be one of"):
        inception.FIDInceptionV3(preprocess="clean")


# ---------------------------------------------------------------------- Inception Score folds
def _folds_by_hand(n, splits):
    """Fold boundaries floor(i n / splits) written out."""
    return [(math.floor(i * n / splits), math.floor((i + 1) * n / splits)) for i in range(splits)]


@pytest.mark.parametrize("n,splits", [(103, 10), (100, 10), (37, 4), (11, 3)])
def test_inception_score_folds_match_torch_fidelity(tfid, n, splits):
    rng = np.random.default_rng(n * splits)
    logits = rng.standard_normal((n, 12)) * 3
    for shuffle in (False, True):
        theirs = tfid.isc.isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=shuffle,
                                                 rng_seed=2020)
        mean, std = fid.inception_score(logits, splits, shuffle_seed=2020 if shuffle else None)
        assert mean == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
        assert std == pytest.approx(theirs["inception_score_std"], rel=1e-9, abs=1e-12)
    # the same folds by hand: exp(mean KL(p(y|x) || p_fold(y))) per fold
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = [np.exp(np.mean(np.sum(p[a:b] * (np.log(p[a:b]) - np.log(p[a:b].mean(0))), 1)))
              for a, b in _folds_by_hand(n, splits)]
    mean, std = fid.inception_score(logits, splits)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-9)
    if n % splits:     # torch.tensor_split's folds (the extra rows to the first folds) were another assignment
        early = [(i * (n // splits) + min(i, n % splits), (i + 1) * (n // splits) + min(i + 1, n % splits))
                 for i in range(splits)]
        assert early != _folds_by_hand(n, splits)


# ---------------------------------------------------------------------- KID and FID under torch-fidelity's protocol
def test_kid_and_fid_match_torch_fidelity(tfid):
    rng = np.random.default_rng(7)
    f1, f2 = rng.standard_normal((120, 16)), rng.standard_normal((90, 16)) * 1.2 + 0.3
    theirs = tfid.kid.kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=20,
                                             kid_subset_size=50, verbose=False, rng_seed=2020)
    mean, std = fid.kid(f1, f2, num_subsets=20, subset_size=50, seed=fid.PROTOCOLS["tf"]["kid_seed"])
    assert mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-8)
    s1 = tfid.fid.fid_features_to_statistics(torch.from_numpy(f1))
    s2 = tfid.fid.fid_features_to_statistics(torch.from_numpy(f2))
    theirs_fid = tfid.fid.fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    ours = fid.frechet_distance(*fid.feature_statistics(f1), *fid.feature_statistics(f2))
    assert ours == pytest.approx(theirs_fid, rel=1e-9)


# ---------------------------------------------------------------------- precision / recall
def _precision_recall_brute_force(real, fake, k):
    """Loops over points: radius = k-th smallest distance to the *other* points of the same set."""
    def radii(x):
        return [sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def share_inside(points, centres, r):
        return np.mean([any(np.linalg.norm(p - c) <= rc for c, rc in zip(centres, r)) for p in points])

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.standard_normal((40, 5))
    fake = rng.standard_normal((33, 5)) * 0.7 + 1.0                   # narrower and shifted: P and R in (0, 1)
    p, r = _precision_recall_brute_force(real, fake, k)
    out = metrics_lib.precision_recall(real, fake, k=k, batch_size=7)  # several row blocks
    assert 0 < p < 1 and 0 < r < 1
    assert out["precision"] == pytest.approx(p, abs=1e-12) and out["recall"] == pytest.approx(r, abs=1e-12)
    assert out["f_score"] == pytest.approx(2 * p * r / (p + r))


def test_precision_recall_matches_torch_fidelity(tfid):
    rng = np.random.default_rng(11)
    real = rng.standard_normal((300, 32))
    fake = rng.standard_normal((250, 32)) * 0.8 + 0.1
    ours = metrics_lib.precision_recall(real, fake, k=3)
    # torch-fidelity's convention: features_1 = generated, features_2 = real
    f1, f2 = torch.from_numpy(fake), torch.from_numpy(real)
    theirs = tfid.prc.prc_features_to_metric(f1, f2, prc_neighborhood=3, verbose=False)
    part = tfid.prc.calculate_precision_recall_part(f1, f2, neighborhood=3, batch_size=64)
    # theirs are float32 shares (.float().mean()): 1e-6 still means the same counts (one point is 1/300)
    for key in ("precision", "recall", "f_score"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert (ours["precision"], ours["recall"]) == pytest.approx(part, abs=1e-6)
    assert 0.1 < ours["precision"] < 0.999 and 0.1 < ours["recall"] < 0.999


def test_precision_recall_sanity():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 4))
    same = metrics_lib.precision_recall(x, x.copy())
    assert same["precision"] == same["recall"] == 1.0 and same["f_score"] == pytest.approx(1.0)
    far = metrics_lib.precision_recall(x, x + 100.0)
    assert far["precision"] == far["recall"] == 0.0 and far["f_score"] == 0.0
    # samples from one half of the data: realistic (P = 1) but missing variety (R well below 1)
    half = x[x[:, 0] > 0.3]
    sub = metrics_lib.precision_recall(x, half)
    assert sub["precision"] == 1.0 and sub["recall"] < 0.8
    with pytest.raises(ValueError, match="more than k points"):
        metrics_lib.precision_recall(x[:3], x[:3], k=3)


# ---------------------------------------------------------------------- InceptionMetrics and the eval plan
class _Stub(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.randn(12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def forward(self, x):
        h = torch.tanh(x.double().flatten(1) @ self.w)
        return {"pool3": h, "logits_unbiased": 3 * h[:, :5]}


def test_inception_metrics_with_torch_fidelitys_protocol(tfid):
    """InceptionMetrics.compute with PROTOCOLS["tf"] gives torch-fidelity's KID, IS and precision / recall of the
    same features (IS with 43 samples in 10 folds: uneven folds, shuffled)."""
    g = torch.Generator().manual_seed(0)
    m = fid.InceptionMetrics(None, model=_Stub(), batch_size=16)
    ref = m.reference_statistics(lambda: torch.rand(43, 3, 2, 2, generator=g))
    samples = torch.rand(43, 3, 2, 2, generator=g) * 0.9
    out = m.compute(samples, ref, kid_subsets=10, kid_subset_size=20, is_splits=10, prc_neighborhood=3,
                    **fid.PROTOCOLS["tf"])
    feats = m.features(samples)
    f1, f2 = torch.from_numpy(feats["pool3"]), torch.from_numpy(np.asarray(ref["pool3"], np.float64))
    isc = tfid.isc.isc_features_to_metric(torch.from_numpy(feats["logits_unbiased"]), splits=10, shuffle=True,
                                          rng_seed=2020)
    kid = tfid.kid.kid_features_to_metric(f1, f2, kid_subsets=10, kid_subset_size=20, verbose=False, rng_seed=2020)
    prc = tfid.prc.prc_features_to_metric(f1, f2, prc_neighborhood=3, verbose=False)
    assert out["is_mean"] == pytest.approx(isc["inception_score_mean"], rel=1e-12)
    assert out["kid_mean"] == pytest.approx(kid["kernel_inception_distance_mean"], rel=1e-9)
    assert (out["precision"], out["recall"]) == pytest.approx((prc["precision"], prc["recall"]), abs=1e-6)
    assert out["prc_num_reference"] == 43


def test_eval_plan_records_the_convention():
    from sde_diffusion import configs
    from sde_diffusion.run import evaluate as ev
    c = configs.get_config("vp_digits")
    with c.unlocked():
        c.eval.sample_metrics = "inception"
        c.eval.enable_bpd = False
        c.eval.num_generated = 20
    m = ev._plan(c, list(range(10)))["metrics"]
    assert (m["preprocess"], m["kid_seed"], m["is_shuffle_seed"], m["prc_neighborhood"]) == ("pytorch_fid", 0,
                                                                                             None, 3)
    c.eval.fid_preprocess, c.eval.enable_prc = "tf", False
    m = ev._plan(c, list(range(10)))["metrics"]
    assert (m["preprocess"], m["kid_seed"], m["is_shuffle_seed"], m["prc_neighborhood"]) == ("tf", 2020, 2020, 0)
    c.eval.fid_preprocess = "clean"
    with pytest.raises(ev.EvaluationError, match="fid_preprocess"):
        ev._plan(c, list(range(10)))
    c.eval.fid_preprocess, c.eval.enable_prc, c.eval.num_generated = "tf", True, 3
    with pytest.raises(ev.EvaluationError, match="prc_neighborhood"):
        ev._plan(c, list(range(10)))
