"""The digits classifier and its sample-quality numbers: accuracy, the real-data floor, and noise far above it."""
import os

import numpy as np
import pytest
import torch

from sde_diffusion.data import load_digits_split
from sde_diffusion.evaluation import digits


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digits_eval"))


@pytest.fixture(scope="module")
def evaluator(cache_dir):
    return digits.DigitsEvaluator(cache_dir)


def test_classifier_accuracy_and_cache(evaluator, cache_dir):
    assert evaluator.info["trained"]
    assert evaluator.test_accuracy >= 0.95
    x, y = load_digits_split("test")
    probs = evaluator.classify(x)
    assert probs.shape == (180, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(180))
    assert float((probs.argmax(1) == y).float().mean()) == pytest.approx(evaluator.test_accuracy)
    # the cached file is loaded, not retrained, and gives the same classifier
    path = os.path.join(cache_dir, digits.CLASSIFIER_FILENAME)
    assert os.path.isfile(path) and [f for f in os.listdir(cache_dir)] == [digits.CLASSIFIER_FILENAME]
    again = digits.DigitsEvaluator(cache_dir)
    assert not again.info["trained"]
    assert torch.equal(again.classify(x), probs)


def test_real_digits_are_near_the_floor_and_noise_is_far(evaluator):
    n = 400
    floor = evaluator.floor(n, seed=0)
    assert floor["num"] == n and floor["coverage_classes"] == 10
    assert floor["confident_share"] >= 0.9 and floor["test_confident_share"] >= 0.9
    assert floor["test_coverage_classes"] == 10

    # other real digits of the same size: the same numbers up to sampling noise
    other = evaluator.floor(n, seed=1)
    assert other["coverage_classes"] == 10 and other["confident_share"] >= 0.9
    assert other["frechet_distance"] < 2 * floor["frechet_distance"]
    test = evaluator.metrics(load_digits_split("test")[0])
    assert test["confident_share"] >= 0.9 and test["coverage_classes"] == 10
    assert abs(test["frechet_distance"]) < 1e-6          # the test digits are the reference

    # uniform noise images: much worse
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    bad = evaluator.metrics(noise)
    assert bad["frechet_distance"] > 10 * floor["frechet_distance"]
    assert bad["confident_share"] < 0.5 * floor["confident_share"]
    # a generator that collapsed onto one class: full confidence, coverage 1, large distance
    x, y = load_digits_split("train")
    ones = x[y == 1][:100]
    collapsed = evaluator.metrics(ones)
    assert collapsed["coverage_classes"] == 1
    assert collapsed["frechet_distance"] > 10 * floor["frechet_distance"]


def test_input_handling(evaluator):
    x = load_digits_split("test")[0][:8]
    # (N, 8, 8) is read as grey images; values are clamped to [0, 1] as when saving images
    torch.testing.assert_close(evaluator.classify(x[:, 0]), evaluator.classify(x))
    torch.testing.assert_close(evaluator.classify(np.asarray(x) * 1.5 - 0.25),
                               evaluator.classify((x * 1.5 - 0.25).clamp(0, 1)))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        evaluator.classify(torch.zeros(2, 3, 8, 8))
