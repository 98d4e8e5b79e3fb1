"""``--mode sample`` and ``--mode eval`` (its bits/dim and samples) shared out across ranks (gloo on CPU), started as
users start them.

What is compared with what: the same command in one process (``python main.py``, no process group) and under
``torchrun --nproc_per_node=2``.  Every sample batch has its own seed and the same shape whoever draws it, and every
rank runs one thread, so the two must agree bit for bit (the tests ask for exact equality: any difference means a
batch was drawn with another seed, shape or order).  300 samples in batches of 64 make five batches, the last one
short: rank 0 draws batches 0, 2, 4 and rank 1 batches 1, 3.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
SAMPLING = ["--config.sampling.num_samples=300", "--config.sampling.batch_size=64",
            "--config.sampling.method=euler_maruyama", "--config.sampling.num_steps=20"]
EVAL = ["--config.eval.num_generated=300", "--config.eval.generate_batch_size=64", "--config.eval.bpd_num_examples=60",
        "--config.eval.bpd_batch_size=20", "--config.eval.bpd_num_repeats=1",
        "--config.sampling.method=euler_maruyama", "--config.sampling.num_steps=20"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(args, nproc=1, timeout=180):
    launch = [sys.executable, MAIN] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", MAIN]
    p = subprocess.run(launch + args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy_2d run of 30 updates (a few seconds)."""
    from sde_diffusion import configs
    from sde_diffusion.run.train import train
    workdir = str(tmp_path_factory.mktemp("shard") / "run")
    config = configs.apply_overrides(configs.get_config("toy_2d"), [
        "training.n_iters=30", "training.batch_size=64", "training.checkpoint_freq=30", "training.snapshot_freq=0",
        "training.progress=false", "model.nf=32"])
    train(config, workdir)
    return workdir


def _copy(workdir, dest):
    import shutil
    shutil.copytree(workdir, dest)
    return str(dest)


def test_sharded_sampling_equals_one_process(trained, tmp_path):
    one = _run(["--mode", "sample", "--workdir", trained, "--out_dir", str(tmp_path / "one"), *SAMPLING])
    two = _run(["--mode", "sample", "--workdir", trained, "--out_dir", str(tmp_path / "two"), *SAMPLING], nproc=2)
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["samples"].shape == b["samples"].shape == (300, 2)
    np.testing.assert_array_equal(a["samples"], b["samples"])
    assert int(a["nfe"]) == int(b["nfe"]) == 5 * 20
    # rank 0 alone prints and writes: one result block, one file of each kind
    assert two.stdout.count("samples: ") == 1 and one.stdout.count("samples: ") == 1
    assert sorted(os.listdir(tmp_path / "two")) == ["samples.npz", "samples.png", "sampling_config.json"]


def test_batch_i_of_mode_sample_is_generate_with_its_documented_seed(trained):
    """The seeding contract that makes the ranks' shares independent of the world size: batch i of ``--mode
    sample`` is ``generate`` of that batch alone with ``mix_seed(sampling.seed, SAMPLE_BATCH_SALT, i)``."""
    from sde_diffusion import configs
    from sde_diffusion.data import mix_seed
    from sde_diffusion.run import distributed
    from sde_diffusion.run.checkpoints import load_model
    from sde_diffusion.run.sampling import SAMPLE_BATCH_SALT, generate, generate_sharded
    config = configs.apply_overrides(configs.get_config(os.path.join(trained, "config.json")),
                                     [a[len("--config."):] for a in SAMPLING] + ["sampling.num_samples=150"])
    config, sde, model = load_model(trained, config=config)
    whole = generate_sharded(distributed.Context(), config, sde, model)["samples"]
    assert whole.shape == (150, 2)
    for i, (lo, hi) in enumerate([(0, 64), (64, 128), (128, 150)]):
        alone = generate(config, sde, model, num_samples=hi - lo, batch_size=hi - lo,
                         seed=mix_seed(int(config.sampling.seed), SAMPLE_BATCH_SALT, i))["samples"]
        torch.testing.assert_close(whole[lo:hi], alone, rtol=0, atol=0)
    # a different seed gives different samples (the seed is used at all)
    config.sampling.seed = 1
    assert not torch.equal(generate_sharded(distributed.Context(), config, sde, model)["samples"], whole)


