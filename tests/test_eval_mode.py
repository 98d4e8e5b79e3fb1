"""``--mode eval`` (``sde_diffusion.run.evaluate``): what it writes, exact resumption after an interruption, bits/dim
against the exact likelihood, the Inception path with a stand-in network, and bad input.

A tiny vp_digits U-Net is trained once (20 steps, checkpoints at 10 and 20) and copied into a fresh workdir per test;
the digits classifier is trained once and copied into each workdir's ``eval/`` cache.  Interruptions are simulated by
raising from inside a stage after k work units (what a kill at that point leaves on disk: the state written after
each finished unit); the resumed run must do exactly the missing units and end with bit-identical numbers.
"""
import json
import math
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from sde_diffusion import configs, data
from sde_diffusion.evaluation import digits as digits_lib
from sde_diffusion.run import evaluate as ev
from sde_diffusion.run import train as train_lib
from sde_diffusion.run.checkpoints import CheckpointError


def digits_config(**extra):
    over = {"training.n_iters": 20, "training.batch_size": 16, "training.checkpoint_freq": 10,
            "training.log_freq": 10, "training.snapshot_freq": 0, "training.progress": False,
            "training.keep_checkpoints": 5, "model.nf": 8, "model.num_res_blocks": 1, "model.attn_resolutions": (),
            "sampling.num_steps": 8,
            # 10 test digits in batches of 4, 4, 2; 12 samples in batches of 5, 5, 2
            "eval.bpd_num_examples": 10, "eval.bpd_batch_size": 4, "eval.bpd_rtol": 1e-3, "eval.bpd_atol": 1e-3,
            "eval.num_generated": 12, "eval.generate_batch_size": 5, "eval.progress": False}
    over.update(extra)
    return configs.apply_overrides(configs.get_config("vp_digits"), over)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_mode")
    train_lib.train(digits_config(), str(root / "trained"), device="cpu")
    digits_lib.load_or_train_classifier(str(root / "classifier"))
    return root


def fresh_workdir(trained, tmp_path, name="wd"):
    wd = tmp_path / name
    shutil.copytree(trained / "trained" / "checkpoints", wd / "checkpoints")
    shutil.copy(trained / "trained" / "config.json", wd / "config.json")
    (wd / "eval").mkdir()
    shutil.copy(trained / "classifier" / digits_lib.CLASSIFIER_FILENAME, wd / "eval")
    return str(wd)


class Interrupted(Exception):
    pass


class Calls:
    """Counts calls of a module function of ``evaluate``; raises ``Interrupted`` on call ``fail_at`` (1-based)."""

    def __init__(self, monkeypatch, name, fail_at=None):
        self.n, self.fail_at, real = 0, fail_at, getattr(ev, name)

        def wrapper(*args, **kwargs):
            self.n += 1
            if self.fail_at is not None and self.n == self.fail_at:
                raise Interrupted(f"{name} call {self.n}")
            return real(*args, **kwargs)
        monkeypatch.setattr(ev, name, wrapper)


def tb_scalars(wd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(wd, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return ({t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]},
            {t: [e.step for e in acc.Images(t)] for t in acc.Tags()["images"]})


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def check_digits_metrics(saved, images, cache_dir):
    """Recompute the saved digits metrics from the classifier's raw outputs on the saved images, independently of
    ``DigitsEvaluator.metrics``: softmax confidences, the histogram of confident labels, and the Fréchet distance to
    the real test digits written as W2^2 = |dmu|^2 + tr S1 + tr S2 - 2 tr (S2^1/2 S1 S2^1/2)^1/2 (symmetric square
    roots by eigendecomposition, not scipy's sqrtm of the non-symmetric product)."""
    model, _ = digits_lib.load_or_train_classifier(cache_dir)
    x = torch.from_numpy(np.asarray(images, np.float32)).clamp(0, 1)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1).double().numpy()
        feats = model.features(x).double().numpy()
        ref = model.features(data.load_digits_split("test")[0]).double().numpy()
    confident = probs.max(1) >= digits_lib.CONFIDENCE
    counts = np.bincount(probs.argmax(1)[confident], minlength=10)
    assert saved["num"] == len(images)
    assert saved["class_counts"] == counts.tolist()
    assert saved["confident_share"] == pytest.approx(confident.mean(), abs=1e-12)
    assert saved["coverage_classes"] == int((counts > 0).sum())
    assert saved["coverage_fraction"] == pytest.approx((counts > 0).mean(), abs=1e-12)
    mu1, mu2 = feats.mean(0), ref.mean(0)
    s1, s2 = np.cov(feats, rowvar=False), np.cov(ref, rowvar=False)
    r2 = _psd_sqrt(s2)
    w2 = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(r2 @ s1 @ r2))
    assert saved["frechet_distance"] == pytest.approx(w2, rel=1e-6, abs=1e-6)


