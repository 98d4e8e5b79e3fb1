"""Time-dependent classifiers p(y | x_t, t): trained on a 2-D mixture, compared with the Bayes classifier (the exact
posterior of the diffused mixture) at several t; guidance with the trained classifier samples the chosen class."""
import math

import pytest
import torch

import solvers
from sde_diffusion import classifier as C
from sde_diffusion import sdes, targets
from sde_diffusion.guidance import classifier_score

F64 = torch.float64
MIX = targets.GaussianMixture([1, 1, 1, 1], [[2, 2], [-2, 2], [-2, -2], [2, -2]], 0.25)
SDES = {"vp": lambda: sdes.VPSDE(), "ve": lambda: sdes.VESDE(sigma_min=0.01, sigma_max=50.0)}
_TRAINED = {}


def trained(sde_name):
    """A ToyClassifier trained for 300 steps (cached per SDE for the tests of this file)."""
    if sde_name not in _TRAINED:
        torch.manual_seed(0)
        sde = SDES[sde_name]()
        g = torch.Generator().manual_seed(0)
        x, y = MIX.sample(20000, g, return_labels=True, dtype=torch.float32)
        model = C.ToyClassifier(2, 4, hidden=64, depth=2, emb_dim=32)
        hist = C.train_classifier(model, sde, (x, y), 300, batch_size=256, lr=3e-3, generator=g, log_every=100)
        _TRAINED[sde_name] = (sde, model, hist)
    return _TRAINED[sde_name]


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_toy_classifier_is_near_bayes_optimal_accurate_at_small_t_and_at_chance_at_T(sde_name):
    sde, model, hist = trained(sde_name)
    assert hist["loss"][-1] < hist["loss"][0]
    g = torch.Generator().manual_seed(1)
    n = 8000
    x0, y = MIX.sample(n, g, return_labels=True, dtype=torch.float32)
    posterior = MIX.component_posterior(sde)
    se = 4.5 * math.sqrt(0.25 / n)                                   # worst-case binomial standard error, x 4.5
    for t in (0.01, 0.5, 0.7, sde.T):
        tb = torch.full((n,), t)
        xt = C.perturb(sde, x0, tb, g)
        with torch.no_grad():
            acc = float((C.classifier_logits(model, sde, xt, tb).argmax(1) == y).float().mean())
        bayes = float((posterior(xt.double(), tb.double()).argmax(1) == y).float().mean())
        assert acc > bayes - 0.03, (t, acc, bayes)                   # same noisy inputs: near the best possible
        if t == 0.01:
            assert acc > 0.98, acc
        if t == sde.T:
            assert abs(acc - 0.25) < 0.03 + se, acc                  # chance: the signal is gone at T
    assert C.classifier_accuracy(model, sde, x0, y, 0.01, g) > 0.98


def test_guidance_with_the_trained_classifier_samples_the_chosen_class():
    sde, model, _ = trained("vp")
    k = 3
    score = classifier_score(MIX.score_fn(sde), C.log_p_y_fn(model, sde), k, 1.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x = solvers.sample(sde, score, (1000, 2), "pc", 100, generator=g).samples
    nearest = torch.cdist(x.double(), MIX.means).argmin(1)
    assert float((nearest == k).float().mean()) >= 0.95              # measured 0.976-1.0 over classes and seeds
    assert all(p.grad is None for p in model.parameters())           # guidance left no gradients behind
    # (train_classifier leaves none either)
    assert not x.requires_grad


def test_log_p_y_fn_is_a_normalised_log_probability():
    sde, model, _ = trained("vp")
    x = torch.randn(64, 2)
    t = torch.rand(64)
    fn = C.log_p_y_fn(model, sde)
    logps = torch.stack([fn(x, t, torch.full((64,), k)) for k in range(4)], dim=1)
    torch.testing.assert_close(logps.exp().sum(1), torch.ones(64))


@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32), (1, 8)])
def test_conv_classifier_shapes_time_dependence_and_training_from_batches(in_channels, size):
    torch.manual_seed(0)
    sde = sdes.VPSDE()
    model = C.get_classifier("conv", num_classes=10, in_channels=in_channels, channels=(8, 16), emb_dim=16)
    x = torch.randn(4, in_channels, size, size)
    out0 = C.classifier_logits(model, sde, x, torch.full((4,), 0.1))
    out1 = C.classifier_logits(model, sde, x, torch.full((4,), 0.9))
    assert out0.shape == (4, 10) and not torch.allclose(out0, out1)
    batches = [(torch.randn(8, in_channels, size, size), torch.randint(0, 10, (8,))) for _ in range(2)]
    hist = C.train_classifier(model, sde, batches, num_steps=3, batch_size=8)
    assert hist["step"] == [3] and math.isfinite(hist["loss"][0])
    assert not model.training                                        # left in eval mode


def test_classifier_loss_perturbs_with_the_sdes_transition():
    """perturb draws N(a x0, sigma^2): check its moments on a VE SDE at a fixed t."""
    sde = sdes.VESDE(sigma_min=0.01, sigma_max=50.0)
    x0 = torch.full((20000, 1), 3.0, dtype=F64)
    t = torch.full((20000,), 0.6, dtype=F64)
    xt = C.perturb(sde, x0, t, torch.Generator().manual_seed(0))
    a, s = (float(v) for v in sde.marginal_coeffs(torch.tensor(0.6, dtype=F64)))
    assert abs(float(xt.mean()) - 3.0 * a) < 4.5 * s / math.sqrt(20000)
    assert abs(float(xt.std()) / s - 1) < 4.5 * math.sqrt(0.5 / 20000)
