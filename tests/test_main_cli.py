"""The training pipeline end to end: CLI train -> sample -> eval on toy_2d, exact resume after SIGKILL, checkpoints,
TensorBoard logs, non-finite loss handling, the vp_digits smoke run, and CLI errors."""
import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from sde_diffusion import configs, data
from sde_diffusion.run import checkpoints as ckpt_lib
from sde_diffusion.run import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
# one thread: identical arithmetic in every process (the resume test compares bits) and no oversubscription
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)


def run_cli(*args, check=True, wrapper=None, extra_env=None):
    cmd = [sys.executable, wrapper or MAIN, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, **(extra_env or {})), capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def energy_distance(a, b):
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo), a metric between distributions;
    V-statistic estimate.  0 iff the laws agree."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def small_toy_overrides(n_iters, ckpt_freq, **extra):
    over = {"training.n_iters": n_iters, "training.checkpoint_freq": ckpt_freq, "training.batch_size": 64,
            "training.log_freq": 10, "training.snapshot_freq": 0, "training.keep_checkpoints": 10}
    over.update(extra)
    return [f"--config.{k}={v}" for k, v in over.items()]


# ------------------------------------------------------------------------------------------------ end to end
def test_toy_2d_train_sample_eval_through_the_cli(tmp_path):
    """Train 500 steps on the ring (8 Gaussians on the unit circle), sample 2000 points with the probability-flow ODE,
    and measure the energy distance to 2000 fresh target points.  The trained samples must be at least 3x closer than
    prior samples N(0, I) are (measured here: about 0.009 vs 0.045; two target draws differ by about 0.0013)."""
    wd = str(tmp_path / "toy")
    run_cli("--mode", "train", "--config", "toy_2d", "--workdir", wd, "--config.training.n_iters=500",
            "--config.training.snapshot_freq=500", "--config.training.snapshot_num_samples=200",
            "--config.training.log_freq=50")
    out = run_cli("--mode", "sample", "--workdir", wd, "--config.sampling.num_samples=2000",
                  "--config.sampling.num_steps=50")
    npz = os.path.join(wd, "samples", "step_00000500", "samples.npz")
    assert npz in out.stdout and os.path.isfile(npz.replace(".npz", ".png"))
    samples = np.load(npz)["samples"]
    assert samples.shape == (2000, 2) and np.isfinite(samples).all()
    target = data.sample_toy("ring", 2000, torch.Generator().manual_seed(2024))
    prior = torch.randn(2000, 2, generator=torch.Generator().manual_seed(2025))
    d_model, d_prior = energy_distance(samples, target), energy_distance(prior, target)
    assert d_model < d_prior / 3, (d_model, d_prior)
    # the modes are populated: every one of the 8 holds 12.5% +- 5% of the samples
    angles = np.mod(np.round(np.arctan2(samples[:, 1], samples[:, 0]) / (np.pi / 4)), 8)
    shares = np.bincount(angles.astype(int), minlength=8) / len(samples)
    assert np.all(np.abs(shares - 0.125) < 0.05), shares

    out = run_cli("--mode", "eval", "--workdir", wd, "--config.eval.num_samples=2000",
                  "--config.eval.bpd_num_examples=200", "--config.eval.num_generated=200")
    result = json.load(open(os.path.join(wd, "eval", "eval_00000500.json")))
    assert result["step"] == 500 and np.isfinite(result["test_loss"]) and result["test_loss"] < 0.5

    # TensorBoard: the four training scalars and a sample plot
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(wd, "tensorboard"), size_guidance={"images": 10})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/lr", "train/grad_norm", "train/steps_per_sec", "eval/test_loss"} <= set(
        tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(50, 501, 50))
    assert "samples" in tags["images"]