TAGS = ("eval/test_loss", "eval/bpd", "eval/bpd_stderr", "eval/bpd_nfe", "eval/sample_nfe",
        "eval/digits_frechet_distance", "eval/digits_confident_share", "eval/digits_coverage_classes",
        "eval/digits_floor_frechet_distance", "eval/digits_floor_confident_share",
        "eval/digits_floor_coverage_classes")


# ------------------------------------------------------------------------------------------------ outputs
def test_every_checkpoint_is_evaluated_and_a_second_run_does_nothing(trained, tmp_path, monkeypatch):
    wd = fresh_workdir(trained, tmp_path)
    nll, gen = Calls(monkeypatch, "nll"), Calls(monkeypatch, "generate")
    out = ev.evaluate(digits_config(), wd, device="cpu")
    assert [r["step"] for r in out["results"]] == [10, 20] and out["step"] == 20
    assert (nll.n, gen.n) == (2 * 3, 2 * 3)                  # 3 bpd batches and 3 sample batches per checkpoint

    for r in out["results"]:
        step = r["step"]
        assert read_json(ev.summary_path(wd, step)) == {k: v for k, v in r.items() if k != "path"}
        assert r["num_examples"] == 180 and np.isfinite(r["test_loss"])
        b = r["bpd"]
        assert b["num_examples"] == b["num_evaluations"] == 10 and np.isfinite(b["bpd"]) and b["bpd_stderr"] > 0
        assert b["dequantize"] == "uniform_centered" and b["num_levels"] == 17        # "auto" for 17-level digits
        folder = ev.step_dir(wd, step)
        with np.load(os.path.join(folder, "samples.npz")) as z:
            x = z["samples"]
        assert x.shape == (12, 1, 8, 8) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
        assert os.path.isfile(os.path.join(folder, "samples.png"))
        assert not os.path.exists(os.path.join(folder, "sample_batches"))           # removed once assembled
        assert r["samples"]["nfe"] == 3 * 8                 # 8 ancestral steps, the last landing on x0_hat, 3 batches
        # the metrics are those of the saved samples, next to the floor of 12 real training digits
        m = r["metrics"]
        assert m["kind"] == "digits"
        check_digits_metrics(m["samples"], x, os.path.join(wd, "eval"))
        assert m["floor"]["num"] == 12 and m["floor"]["coverage_classes"] >= 5
        state = read_json(ev.state_path(wd, step))
        assert all(s["done"] and s["tensorboard"] for s in state["stages"].values())
        assert sorted(state["stages"]["bpd"]["units"]) == ["0:0", "0:1", "0:2"]
        assert [state["stages"]["bpd"]["units"][k]["n"] for k in ("0:0", "0:1", "0:2")] == [4, 4, 2]
    scalars, images = tb_scalars(wd)
    for tag in TAGS:
        assert scalars[tag] == [10, 20], tag
    assert images["eval/samples"] == [10, 20]

    # a second run loads no model, computes nothing, writes no new TensorBoard event and returns the same results
    loads, losses = Calls(monkeypatch, "load_model"), Calls(monkeypatch, "test_loss")
    again = ev.evaluate(digits_config(), wd, device="cpu")
    assert (nll.n, gen.n, loads.n, losses.n) == (6, 6, 0, 0)
    assert json.dumps(again, sort_keys=True) == json.dumps(out, sort_keys=True)
    assert tb_scalars(wd) == (scalars, images)

    # changed sampling settings redo the samples and their metrics only
    changed = ev.evaluate(digits_config(**{"eval.num_generated": 7}), wd, checkpoint=20, device="cpu")
    assert (nll.n, gen.n, losses.n) == (6, 6 + 2, 0)
    assert changed["bpd"] == out["bpd"] and changed["metrics"]["samples"]["num"] == 7


