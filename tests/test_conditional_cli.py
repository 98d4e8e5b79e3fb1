"""Controllable generation from the CLI (issue 8): class labels, classifier-free and classifier guidance, the
time-dependent classifier's training mode, inpainting and colourisation, and their errors.

Tiny models trained for a few steps in temporary folders (a 2-D MLP with 3 classes; 8x8 digits U-Nets with 8
channels and ``init_scale = 1`` so that an untrained network already depends on its inputs and labels).  The
mathematics of guidance and inpainting is tested against exact answers in test_guidance.py / test_inpainting.py;
here we check that the CLI wires it: the right label reaches the right sample, w = 1 is the conditional model, the
known pixels are kept exactly, the classifier learns from the SDE's perturbed data and resumes exactly, and every bad
request is one clear error.
"""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import solvers
from sde_diffusion import configs
from sde_diffusion.data import load_digits_split
from sde_diffusion.run import checkpoints as ckpt_lib
from sde_diffusion.run import sampling as sampling_lib
from sde_diffusion.run import train as train_lib
from sde_diffusion.run.classifier_train import ClassifierError, load_classifier, train_classifier
from sde_diffusion.run.sampling import SamplingError, generate, guided_score_fn, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
# every registered sampler, with options that work at 3 steps (pc's reverse-diffusion predictor needs more than 20)
_AT_3_STEPS = {"pc": {"sampling.predictor": "euler_maruyama"}, "ode": {"sampling.solver": "heun"},
               "ddim": {"sampling.eta": 0.0}}
FIXED_STEP = [(m, _AT_3_STEPS.get(m, {})) for m in solvers.available() if solvers.get_sampler(m).kind == "fixed"]
ADAPTIVE = [(m, {}) for m in solvers.available() if solvers.get_sampler(m).kind == "adaptive"]
CONSTRAINED = [(m, o) for m, o in FIXED_STEP if solvers.get_sampler(m).supports_constraint]


def test_the_sampler_list_has_at_least_the_wave_one_samplers():
    assert {"ancestral", "euler_maruyama", "pc", "ode", "ddim"} <= {m for m, _ in CONSTRAINED}
    assert "rk45" in {m for m, _ in ADAPTIVE}


