"""Latent diffusion (issue 13): the KL autoencoder against closed forms, the scale factor, a briefly trained autoencoder
against the trivial reconstruction, and the latent pipeline end to end through the command line with its errors."""
import math
import os

import numpy as np
import pytest
import torch

from sde_diffusion import autoencoder as ae_lib
from sde_diffusion import cli, configs

F64 = dict(dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ mathematics
def test_kl_term_equals_the_closed_form_and_a_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 2, 2, generator=g, **F64)
    logvar = torch.randn(3, 2, 2, 2, generator=g, **F64) * 0.7
    kl = ae_lib.kl_divergence(mean, logvar)
    # closed form written out per coordinate: KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2
    s = torch.exp(0.5 * logvar)
    by_hand = (torch.log(1 / s) + (s ** 2 + mean ** 2) / 2 - 0.5).flatten(1).sum(1)
    torch.testing.assert_close(kl, by_hand, rtol=1e-12, atol=1e-12)
    # Monte Carlo: E_q[log q(z) - log p(z)] with torch.distributions' densities (none of our code)
    n = 200_000
    q = torch.distributions.Normal(mean.flatten(1), s.flatten(1))
    z = q.sample((n,))
    log_ratio = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(-1)    # (n, 3)
    est, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    assert ((est - kl).abs() < 5 * stderr).all(), (est, kl, stderr)
    # zero exactly at the prior, positive elsewhere
    assert float(ae_lib.kl_divergence(torch.zeros(1, 4), torch.zeros(1, 4))) == 0.0
    assert (kl > 0).all()


def _tiny_config(**overrides):
    c = configs.get_config("ldm_digits")
    base = {"autoencoder.ch": 8, "autoencoder.num_res_blocks": 1, "autoencoder.batch_size": 32,
            "autoencoder.n_iters": 150, "autoencoder.lr": 3e-3, "autoencoder.checkpoint_freq": 150,
            "autoencoder.log_freq": 50, "autoencoder.progress": False, "autoencoder.ema_rate": 0.9}
    base.update(overrides)
    return configs.apply_overrides(c, base)


def test_shapes_and_the_network_config_view():
    c = _tiny_config()
    assert ae_lib.is_latent(c) and ae_lib.latent_shape(c) == (2, 4, 4)
    view = ae_lib.network_config(c)
    assert (view.data.num_channels, view.data.image_size, view.data.dim) == (2, 4, 32)
    assert (c.data.num_channels, c.data.image_size) == (1, 8)             # the config itself is untouched
    assert ae_lib.network_config(configs.get_config("fm_digits")) is not None
    assert not ae_lib.is_latent(configs.get_config("fm_digits"))
    model = ae_lib.build_autoencoder(c)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    mean, logvar = model.encode(x)
    assert mean.shape == logvar.shape == (5, 2, 4, 4) and model.decode(mean).shape == x.shape
    c4 = configs.apply_overrides(configs.get_config("ldm_cifar"), {"autoencoder.ch": 8})
    assert ae_lib.latent_shape(c4) == (4, 16, 16)