def test_sharded_eval_resumes_a_stopped_one_process_eval_and_equals_an_uninterrupted_one(trained, tmp_path,
                                                                                        monkeypatch):
    """One process evaluates, is stopped (SIGTERM honoured) after two of the five sample batches; torchrun with two
    ranks resumes it: the samples and the summary equal those of an uninterrupted one-process evaluation, and the
    resumed run drew only the three missing batches."""
    full = _copy(trained, tmp_path / "full")
    _run(["--mode", "eval", "--workdir", full, *EVAL])

    from sde_diffusion import configs
    from sde_diffusion.run import evaluate as evaluate_lib, lifecycle
    part = _copy(trained, tmp_path / "part")
    calls = []
    original = evaluate_lib.generate

    def generate(*args, **kwargs):
        calls.append(kwargs["seed"])
        if len(calls) == 2:
            lifecycle._state.requested = signal.SIGTERM        # as the handler does on the first SIGTERM
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_lib, "generate", generate)
    config = configs.apply_overrides(configs.get_config(os.path.join(part, "config.json")),
                                     [a[len("--config."):] for a in EVAL])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(lifecycle.Stopped, match="2 of 5 sample batches recorded"):
            evaluate_lib.evaluate(config, part)
    finally:
        torch.set_num_threads(threads)
    state = json.load(open(os.path.join(part, "eval", "step_00000030", "state.json")))
    assert sorted(state["stages"]["samples"]["batches"]) == ["0", "1"]

    resumed = _run(["--mode", "eval", "--workdir", part, *EVAL], nproc=2)
    a = np.load(os.path.join(full, "eval", "step_00000030", "samples.npz"))
    b = np.load(os.path.join(part, "eval", "step_00000030", "samples.npz"))
    np.testing.assert_array_equal(a["samples"], b["samples"])
    sa = json.load(open(os.path.join(full, "eval", "eval_00000030.json")))
    sb = json.load(open(os.path.join(part, "eval", "eval_00000030.json")))
    assert sa["test_loss"] == sb["test_loss"] and sa["samples"]["num"] == sb["samples"]["num"] == 300
    # the bits/dim stage's three batches: drawn by both ranks in the resumed run, the same sums
    assert sb["bpd"]["num_evaluations"] == 60 and sa["bpd"]["bpd"] == sb["bpd"]["bpd"]
    assert sa["bpd"]["bpd_stderr"] == sb["bpd"]["bpd_stderr"]
    assert sb["samples"]["nfe"] == 5 * 20
    assert resumed.stdout.count("test loss") == 1       # rank 0's summary line only
    assert not os.path.exists(os.path.join(part, "eval", "step_00000030", "sample_batches"))


def _rank_main(rank, port, workdir, out_dir, err_path):
    """A torchrun-like worker (torchrun's environment, then ``main.cli``) whose rank 1 meets non-finite scores."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_distributed import as_torchrun_rank
    as_torchrun_rank(rank, port, err_path)
    from sde_diffusion.run import sampling
    if rank == 1:
        def generate(*args, **kwargs):
            raise FloatingPointError("the score is not finite at t = 0.5")
        sampling.generate = generate
    import main
    code = main.cli(["main.py", "--mode", "sample", "--workdir", workdir, "--out_dir", out_dir, *SAMPLING,
                     "--config.compute.dist_timeout=60"])
    sys.stderr.flush()
    os._exit(code)


def test_a_failure_on_one_sampling_rank_stops_both_with_one_message(trained, tmp_path):
    from test_distributed import spawn_two_ranks
    codes, lines = spawn_two_ranks(_rank_main, tmp_path, trained, str(tmp_path / "out"))
    assert codes == [1, 1]
    assert lines == ["error: rank 1 of 2 failed during sampling: the score is not finite at t = 0.5"], lines
    assert not os.path.exists(tmp_path / "out" / "samples.npz")        # nothing half-done was written