def run_cli(*args, check=True):
    cmd = [sys.executable, MAIN, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def _cfg(name, **over):
    base = {"training.snapshot_freq": 0, "training.progress": False, "training.log_freq": 5,
            "training.keep_checkpoints": 1, "optim.warmup": 0}
    base.update(over)
    return configs.apply_overrides(configs.get_config(name), base)


def toy_cond_config(**over):
    return _cfg("toy_2d", **dict({"model.num_classes": 3, "training.p_uncond": 0.2, "training.n_iters": 5,
                                  "training.checkpoint_freq": 5, "training.batch_size": 16, "model.init_scale": 1.0,
                                  "sampling.num_samples": 6, "sampling.batch_size": 6, "sampling.num_steps": 4,
                                  "sampling.method": "ancestral"}, **over))


def tiny_digits_config(num_classes=0, **over):
    return _cfg("vp_digits", **dict({"model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1,
                                     "model.attn_resolutions": (), "model.init_scale": 1.0,
                                     "model.num_classes": num_classes, "training.p_uncond": 0.2 if num_classes else 0.0,
                                     "training.n_iters": 3, "training.checkpoint_freq": 3, "training.batch_size": 8,
                                     "sampling.num_samples": 4, "sampling.batch_size": 4, "sampling.num_steps": 3},
                                    **over))


CLS_OVERRIDES = {"classifier.channels": (8, 16), "classifier.emb_dim": 16, "classifier.batch_size": 64,
                 "classifier.checkpoint_freq": 10, "classifier.keep_checkpoints": 5, "classifier.progress": False,
                 "classifier.eval_times": (0.01, 1.0)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained tiny runs: toy conditional, toy unconditional, digits unconditional / conditional."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for key, config in [("toy_cond", toy_cond_config()),
                        ("toy", toy_cond_config(**{"model.num_classes": 0, "training.p_uncond": 0.0})),
                        ("digits", tiny_digits_config()), ("digits_cond", tiny_digits_config(num_classes=10))]:
        out[key] = str(root / key)
        train_lib.train(config, out[key], device="cpu")
    return out


def load(wd):
    return ckpt_lib.load_model(wd)


def with_sampling(config, **over):
    """A copy of ``config`` with ``sampling.<k> = v`` (the original is left as it is)."""
    return configs.apply_overrides(configs.config_from_json(config.to_json()),
                                   {f"sampling.{k}": v for k, v in over.items()})


# ------------------------------------------------------------------------------------------------ labels and CFG
def test_cycled_labels_reach_the_right_samples(runs):
    """class_label = -1 gives labels 0,1,2,0,1,2 and sample i is exactly what label i mod 3 alone gives from the same
    prior draw (probability-flow ODE, deterministic), and not what another label gives."""
    config, sde, model = load(runs["toy_cond"])
    config = with_sampling(config, method="ode", solver="euler", guidance="cfg", guidance_scale=2.0)
    cyc = generate(with_sampling(config, class_label=-1), sde, model)
    assert cyc["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    for c in range(3):
        fixed = generate(with_sampling(config, class_label=c), sde, model)
        assert fixed["labels"].tolist() == [c] * 6
        mine = cyc["labels"] == c
        torch.testing.assert_close(cyc["samples"][mine], fixed["samples"][mine], rtol=0, atol=1e-5)
        assert (cyc["samples"][~mine] - fixed["samples"][~mine]).norm(dim=1).min() > 1e-3


def test_cfg_w1_is_the_conditional_model_and_w0_the_unconditional(runs):
    """Same seed, stochastic ancestral sampler: CFG with w = 1 draws the samples of the plain conditional score
    (guidance none) and w = 0 those of the null label, up to float32 rounding of s_u + w (s_c - s_u) (1e-4)."""
    config, sde, model = load(runs["toy_cond"])
    cond = generate(with_sampling(config, guidance="none", class_label=1), sde, model)["samples"]
    null = generate(with_sampling(config, guidance="none", class_label=3), sde, model)["samples"]
    w1 = generate(with_sampling(config, guidance="cfg", guidance_scale=1.0, class_label=1), sde, model)["samples"]
    w0 = generate(with_sampling(config, guidance="cfg", guidance_scale=0.0, class_label=1), sde, model)["samples"]
    w3 = generate(with_sampling(config, guidance="cfg", guidance_scale=3.0, class_label=1), sde, model)["samples"]
    torch.testing.assert_close(w1, cond, rtol=0, atol=1e-4)
    torch.testing.assert_close(w0, null, rtol=0, atol=1e-4)
    assert (cond - null).abs().max() > 1e-2 and (w3 - cond).abs().max() > 1e-2


def test_cfg_score_is_the_extrapolation_of_the_two_scores(runs):
    from sde_diffusion.networks import get_score_fn
    config, sde, model = load(runs["toy_cond"])
    x, t, y = torch.randn(5, 2), torch.full((5,), 0.4), torch.tensor([0, 1, 2, 1, 0])
    s_c = get_score_fn(sde, model, y=y)(x, t)
    s_u = get_score_fn(sde, model, y=None)(x, t)
    got = guided_score_fn(with_sampling(config, guidance="cfg", guidance_scale=2.5), sde, model, y)(x, t)
    torch.testing.assert_close(got, s_u + 2.5 * (s_c - s_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,opts", FIXED_STEP + ADAPTIVE)
def test_cfg_with_every_sampler(runs, method, opts):
    config, sde, model = load(runs["toy_cond"])
    config = configs.apply_overrides(with_sampling(config, method=method, guidance="cfg", guidance_scale=2.0,
                                                   num_steps=3), opts)
    out = generate(config, sde, model)
    assert out["samples"].shape == (6, 2) and torch.isfinite(out["samples"]).all()
    assert out["labels"].tolist() == [0, 1, 2, 0, 1, 2]


# ------------------------------------------------------------------------------------------------ classifier
def _train_digits_classifier(wd, n_iters, **over):
    c = configs.apply_overrides(configs.get_config("digits_classifier"),
                                dict(CLS_OVERRIDES, **{"classifier.n_iters": n_iters}, **over))
    return train_classifier(c, wd, device="cpu")


def test_classifier_learns_from_perturbed_data_and_resumes_exactly(tmp_path):
    """150 updates of a (16, 32)-channel classifier: accuracy on the 180 test digits at t = 0.01 far above chance
    (> 0.5; measured 0.75 and 0.85 for two seeds; chance 0.1) and at t = 1, where a(1) = 0.007 leaves no signal, at
    chance (< 0.25: 0.1 + 6 binomial standard errors).  20 updates interrupted at the step-10 checkpoint and resumed
    give the uninterrupted weights bit for bit."""
    out = _train_digits_classifier(str(tmp_path / "long"), 150, **{"classifier.channels": (16, 32)})
    acc = out["eval"]["accuracy"]
    assert acc["0.01"] > 0.5 and acc["1"] < 0.25, acc
    assert json.load(open(tmp_path / "long" / "eval.json"))["accuracy"] == acc

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _train_digits_classifier(a, 20)
    _train_digits_classifier(b, 10)
    _train_digits_classifier(b, 20)             # resumes from the step-10 checkpoint
    assert [s for s, _ in ckpt_lib.list_checkpoints(b)] == [10, 20]
    sa, sb = (torch.load(ckpt_lib.resolve_checkpoint(w, 20), weights_only=True) for w in (a, b))
    for k in sa["classifier"]:
        assert torch.equal(sa["classifier"][k], sb["classifier"][k]), k
    _, _, model = load_classifier(a)
    assert model.checkpoint_step == 20 and not any(p.requires_grad for p in model.parameters())


def test_classifier_guidance_adds_the_gradient_of_log_p(runs, tmp_path):
    """On the unconditional digits model: the guided score minus the plain score is scale * grad_x log p(y | x, t),
    checked against central finite differences of log p along random directions; scale 0 samples = unguided ones."""
    from sde_diffusion.classifier import log_p_y_fn
    from sde_diffusion.networks import get_score_fn
    cwd = str(tmp_path / "cls")
    _train_digits_classifier(cwd, 10)
    config, sde, model = load(runs["digits"])
    config = with_sampling(config, guidance="classifier", classifier_workdir=cwd, guidance_scale=3.0, class_label=7)
    csde, cmodel = sampling_lib.load_guidance_classifier(config, sde)
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 0.3), torch.tensor([7, 7])
    diff = guided_score_fn(config, sde, model, y, (csde, cmodel))(x, t) - get_score_fn(sde, model)(x, t)
    logp = log_p_y_fn(copy.deepcopy(cmodel).double(), csde)          # finite differences in float64
    x64, t64, g = x.double(), t.double(), torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        h = 1e-5
        fd = (logp(x64 + h * v, t64, y) - logp(x64 - h * v, t64, y)) / (2 * h)
        # float32 guidance vs float64 differences: agreement to ~1e-6 relative; 1e-3 leaves room
        torch.testing.assert_close((diff.double() * v).sum(dim=(1, 2, 3)), 3.0 * fd, rtol=1e-3, atol=1e-3)
    plain = generate(with_sampling(config, guidance="none", class_label=-1), sde, model)["samples"]
    zero = generate(with_sampling(config, guidance_scale=0.0), sde, model, classifier=None)
    assert zero["labels"].tolist() == [7] * 4
    torch.testing.assert_close(zero["samples"], plain, rtol=0, atol=1e-6)
    guided = generate(config, sde, model)["samples"]
    assert (guided - plain).abs().max() > 1e-3


def test_classifier_guidance_errors(runs, tmp_path):
    config, sde, model = load(runs["digits"])
    c = with_sampling(config, guidance="classifier")
    with pytest.raises(SamplingError, match="needs sampling.classifier_workdir"):
        generate(c, sde, model)
    with pytest.raises(ClassifierError, match="does not exist"):
        generate(with_sampling(c, classifier_workdir=str(tmp_path / "nope")), sde, model)
    with pytest.raises(ClassifierError, match="not a classifier checkpoint"):
        generate(with_sampling(c, classifier_workdir=runs["digits_cond"]), sde, model)
    other = str(tmp_path / "beta10")
    _train_digits_classifier(other, 2, **{"model.beta_max": 10.0})
    with pytest.raises(SamplingError, match="trained on the VPSDE.*score model diffuses"):
        generate(with_sampling(c, classifier_workdir=other), sde, model)


# ------------------------------------------------------------------------------------------------ inpainting
@pytest.mark.parametrize("method,opts", CONSTRAINED)
def test_inpainting_keeps_known_pixels_exactly_with_every_sampler(runs, method, opts):
    config, sde, model = load(runs["digits"])
    config = configs.apply_overrides(with_sampling(config, method=method, task="inpaint", dataset_index=5,
                                                   mask="right_half"), opts)
    out = generate(config, sde, model)
    digit = load_digits_split("test")[0][5]
    assert torch.equal(out["original"][0], digit)
    known = torch.zeros(1, 8, 8, dtype=torch.bool)
    known[..., :4] = True
    x = out["samples"]
    assert x.shape == (4, 1, 8, 8)
    assert torch.equal(x[:, known], digit[known].expand(4, -1))           # bit-exact known pixels
    assert (x[:, ~known] - digit[~known]).abs().max() > 1e-3                # the rest is generated
    assert torch.equal(out["mask"][0], (~known).float())
    assert torch.equal(out["masked"][0][~known], torch.full((32,), 0.5))


class MirrorGaussian(torch.nn.Module):
    """A stand-in "network" with the exact score of Gaussian 8x8 images in model space: pixel (r, c) and its mirror
    (r, 7 - c) have variance v and correlation rho, all pairs independent.  Under the VP SDE each pair is
    N(0, a^2 C + sigma^2 I) with C = v [[1, rho], [rho, 1]]; the output is the noise prediction -sigma * score."""
    parameterization, num_classes = "noise", 0

    def __init__(self, sde, v, rho):
        super().__init__()
        self.sde, self.v, self.rho = sde, v, rho

    def forward(self, x, t, y=None):
        a, s = (u.to(x.dtype)[:, None, None, None] for u in self.sde.marginal_coeffs(t))
        left, right = x[..., :4], x[..., 4:].flip(-1)
        c11, c12 = a ** 2 * self.v + s ** 2, a ** 2 * self.v * self.rho
        det = c11 ** 2 - c12 ** 2
        s_left, s_right = -(c11 * left - c12 * right) / det, -(c11 * right - c12 * left) / det
        return -s * torch.cat([s_left, s_right.flip(-1)], dim=-1)


def test_inpainting_conditions_on_the_known_half():
    """Exact Gaussian score, left half known (model-space values +-0.3): the exact conditional of each right pixel is
    N(rho * mirror, v (1 - rho^2)) = N(0.9 * mirror, 0.138^2).  The regression slope of the completions' mean on the
    known mirror pixels is 0.78 as measured with 200 samples (standard error about 0.003): the isotropic Tweedie
    covariance (data variance 0.5 where the truth is 0.1) biases it below 0.9; replacement alone gives 0.60 and no
    conditioning 0.  So 0.7 < slope < 0.95 checks that the known pixels drive the completion through both the
    replacement and the conditional score, with the mask the right way round."""
    config = tiny_digits_config()
    sde = configs.build_sde(config)
    model = MirrorGaussian(sde, v=0.1, rho=0.9)
    g = torch.Generator().manual_seed(3)
    left = torch.where(torch.rand(8, 4, generator=g) < 0.5, -0.3, 0.3)
    image = torch.full((1, 8, 8), 0.5)
    image[0, :, :4] = (left + 1) / 2
    c = with_sampling(config, task="inpaint", mask="right_half", method="ancestral", num_steps=100,
                      num_samples=200, batch_size=200)
    out = generate(c, sde, model, condition={"image": image, "label": None, "source": "test"})
    assert torch.equal(out["samples"][:, 0, :, :4], image[0, :, :4].expand(200, -1, -1))
    x = out["samples"][:, 0] * 2 - 1
    mean = x[:, :, 4:].flip(-1).mean(0)
    slope = float((mean * left).sum() / (left ** 2).sum())
    assert 0.7 < slope < 0.95, slope
    assert 0.1 < float(x[:, :, 4:].std(0).mean()) < 0.2          # conditional std 0.138 (measured 0.13)
    # with sampling.inpaint_data_var at the true data variance the slope moves towards the exact 0.9 (measured 0.86)
    c_true = with_sampling(c, inpaint_data_var=0.1)
    x_true = generate(c_true, sde, model, condition={"image": image, "label": None, "source": "test"})["samples"]
    mean_true = (x_true[:, 0] * 2 - 1)[:, :, 4:].flip(-1).mean(0)
    slope_true = float((mean_true * left).sum() / (left ** 2).sum())
    assert slope + 0.03 < slope_true < 0.95, (slope, slope_true)


class IsotropicGaussian(torch.nn.Module):
    """Stand-in network with the exact score of N(0, v I) data in model space (noise prediction -sigma * score)."""
    parameterization, num_classes = "noise", 0

    def __init__(self, sde, v):
        super().__init__()
        self.sde, self.v = sde, v

    def forward(self, x, t, y=None):
        a, s = (u.to(x.dtype)[:, None, None, None] for u in self.sde.marginal_coeffs(t))
        return s * x / (a ** 2 * self.v + s ** 2)


def test_colourisation_keeps_the_grey_image_and_samples_the_colour_law(tmp_path):
    """8x8 colour images, exact score of N(0, v I) with v = 0.02 in model space, an RGB image file as input.  The
    grey level (channel mean) of every colourisation equals the input's to float rounding, and the two colour
    coordinates (rows 2, 3 of the orthogonal grey basis) are independent of the grey one, so their exact conditional
    law is N(0, v).  Indeed they come out exactly as in unconditional sampling from the same prior draw (the
    conditioning touches the grey coordinate only), and their std is within 3 % of sqrt(v) = 0.141 (measured 0.1442:
    sampling error 0.4 % for 200 x 64 x 2 values, and the 50-step Heun discretisation, 0.1416 with 200 steps; the
    ancestral sampler would need far more steps: with 100 it draws std 0.118 for this narrow Gaussian even without
    conditioning).  The grid has rows of [original, grey input, 8 colourisations]."""
    from PIL import Image
    from sde_diffusion.inpainting import grey_basis
    config = configs.apply_overrides(configs.get_config("vp_cifar"), {"data.image_size": 8})
    sde = configs.build_sde(config)
    rgb = (np.random.RandomState(0).uniform(0.35, 0.65, (8, 8, 3)) * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    c = with_sampling(config, task="colorize", image=str(tmp_path / "rgb.png"), method="ode", solver="heun",
                      num_steps=50, num_samples=200, batch_size=200)
    out = generate(c, sde, IsotropicGaussian(sde, 0.02))
    x = out["samples"]
    assert x.shape == (200, 3, 8, 8) and 0 < x.min() and x.max() < 1                # nothing clamped
    grey = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1).mean(0)
    torch.testing.assert_close(x.mean(1), grey.expand(200, -1, -1), rtol=0, atol=2e-6)
    colour = torch.einsum("ij,bjhw->bihw", grey_basis(torch.float32), 2 * x - 1)[:, 1:]
    free = generate(with_sampling(c, task="generate"), sde, IsotropicGaussian(sde, 0.02))["samples"]
    free_colour = torch.einsum("ij,bjhw->bihw", grey_basis(torch.float32), 2 * free - 1)[:, 1:]
    torch.testing.assert_close(colour, free_colour, rtol=0, atol=1e-5)
    assert abs(float(colour.std()) / 0.02 ** 0.5 - 1) < 0.03, float(colour.std())
    assert abs(float(colour.mean())) < 0.01
    torch.testing.assert_close(out["masked"][0], grey.expand(3, -1, -1))
    save = sampling_lib.save_samples(c, out, str(tmp_path / "out"))
    assert Image.open(save["png"]).size == (16 * (10 * 9 + 1), 16 * (25 * 9 + 1))


def test_inpainting_from_image_and_mask_files(runs, tmp_path):
    from PIL import Image
    config, sde, model = load(runs["digits"])
    digit = load_digits_split("test")[0][3, 0]
    img = tmp_path / "digit.png"
    Image.fromarray((digit.numpy() * 255).round().astype(np.uint8)).save(img)
    mask = np.zeros((8, 8), np.float32)
    mask[::2] = 1                                                            # fill in every other row
    np.save(tmp_path / "rows.npy", mask)
    out = generate(with_sampling(config, task="inpaint", image=str(img), mask=str(tmp_path / "rows.npy")),
                   sde, model)
    expect = torch.from_numpy(np.asarray(Image.open(img), np.float32) / 255.0)
    assert torch.equal(out["samples"][:, 0, 1::2], expect[1::2].expand(4, -1, -1))


def test_cli_inpaint_and_cfg_outputs(runs):
    """Through main.py: an inpainting grid of [original, masked, 8 completions] per row, and CFG for one class."""
    from PIL import Image
    wd = runs["digits_cond"]
    proc = run_cli("--mode", "sample", "--workdir", wd, "--config.sampling.task=inpaint",
                   "--config.sampling.dataset_index=5", "--config.sampling.mask=right_half",
                   "--config.sampling.num_samples=10", "--config.sampling.batch_size=10")
    folder = os.path.join(wd, "samples", "step_00000003_inpaint_idx5_right_half")
    assert os.path.join(folder, "samples.npz") in proc.stdout
    z = np.load(os.path.join(folder, "samples.npz"))
    assert z["samples"].shape == (10, 1, 8, 8) and z["original"].shape == (1, 1, 8, 8) and "labels" not in z
    # 2 rows of 10 tiles of 8x8 pixels with 1-pixel borders, enlarged 16x
    assert Image.open(os.path.join(folder, "samples.png")).size == (16 * (10 * 9 + 1), 16 * (2 * 9 + 1))
    info = json.load(open(os.path.join(folder, "sampling_config.json")))
    assert info["source"] == "digits test image 5" and info["source_label"] == int(load_digits_split("test")[1][5])

    wd = runs["toy_cond"]
    run_cli("--mode", "sample", "--workdir", wd, "--config.sampling.class_label=1", "--config.sampling.guidance=cfg",
            "--config.sampling.guidance_scale=2")
    z = np.load(os.path.join(wd, "samples", "step_00000005_cfg_w2_y1", "samples.npz"))
    assert z["labels"].tolist() == [1] * 6 and z["samples"].shape == (6, 2)


def test_cli_train_classifier_guided_sampling_and_errors(runs, tmp_path):
    cwd = str(tmp_path / "cls")
    over = [f"--config.{k}={v}" for k, v in dict(CLS_OVERRIDES, **{"classifier.n_iters": 10}).items()]
    proc = run_cli("--mode", "train_classifier", "--config", "digits_classifier", "--workdir", cwd, *over)
    assert "test accuracy of p(y | x_t, t): t=0.01:" in proc.stdout
    assert os.path.isfile(os.path.join(cwd, "checkpoints", "ckpt_00000010.pt"))
    # classifier guidance on the unconditional digits model; labels cycle over the classifier's 10 classes
    out = str(tmp_path / "guided")
    run_cli("--mode", "sample", "--workdir", runs["digits"], "--config.sampling.guidance=classifier",
            f"--config.sampling.classifier_workdir={cwd}", "--config.sampling.guidance_scale=2",
            "--config.sampling.num_samples=12", "--config.sampling.batch_size=12", "--out_dir", out)
    z = np.load(os.path.join(out, "samples.npz"))
    assert z["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1] and z["samples"].shape == (12, 1, 8, 8)
    assert os.path.isfile(os.path.join(out, "class_accuracy.json"))
    proc = run_cli("--mode", "sample", "--workdir", runs["digits"], "--config.sampling.guidance=classifier",
                   f"--config.sampling.classifier_workdir={cwd}", "--config.sampling.class_label=12", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "class_label=12 is out of range: the classifier has 10 classes" in proc.stderr


class StubDigitsEvaluator:
    """Stands in for the digits classifier: reads each sample's label from pixel (0, 0) and answers it for samples
    0-9, 20-29, ... and label + 1 for samples 10-19, 30-39, ...: right on exactly half of every class."""
    test_accuracy = 1.0

    def __init__(self, cache_dir=None):
        pass

    def classify(self, x):
        lab = (x[:, 0, 0, 0] * 10).round().long()
        wrong = (torch.arange(x.shape[0]) // 10) % 2 == 1
        return torch.nn.functional.one_hot(torch.where(wrong, (lab + 1) % 10, lab), 10).float()


def test_class_accuracy_is_the_share_labelled_as_requested(monkeypatch, runs):
    import sde_diffusion.evaluation.digits as digits_eval
    monkeypatch.setattr(digits_eval, "DigitsEvaluator", StubDigitsEvaluator)
    labels = torch.arange(40) % 10
    x = torch.zeros(40, 1, 8, 8)
    x[:, 0, 0, 0] = labels.float() / 10
    acc = sampling_lib.digits_class_accuracy(x, labels)
    assert acc["per_class"] == {c: 0.5 for c in range(10)} and acc["overall"] == 0.5
    assert acc["counts"] == {c: 4 for c in range(10)}
    # sample() writes it for labelled digits
    config = with_sampling(ckpt_lib.load_model(runs["digits_cond"])[0], guidance="cfg", guidance_scale=2.0,
                           class_label=4)
    res = sample(config, runs["digits_cond"], device="cpu")
    assert res["npz"].endswith(os.path.join("step_00000003_cfg_w2_y4", "samples.npz"))
    saved = json.load(open(os.path.join(os.path.dirname(res["npz"]), "class_accuracy.json")))
    assert list(saved["per_class"]) == ["4"] and saved["counts"] == {"4": 4}


# ------------------------------------------------------------------------------------------------ errors
def test_bad_requests_are_clear_errors(runs, tmp_path):
    toy, sde_t, m_t = load(runs["toy"])
    cond, sde_c, m_c = load(runs["toy_cond"])
    dig, sde_d, m_d = load(runs["digits"])

    def fails(config, sde, model, pattern):
        with pytest.raises(SamplingError, match=pattern):
            generate(config, sde, model)
    fails(with_sampling(toy, guidance="cfg"), sde_t, m_t, "needs a class-conditional model")
    fails(with_sampling(toy, class_label=2), sde_t, m_t, "class_label=2 needs a class-conditional model")
    fails(with_sampling(cond, class_label=5), sde_c, m_c, r"out of range: the model has 3 classes")
    fails(with_sampling(cond, class_label=3, guidance="cfg"), sde_c, m_c, "null label, allowed only with")
    fails(with_sampling(cond, class_label=-2), sde_c, m_c, "must be -1")
    fails(with_sampling(cond, guidance="cfg", guidance_scale=-1.0), sde_c, m_c, "guidance_scale must be")
    fails(with_sampling(cond, guidance="clf"), sde_c, m_c, "unknown sampling.guidance 'clf'")
    fails(with_sampling(cond, task="paint"), sde_c, m_c, "unknown sampling.task 'paint'")
    fails(with_sampling(toy, task="inpaint", dataset_index=0), sde_t, m_t, "needs image data")
    fails(with_sampling(dig, task="colorize", dataset_index=0), sde_d, m_d, "3-channel.*digits are greyscale")
    fails(with_sampling(dig, task="inpaint"), sde_d, m_d, "needs an image")
    fails(with_sampling(dig, task="inpaint", dataset_index=180), sde_d, m_d, "180 is out of range.*180 images")
    np.save(tmp_path / "img.npy", np.zeros((4, 4), np.float32))
    fails(with_sampling(dig, task="inpaint", dataset_index=1, image=str(tmp_path / "img.npy")), sde_d, m_d,
          "either sampling.image or sampling.dataset_index")
    fails(with_sampling(dig, task="inpaint", image=str(tmp_path / "img.npy")), sde_d, m_d,
          "image is 4x4 but the model generates 8x8")
    fails(with_sampling(dig, task="inpaint", image=str(tmp_path / "missing.png")), sde_d, m_d, "does not exist")
    np.save(tmp_path / "m44.npy", np.ones((4, 4), np.float32))
    fails(with_sampling(dig, task="inpaint", dataset_index=0, mask=str(tmp_path / "m44.npy")), sde_d, m_d,
          r"mask shape mismatch.*has shape \(4, 4\).*expected \(8, 8\) or \(1, 8, 8\)$")
    np.save(tmp_path / "half.npy", np.full((8, 8), 0.5, np.float32))
    fails(with_sampling(dig, task="inpaint", dataset_index=0, mask=str(tmp_path / "half.npy")), sde_d, m_d,
          "only 0 \\(known\\) and 1")
    np.save(tmp_path / "none.npy", np.zeros((8, 8), np.float32))
    fails(with_sampling(dig, task="inpaint", dataset_index=0, mask=str(tmp_path / "none.npy")), sde_d, m_d,
          "marks no pixel")
    fails(with_sampling(dig, task="inpaint", dataset_index=0, mask="diagonal"), sde_d, m_d, "unknown sampling.mask")
    fails(with_sampling(dig, task="inpaint", dataset_index=0, method="rk45"), sde_d, m_d, "fixed-step sampler")
    # sample() checks before loading anything
    with pytest.raises(SamplingError, match="needs a class-conditional model"):
        sample(with_sampling(toy, guidance="cfg"), str(tmp_path / "no_run"))