def test_measured_scale_factor_makes_the_training_latents_unit_variance():
    from sde_diffusion.data import get_data_scaler, get_dataset
    c = _tiny_config()
    torch.manual_seed(0)
    model = ae_lib.build_autoencoder(c).eval()
    scaler = get_data_scaler(c)
    data = get_dataset(c, "train")
    batches = [scaler(x) for x, _ in data.iterate(400)]
    scale, stats = ae_lib.measure_scale_factor(model, batches)
    assert stats["num_examples"] == len(data) and scale == pytest.approx(1 / stats["latent_std"])
    codec = ae_lib.LatentCodec(model, scale, ae_lib.latent_shape(c))
    z = torch.cat([codec.encode(x) for x in batches]).double()
    assert float(z.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    # decode undoes the scaling: decode(scale * mean) = decoder(mean)
    x = batches[0][:8]
    torch.testing.assert_close(codec.decode(codec.encode(x)), model.decode(model.encode(x)[0]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def ae_workdir(tmp_path_factory):
    """A tiny autoencoder trained for 150 updates through the command line."""
    wd = str(tmp_path_factory.mktemp("latent") / "ae")
    code = cli.cli(["main.py", "--mode", "train_autoencoder", "--config", "ldm_digits", "--workdir", wd,
                    "--config.autoencoder.ch=8", "--config.autoencoder.batch_size=32",
                    "--config.autoencoder.n_iters=150", "--config.autoencoder.lr=3e-3",
                    "--config.autoencoder.checkpoint_freq=150", "--config.autoencoder.ema_rate=0.9",
                    "--config.autoencoder.progress=false"])
    assert code == 0
    return wd


def test_briefly_trained_autoencoder_reconstructs_better_than_the_mean_image(ae_workdir):
    import json
    with open(os.path.join(ae_workdir, "autoencoder.json")) as f:
        result = json.load(f)
    assert result["step"] == 150
    # the trivial reconstruction (the training mean image) errs ~0.3 per pixel in [-1, 1]; 150 updates beat it 3x
    assert result["test_mse"] < result["mean_image_mse"] / 3, result
    assert os.path.isfile(os.path.join(ae_workdir, "reconstructions.png"))
    from sde_diffusion.run.autoencoder_train import load_autoencoder
    _, _, info = load_autoencoder(ae_workdir)
    assert info["latent_shape"] == (2, 4, 4) and info["scale_factor"] == pytest.approx(result["scale_factor"])


def _ldm_args(wd, ae_wd, *extra):
    return ["main.py", "--workdir", wd, f"--config.model.autoencoder_workdir={ae_wd}", "--config.model.nf=8",
            "--config.training.batch_size=8", "--config.training.n_iters=3", "--config.training.checkpoint_freq=3",
            "--config.training.snapshot_freq=0", "--config.training.progress=false", *extra]


def test_latent_pipeline_trains_samples_and_evaluates_through_the_cli(ae_workdir, tmp_path):
    wd = str(tmp_path / "ldm")
    assert cli.cli(_ldm_args(wd, ae_workdir, "--mode", "train", "--config", "ldm_digits")) == 0
    assert cli.cli(["main.py", "--mode", "sample", "--workdir", wd, "--config.sampling.num_steps=3",
                    "--config.sampling.num_samples=6", "--config.sampling.batch_size=6"]) == 0
    x = np.load(os.path.join(wd, "samples", "step_00000003", "samples.npz"))["samples"]
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1   # data space
    assert cli.cli(["main.py", "--mode", "eval", "--workdir", wd, "--config.eval.num_generated=4",
                    "--config.eval.sample_metrics=none", "--config.sampling.num_steps=2",
                    "--config.eval.enable_bpd=true", "--config.eval.progress=false"]) == 0
    import json
    with open(os.path.join(wd, "eval", "eval_00000003.json")) as f:
        summary = json.load(f)
    assert math.isfinite(summary["test_loss"]) and not summary.get("bpd")    # no latent bits/dim passed off as data's
    with np.load(os.path.join(wd, "eval", "step_00000003", "samples.npz")) as z:
        assert z["samples"].shape == (4, 1, 8, 8)


@pytest.mark.parametrize("method,extra", [("dpm_solver", {}), ("unipc", {}), ("edm", {"sampling.schedule": "edm"})])
def test_other_samplers_sample_the_latent_model(ae_workdir, tmp_path, method, extra):
    from sde_diffusion.run import train as train_lib
    from sde_diffusion.run.sampling import generate, load_sampling_model
    wd = str(tmp_path / "ldm")
    c = configs.apply_overrides(configs.get_config("ldm_digits"), {
        "model.autoencoder_workdir": ae_workdir, "model.nf": 8, "training.batch_size": 8, "training.n_iters": 1,
        "training.checkpoint_freq": 1, "training.snapshot_freq": 0, "training.progress": False})
    train_lib.train(c, wd, device="cpu")
    c = configs.apply_overrides(c, dict({"sampling.method": method, "sampling.num_steps": 3}, **extra))
    c, sde, model, _, _ = load_sampling_model(c, wd)
    x = generate(c, sde, model, num_samples=3, batch_size=3)["samples"]
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


def test_missing_corrupt_and_incompatible_autoencoders_are_one_line_errors(ae_workdir, tmp_path, capsys):
    import shutil
    wd = str(tmp_path / "ldm")
    train = ["--mode", "train", "--config", "ldm_digits"]
    assert cli.cli(_ldm_args(wd, str(tmp_path / "nowhere"), *train)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "train_autoencoder" in err
    # a latent shape the autoencoder does not make
    assert cli.cli(_ldm_args(wd, ae_workdir, *train, "--config.autoencoder.latent_channels=3")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "latent shape" in err
    # a score model's workdir is not an autoencoder
    other = str(tmp_path / "fm")
    assert cli.cli(["main.py", "--mode", "train", "--config", "fm_digits", "--workdir", other, "--config.model.nf=8",
                    "--config.training.batch_size=8", "--config.training.n_iters=1", "--config.training.progress=false",
                    "--config.training.snapshot_freq=0"]) == 0
    capsys.readouterr()
    assert cli.cli(_ldm_args(wd, other, *train)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an autoencoder checkpoint" in err
    # a corrupt checkpoint (bytes flipped inside a tensor)
    broken = str(tmp_path / "ae_broken")
    shutil.copytree(ae_workdir, broken)
    ckpt = os.path.join(broken, "checkpoints", "ckpt_00000150.pt")
    raw = bytearray(open(ckpt, "rb").read())
    raw[len(raw) // 2:len(raw) // 2 + 16] = bytes(16)
    open(ckpt, "wb").write(bytes(raw))
    assert cli.cli(_ldm_args(wd, broken, *train)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "corrupt" in err and "autoencoder" in err
    assert not os.path.isdir(os.path.join(wd, "checkpoints")) or not os.listdir(os.path.join(wd, "checkpoints"))
    # a data-space config has no autoencoder to train
    assert cli.cli(["main.py", "--mode", "train_autoencoder", "--config", "fm_digits", "--workdir",
                    str(tmp_path / "x")]) == 2
    assert "no 'autoencoder' section" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ provenance
@pytest.fixture(scope="module")
def other_ae_workdir(tmp_path_factory):
    """A second autoencoder of the same shape (another seed, 20 updates): 'B', not the fixture's 'A'."""
    wd = str(tmp_path_factory.mktemp("latent_b") / "ae_b")
    code = cli.cli(["main.py", "--mode", "train_autoencoder", "--config", "ldm_digits", "--workdir", wd,
                    "--config.seed=1", "--config.autoencoder.ch=8", "--config.autoencoder.batch_size=32",
                    "--config.autoencoder.n_iters=20", "--config.autoencoder.checkpoint_freq=20",
                    "--config.autoencoder.progress=false"])
    assert code == 0
    return wd


def _latent_config(ae_wd):
    return configs.apply_overrides(configs.get_config("ldm_digits"), {"model.autoencoder_workdir": ae_wd})


def _replace(dst, src):
    import shutil
    shutil.rmtree(dst)
    shutil.copytree(src, dst)


def test_codec_identity_survives_a_copy_and_a_replaced_autoencoder_is_refused(ae_workdir, other_ae_workdir, tmp_path):
    import shutil
    from sde_diffusion.run import autoencoder_train as ae_train
    a = ae_train.load_codec(_latent_config(ae_workdir))
    ident = a.identity
    assert set(ident) == {"path", "step", "sha256", "scale_factor"} and ident["step"] == 150
    assert os.path.isabs(ident["path"]) and ident["path"].endswith("ckpt_00000150.pt") and len(ident["sha256"]) == 64
    assert ident["scale_factor"] == a.scale_factor
    # the digest is of the weights and scale factor: a copied workdir is the same autoencoder
    wd = str(tmp_path / "ae")
    shutil.copytree(ae_workdir, wd)
    copy = ae_train.load_codec(_latent_config(wd), expected=ident)
    assert copy.identity["sha256"] == ident["sha256"] and copy.identity["path"] != ident["path"]
    ae_train.check_identity(copy, ident)
    ae_train.check_identity(copy, None)                  # nothing recorded (an older run): nothing to check
    # the workdir now holds another autoencoder B: one line naming both, and what to do
    _replace(wd, other_ae_workdir)
    with pytest.raises(ae_train.AutoencoderMismatchError) as e:
        ae_train.load_codec(_latent_config(wd), expected=ident)
    msg = str(e.value)
    b = ae_train.load_codec(_latent_config(wd)).identity
    assert "\n" not in msg and ident["sha256"][:12] in msg and b["sha256"][:12] in msg
    assert b["sha256"] != ident["sha256"]
    assert "not the one this latent model was trained on" in msg and "model.autoencoder_workdir" in msg
    assert isinstance(e.value, ae_train.AutoencoderError)
    # the right checkpoint named explicitly (model.autoencoder_workdir may name a checkpoint file) loads
    explicit = ae_train.load_codec(_latent_config(ident["path"]), expected=ident)
    assert explicit.identity["sha256"] == ident["sha256"]


def test_an_autoencoder_trained_on_is_found_at_its_recorded_step(ae_workdir, tmp_path):
    import shutil
    from sde_diffusion.run import autoencoder_train as ae_train
    ident = ae_train.load_codec(_latent_config(ae_workdir)).identity
    wd = str(tmp_path / "ae")
    shutil.copytree(ae_workdir, wd)
    more = _tiny_config(**{"autoencoder.n_iters": 160, "autoencoder.checkpoint_freq": 10,
                           "autoencoder.keep_checkpoints": 3})
    assert ae_train.train_autoencoder(more, wd)["step"] == 160
    latest = ae_train.load_codec(_latent_config(wd))
    assert latest.identity["step"] == 160 and latest.identity["sha256"] != ident["sha256"]
    codec = ae_train.load_codec(_latent_config(wd), expected=ident)       # step 150 is still kept: that one
    assert codec.identity["step"] == 150 and codec.identity["sha256"] == ident["sha256"]


def test_a_latent_run_records_its_autoencoder_and_refuses_another_one(ae_workdir, other_ae_workdir, tmp_path, capsys):
    import shutil
    from sde_diffusion.run.checkpoints import latest_checkpoint, load_checkpoint
    ae = str(tmp_path / "ae")
    shutil.copytree(ae_workdir, ae)
    wd = str(tmp_path / "ldm")
    assert cli.cli(_ldm_args(wd, ae, "--mode", "train", "--config", "ldm_digits")) == 0
    recorded = load_checkpoint(latest_checkpoint(wd)).get("autoencoder")
    assert recorded is not None
    assert recorded["step"] == 150 and recorded["path"] == os.path.abspath(os.path.join(ae, "checkpoints",
                                                                                      "ckpt_00000150.pt"))
    sample = ["main.py", "--mode", "sample", "--workdir", wd, "--config.sampling.num_steps=2",
              "--config.sampling.num_samples=2", "--config.sampling.batch_size=2"]
    evaluate = ["main.py", "--mode", "eval", "--workdir", wd, "--config.eval.enable_sampling=false",
                "--config.eval.enable_bpd=false", "--config.eval.progress=false"]
    resume = _ldm_args(wd, ae, "--mode", "train", "--config.training.n_iters=4")
    assert cli.cli(sample) == 0
    capsys.readouterr()
    _replace(ae, other_ae_workdir)                       # the autoencoder's workdir now holds another one
    for argv in (sample, evaluate, resume):
        assert cli.cli(argv) == 1, argv[2]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "not the one this latent model was trained on" in err, err
        assert recorded["sha256"][:12] in err
    assert load_checkpoint(latest_checkpoint(wd))["step"] == 3               # the refused resume trained nothing
    _replace(ae, ae_workdir)                             # the right one back: everything loads again
    assert cli.cli(sample) == 0 and cli.cli(resume) == 0


# ------------------------------------------------------------------------------------------------ configs
def test_cifar_flow_matching_and_edm_configs_carry_the_published_hyperparameters():
    from sde_diffusion import sdes
    fm = configs.get_config("fm_cifar")         # Tong et al. 2024 (TorchCFM's CIFAR-10 recipe)
    assert fm.training.loss == "fm" and fm.model.parameterization == "velocity"
    assert (fm.optim.lr, fm.training.batch_size, fm.optim.warmup, fm.optim.grad_clip, fm.model.ema_rate) == \
        (2e-4, 128, 5000, 1.0, 0.9999)
    assert fm.model.nf == 128 and tuple(fm.model.ch_mult) == (1, 2, 2, 2) and fm.training.n_iters >= 400_000
    edm = configs.get_config("edm_cifar")       # Karras et al. 2022, Table 7 (CIFAR-10, DDPM++)
    assert isinstance(configs.build_sde(edm), sdes.SDE) and edm.model.precond == "edm"
    assert (edm.training.batch_size, edm.optim.lr, edm.model.dropout, edm.model.sigma_data) == (512, 1e-3, 0.13, 0.5)
    assert edm.training.n_iters * edm.training.batch_size == pytest.approx(200e6, rel=1e-3)       # 200 Mimg
    assert edm.optim.warmup * edm.training.batch_size == pytest.approx(10e6, rel=1e-3)           # 10 Mimg ramp-up
    # EMA half-life 0.5 Mimg: decay^(500k / 512) = 1/2
    assert edm.model.ema_rate ** (0.5e6 / 512) == pytest.approx(0.5, rel=2e-2)
    assert (edm.sampling.method, edm.sampling.num_steps, edm.sampling.eps, edm.model.sigma_max) == ("edm", 18, 0.002,
                                                                                                    80.0)
    for name in ("ldm_digits", "ldm_cifar"):
        c = configs.get_config(name)
        assert ae_lib.is_latent(c) and "autoencoder" in c