KILLER = r'''
import os, runpy, signal, sys
import torch
kill_at = int(os.environ["KILL_AT_STEP"])
original = torch.optim.Adam.step
calls = [0]
def step(self, *args, **kwargs):
    out = original(self, *args, **kwargs)
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)     # no cleanup, no flush: as if the machine died
    return out
torch.optim.Adam.step = step
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow      # the default set's kill-and-resume tests are in test_faults.py (12 kills per run, in-process)
def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    """Uninterrupted 60 updates vs. killed (SIGKILL) after update 45 and resumed from the step-40 checkpoint: the
    final model, EMA and optimiser tensors are bitwise equal (CPU, one thread)."""
    over = small_toy_overrides(60, 20, **{"model.dropout": 0.1})       # dropout: the global RNG matters too
    ref = str(tmp_path / "ref")
    run_cli("--mode", "train", "--config", "toy_2d", "--workdir", ref, *over)

    killed = str(tmp_path / "killed")
    wrapper = tmp_path / "killer.py"
    wrapper.write_text(KILLER)
    proc = run_cli(MAIN, "--mode", "train", "--config", "toy_2d", "--workdir", killed, *over, check=False,
                   wrapper=str(wrapper), extra_env={"KILL_AT_STEP": "45"})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert [s for s, _ in ckpt_lib.list_checkpoints(killed)] == [20, 40]
    run_cli("--mode", "train", "--config", "toy_2d", "--workdir", killed, *over)

    a = torch.load(ckpt_lib.resolve_checkpoint(ref, 60), weights_only=True)
    b = torch.load(ckpt_lib.resolve_checkpoint(killed, 60), weights_only=True)
    for key in ("model",):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    for name in a["ema"]["model"]:
        assert torch.equal(a["ema"]["model"][name], b["ema"]["model"][name]), name
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 60


# ------------------------------------------------------------------------------------------------ in process
def toy_config(n_iters=30, ckpt_freq=10, **extra):
    c = configs.get_config("toy_2d")
    over = {"training.n_iters": n_iters, "training.checkpoint_freq": ckpt_freq, "training.batch_size": 32,
            "training.log_freq": 5, "training.snapshot_freq": 0, "training.keep_checkpoints": 2,
            "training.progress": False}
    over.update(extra)
    return configs.apply_overrides(c, over)


def test_checkpoints_are_plain_atomic_and_pruned(tmp_path):
    wd = str(tmp_path)
    out = train_lib.train(toy_config(), wd, device="cpu")
    assert out["step"] == 30
    assert [s for s, _ in ckpt_lib.list_checkpoints(wd)] == [20, 30]           # keep_checkpoints = 2
    assert not glob.glob(os.path.join(wd, "checkpoints", ".tmp-*"))
    state = torch.load(out["checkpoint"], weights_only=True)                     # plain tensors / numbers / str
    assert state["step"] == 30 and state["format"] == 2 and len(state["sha256"]) == 64
    assert {"model", "ema", "optimizer", "rng", "config"} <= set(state)
    assert {"torch", "numpy", "python"} <= set(state["rng"])
    assert json.loads(state["config"])["training"]["n_iters"] == 30
    assert os.path.isfile(os.path.join(wd, "config.json"))

    # sampling and evaluation use the EMA weights
    config, sde, model = ckpt_lib.load_model(wd)
    for name, v in model.state_dict().items():
        assert torch.equal(v, state["ema"]["model"][name])
    assert not any(p.requires_grad for p in model.parameters())
    config, sde, score_fn = ckpt_lib.load_score_fn(wd, checkpoint=20)
    x = torch.randn(5, 2)
    assert score_fn(x, torch.full((5,), 0.5)).shape == (5, 2)
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint for step 10"):
        ckpt_lib.load_model(wd, checkpoint=10)

    # a second call resumes at the end: nothing to do
    assert train_lib.train(toy_config(), wd, device="cpu")["step"] == 30

    # a failed write leaves the previous checkpoints intact and no temporary file
    def boom(src, dst):
        raise OSError("disk full")
    import sde_diffusion.run.checkpoints as mod
    orig = mod.os.replace
    mod.os.replace = boom
    try:
        with pytest.raises(OSError, match="disk full"):
            ckpt_lib.save_checkpoint(wd, {"model": {}, "ema": {}}, 40)
    finally:
        mod.os.replace = orig
    assert [s for s, _ in ckpt_lib.list_checkpoints(wd)] == [20, 30]
    assert not glob.glob(os.path.join(wd, "checkpoints", ".tmp-*"))
    torch.load(ckpt_lib.latest_checkpoint(wd), weights_only=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = train_lib.get_loss_fn

    def poisoned(config, sde):
        loss_fn, calls = real(config, sde), [0]

        def fn(*args, **kwargs):
            calls[0] += 1
            loss = loss_fn(*args, **kwargs)
            return loss * float("nan") if calls[0] == 26 else loss
        return fn
    monkeypatch.setattr(train_lib, "get_loss_fn", poisoned)
    wd = str(tmp_path)
    with pytest.raises(train_lib.NonFiniteLossError, match=r"non-finite loss \(nan\) at step 25.*ckpt_00000020"):
        train_lib.train(toy_config(n_iters=40, ckpt_freq=10, **{"training.keep_checkpoints": 5}), wd, device="cpu")
    assert [s for s, _ in ckpt_lib.list_checkpoints(wd)] == [10, 20]
    state = torch.load(ckpt_lib.latest_checkpoint(wd), weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_vp_digits_smoke_train_sample_eval(tmp_path):
    from sde_diffusion.run.evaluate import evaluate
    from sde_diffusion.run.sampling import sample
    c = configs.apply_overrides(configs.get_config("vp_digits"), {
        "training.n_iters": 4, "training.batch_size": 16, "training.checkpoint_freq": 2, "training.log_freq": 2,
        "training.snapshot_freq": 4, "training.snapshot_num_samples": 4, "training.progress": False,
        "sampling.num_steps": 3, "sampling.num_samples": 6, "sampling.batch_size": 4,
        "eval.bpd_num_examples": 8, "eval.bpd_rtol": 1e-3, "eval.bpd_atol": 1e-3, "eval.num_generated": 8})
    wd = str(tmp_path)
    out = train_lib.train(c, wd, device="cpu")
    assert out["step"] == 4 and np.isfinite(out["loss"])
    assert os.path.isfile(os.path.join(wd, "snapshots", "step_00000004", "samples.png"))
    res = sample(c, wd, device="cpu")
    x = np.load(res["npz"])["samples"]
    assert x.shape == (6, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    from PIL import Image
    assert Image.open(res["png"]).size[0] > 8
    ev = evaluate(c, wd, device="cpu")
    assert ev["num_examples"] == 180 and np.isfinite(ev["test_loss"])
    assert evaluate(c, wd, device="cpu")["test_loss"] == ev["test_loss"]      # fixed eval seed: reproducible


def test_conditional_deterministic_training_and_sampling_labels(tmp_path):
    from sde_diffusion.run.sampling import sample
    c = toy_config(n_iters=4, ckpt_freq=4, **{"model.num_classes": 3, "training.p_uncond": 0.2,
                                                "sampling.num_samples": 7, "sampling.num_steps": 2,
                                                "deterministic": True})
    try:
        train_lib.train(c, str(tmp_path), device="cpu")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    res = sample(c, str(tmp_path), device="cpu")
    z = np.load(res["npz"])
    assert z["labels"].tolist() == [0, 1, 2, 0, 1, 2, 0]


# ------------------------------------------------------------------------------------------------ CLI errors
def test_cli_reports_config_errors_clearly(tmp_path):
    proc = run_cli("--mode", "train", "--config", "toy_2d", "--workdir", str(tmp_path),
                   "--config.training.batchsize=8", check=False)
    assert proc.returncode == 2
    assert "unknown config key 'training.batchsize'" in proc.stderr and "training.batch_size" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_config_loading_in_process(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        import main as cli
    finally:
        sys.path.remove(ROOT)
    rest, over = cli._split_overrides(["main.py", "--mode", "train", "--config.optim.lr", "0.5",
                                       "--config.training.batch_size=4", "--workdir", "w"])
    assert rest == ["main.py", "--mode", "train", "--workdir", "w"]
    assert over == ["optim.lr=0.5", "training.batch_size=4"]
    c = cli.load_config("toy_1d", str(tmp_path), "train", over)
    assert c.optim.lr == 0.5 and c.training.batch_size == 4
    with pytest.raises(configs.ConfigError, match="expects an int"):
        cli.load_config("toy_1d", str(tmp_path), "train", ["training.batch_size=x"])
    with pytest.raises(configs.ConfigError, match="Did you mean toy_2d"):
        cli.load_config("toy2d", str(tmp_path), "train", [])
    with pytest.raises(configs.ConfigError, match="--config is required"):
        cli.load_config(None, str(tmp_path), "sample", [])
    # sample/eval fall back on the run's config.json
    (tmp_path / "config.json").write_text(configs.get_config("toy_1d").to_json())
    assert cli.load_config(None, str(tmp_path), "sample", []).data.dim == 1