# ------------------------------------------------------------------------------------------------ resumption
def test_interrupted_evaluation_resumes_without_redoing_or_double_counting(trained, tmp_path, monkeypatch):
    config = digits_config()
    ref = ev.evaluate(config, fresh_workdir(trained, tmp_path, "ref"), checkpoint=20, device="cpu")

    wd = fresh_workdir(trained, tmp_path, "interrupted")
    Calls(monkeypatch, "nll", fail_at=3)                     # killed while computing the third bpd batch
    with pytest.raises(Interrupted):
        ev.evaluate(config, wd, checkpoint=20, device="cpu")
    state = read_json(ev.state_path(wd, 20))
    assert state["stages"]["loss"]["done"] and not state["stages"]["bpd"]["done"]
    assert sorted(state["stages"]["bpd"]["units"]) == ["0:0", "0:1"]
    assert tb_scalars(wd)[0] == {"eval/test_loss": [20]}
    assert not os.path.exists(ev.summary_path(wd, 20))

    nll, losses = Calls(monkeypatch, "nll"), Calls(monkeypatch, "test_loss")
    gen = Calls(monkeypatch, "generate", fail_at=2)          # ... and again while drawing the second sample batch
    with pytest.raises(Interrupted):
        ev.evaluate(config, wd, checkpoint=20, device="cpu")
    assert (nll.n, losses.n) == (1, 0)                       # only the missing bpd batch; the loss is not redone
    state = read_json(ev.state_path(wd, 20))
    assert state["stages"]["bpd"]["done"] and sorted(state["stages"]["samples"]["batches"]) == ["0"]
    assert os.path.isfile(os.path.join(ev.step_dir(wd, 20), "sample_batches", "batch_000000.npz"))

    nll, gen, losses = Calls(monkeypatch, "nll"), Calls(monkeypatch, "generate"), Calls(monkeypatch, "test_loss")
    out = ev.evaluate(config, wd, checkpoint=20, device="cpu")
    assert (nll.n, gen.n, losses.n) == (0, 2, 0)             # the two missing sample batches, nothing else
    # the numbers of an uninterrupted run, exactly
    assert out["bpd"]["num_evaluations"] == 10
    for key in ("bpd", "bpd_stderr", "nll_nats", "nfe_per_batch"):
        assert out["bpd"][key] == ref["bpd"][key], key
    assert out["test_loss"] == ref["test_loss"] and out["metrics"] == ref["metrics"]
    with np.load(os.path.join(ev.step_dir(wd, 20), "samples.npz")) as a, \
            np.load(os.path.join(os.path.dirname(ref["path"]), "step_00000020", "samples.npz")) as b:
        assert np.array_equal(a["samples"], b["samples"])
    scalars, images = tb_scalars(wd)
    assert all(scalars[tag] == [20] for tag in TAGS) and images["eval/samples"] == [20]   # each written once


# ------------------------------------------------------------------------------------------------ correctness
def test_bits_per_dim_equal_the_exact_likelihood_with_the_exact_score(tmp_path, monkeypatch):
    """toy_2d ring (8 Gaussians, std 0.1, on the unit circle) with the network's score replaced by the exact score
    of the diffused mixture: the probability flow then carries p_eps to p_T exactly, and the stage's bits/dim must
    equal the mean of -log2 p_eps(x) / 2 over the first 48 test points (two batches of 32 and 16), computed in
    closed form.  What separates them: RK45 error at rtol = atol = 1e-6 (~1e-5 nats), float32 score evaluations
    (~1e-6), the N(0, I) prior for p_T (the ring is centred, so only O(alpha(1)^2) ~ 4e-5 nats remain), together
    < 4e-5 bits/dim: the tolerance is 2e-4 bits/dim.  (An ODE started at the solvers' eps = 1e-3 instead of 1e-5
    is off by 2e-3.)  The standard error is checked against the closed-form per-point values too."""
    c = configs.apply_overrides(configs.get_config("toy_2d"), {
        "training.n_iters": 2, "training.checkpoint_freq": 2, "training.batch_size": 8, "training.snapshot_freq": 0,
        "training.progress": False, "eval.num_samples": 200, "eval.bpd_num_examples": 48,
        "eval.bpd_batch_size": 32, "eval.bpd_method": "exact", "eval.bpd_rtol": 1e-6, "eval.bpd_atol": 1e-6,
        "eval.enable_sampling": False, "eval.progress": False})
    wd = str(tmp_path)
    train_lib.train(c, wd, device="cpu")
    target = data.get_toy_target("ring")
    sde = configs.build_sde(c)
    exact_score = target.score_fn(sde)
    monkeypatch.setattr(ev, "get_score_fn", lambda sde, model, train=False, y=None:
                        lambda x, t: exact_score(x.double(), t.double()).to(x.dtype))
    out = ev.evaluate(c, wd, device="cpu")

    x = torch.cat([xb for xb, _ in data.get_dataset(c, "test").iterate(200)])[:48].double()
    eps = c.eval.bpd_eps
    bpd = -target.marginal_log_prob(sde)(x, torch.full((48,), eps, dtype=torch.float64)) / (2 * math.log(2))
    assert out["bpd"]["num_evaluations"] == 48 and out["bpd"]["dequantize"] is None
    assert abs(out["bpd"]["bpd"] - float(bpd.mean())) < 2e-4, (out["bpd"]["bpd"], float(bpd.mean()))   # seen: 5e-7
    assert out["bpd"]["bpd_stderr"] == pytest.approx(float(bpd.std() / math.sqrt(48)), rel=1e-3)


class StandIn(torch.nn.Module):
    """A fixed random feature map with the FID Inception's output keys (pool3 (B, 6), logits_unbiased (B, 4))."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(64, 6, generator=g, dtype=torch.float64)
        self.v = torch.randn(6, 4, generator=g, dtype=torch.float64)
        self.calls = 0

    def forward(self, images):
        self.calls += images.shape[0]
        h = torch.tanh(images.double().flatten(1) @ self.w)
        return {"pool3": h, "logits_unbiased": h @ self.v}


def test_inception_metrics_path_with_a_stand_in_network(trained, tmp_path, monkeypatch):
    """FID against the training split's statistics (cached, computed once), checked with scipy's sqrtm; IS and KID
    recorded; a changed IS setting recomputes the metrics but not the samples nor the reference statistics."""
    wd = fresh_workdir(trained, tmp_path)
    net = StandIn()
    monkeypatch.setattr(ev, "load_fid_inception", lambda path, device: net)
    c = digits_config(**{"eval.sample_metrics": "inception", "eval.enable_bpd": False, "eval.kid_subsets": 5})
    out = ev.evaluate(c, wd, checkpoint=20, device="cpu")
    m = out["metrics"]
    assert m["kind"] == "inception" and m["num"] == 12 and net.calls == 1617 + 12
    assert os.path.isfile(os.path.join(wd, "eval", "inception_digits_train.npz"))

    with np.load(os.path.join(ev.step_dir(wd, 20), "samples.npz")) as z:
        fs = net(torch.from_numpy(z["samples"]))["pool3"].numpy()
    fr = net(data.load_digits_split("train")[0])["pool3"].numpy()
    mu1, mu2, s1, s2 = fs.mean(0), fr.mean(0), np.cov(fs, rowvar=False), np.cov(fr, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert m["fid"] == pytest.approx(fid, rel=1e-6)
    assert 1.0 <= m["is_mean"] <= 4.0 and np.isfinite(m["kid_mean"])          # IS lies in [1, number of classes]
    scalars, _ = tb_scalars(wd)
    assert scalars["eval/fid"] == scalars["eval/inception_score"] == scalars["eval/kid"] == [20]

    gen = Calls(monkeypatch, "generate")
    net.calls = 0
    again = ev.evaluate(digits_config(**{"eval.sample_metrics": "inception", "eval.enable_bpd": False,
                                         "eval.kid_subsets": 5, "eval.is_splits": 2}), wd, checkpoint=20, device="cpu")
    assert gen.n == 0 and net.calls == 12 and again["metrics"]["fid"] == m["fid"]


def test_an_older_runs_config_gets_the_missing_eval_keys_from_the_defaults():
    """A config.json written before the eval keys existed: its own values stay, the rest take the defaults."""
    old = json.loads(digits_config().to_json())
    old["eval"] = {"batch_size": 180, "seed": 7, "num_samples": 10_000, "checkpoint": -1}
    filled = ev._with_eval_defaults(configs.config_from_json(json.dumps(old)))
    default = configs.get_config("vp_digits").eval
    assert set(filled.eval.keys()) == set(default.keys())
    assert (filled.eval.batch_size, filled.eval.seed) == (180, 7)
    assert all(filled.eval[k] == default[k] for k in default.keys() if k not in old["eval"])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_gives_one_clear_error_before_any_work(trained, tmp_path):
    wd = fresh_workdir(trained, tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 999 .*\(steps: 10, 20\)"):
        ev.evaluate(digits_config(), wd, checkpoint=999, device="cpu")
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ev.evaluate(digits_config(), str(tmp_path / "empty"), device="cpu")
    missing = str(tmp_path / "pt_inception.pth")
    with pytest.raises(ev.EvaluationError, match=r"Inception weights not found at .*pt_inception\.pth.*"
                                                 r"--config\.eval\.inception_weights="):
        ev.evaluate(digits_config(**{"eval.sample_metrics": "inception", "eval.inception_weights": missing}), wd,
                    device="cpu")
    with pytest.raises(ev.EvaluationError, match="no Inception weights given"):
        ev.evaluate(digits_config(**{"eval.sample_metrics": "inception"}), wd, device="cpu")
    with pytest.raises(ev.EvaluationError, match=r"eval\.bpd_method = 'simpson' is not one of hutchinson, exact"):
        ev.evaluate(digits_config(**{"eval.bpd_method": "simpson"}), wd, device="cpu")
    with pytest.raises(ev.EvaluationError, match="bpd_dequantize must be 'auto' or 'none'"):
        ev.evaluate(configs.apply_overrides(configs.get_config("toy_2d"), {"eval.bpd_dequantize": "uniform"}), wd,
                    device="cpu")
    assert os.listdir(os.path.join(wd, "eval")) == [digits_lib.CLASSIFIER_FILENAME]       # nothing was written
    assert not os.path.exists(os.path.join(wd, "tensorboard"))
