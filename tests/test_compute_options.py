"""The CUDA-side and data-side ``config.compute`` options: fp16 autocast with a gradient scaler (CUDA only),
``dataloader_workers`` / ``pin_memory`` (batches built ahead by threads), ``cudnn_benchmark`` and ``tf32`` (applied on
CUDA only).  On CPU none of them may change a number: the checkpoints of a run with all of them set are bitwise those
of a run without; the batch source hands out exactly ``dataset.batch``'s batches.  The fp16 run needs CUDA and is
skipped without it."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion import configs  # noqa: E402

CUDA = torch.cuda.is_available()


def _toy(n_iters=12, **compute):
    config = configs.get_config("toy_2d")
    config.training.n_iters = n_iters
    config.training.batch_size = 64
    config.training.snapshot_freq = 0
    config.training.progress = False
    config.model.nf = 32
    with config.ignore_type():                   # wrong types too: what a JSON config or an override can carry
        for k, v in compute.items():
            config.compute[k] = v
    return config


def _train(tmp_path, name, config, device=None):
    from sde_diffusion.run.train import train
    out = train(config, str(tmp_path / name), device=device)
    return out, torch.load(out["checkpoint"], weights_only=True)


@pytest.mark.parametrize("key, value, message", [
    ("dataloader_workers", -1, "config key 'compute.dataloader_workers' must be an integer >= 0 (0 = batches "
                               "assembled in the loop), got -1"),
    ("pin_memory", "yes", "config key 'compute.pin_memory' must be true or false, got 'yes' (str)"),
    ("cudnn_benchmark", 1, "config key 'compute.cudnn_benchmark' must be true or false, got 1 (int)"),
    ("tf32", None, "config key 'compute.tf32' must be true or false, got None (NoneType)"),
])
def test_bad_values_are_one_line(key, value, message):
    from sde_diffusion.configs import validation
    config = _toy(**{key: value})
    with pytest.raises(configs.ConfigError) as e:
        validation.validate(config, "train")
    assert str(e.value) == message


def test_fp16_on_cpu_is_a_config_error_before_anything_is_written(tmp_path):
    config = _toy(autocast="fp16")
    with pytest.raises(configs.ConfigError) as e:
        _train(tmp_path, "w", config, device="cpu")
    assert str(e.value) == ("config key 'compute.autocast' = 'fp16' needs a CUDA device (float16 autocast with a "
                            "gradient scaler), training runs on cpu; use bf16 (CPU or CUDA) or none")
    assert not (tmp_path / "w").exists()


def test_batch_source_hands_out_the_datasets_batches():
    from sde_diffusion.data import ArrayDataset
    from sde_diffusion.run.prefetch import BatchSource
    g = torch.Generator().manual_seed(0)
    ds = ArrayDataset(torch.randint(0, 256, (40, 1, 4, 4), generator=g, dtype=torch.uint8),
                      torch.randint(0, 10, (40,), generator=g), levels=256, random_flip=True)
    with BatchSource(ds, 8, seed=3, workers=3, pin=True) as src:
        for step in list(range(2, 12)) + [15, 16]:           # a jump, as a resume would make
            x, y = src.get(step)
            x_ref, y_ref = ds.batch(step, 8, 3)
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref), step
    assert BatchSource(ds, 8, 3, workers=0).get(5)[0].equal(ds.batch(5, 8, 3)[0])


def test_cuda_flags_workers_and_pinning_leave_cpu_training_bitwise_unchanged(tmp_path):
    # (cudnn.benchmark is set by set_deterministic on every device; only compute.* must leave the rest alone)
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    _, s0 = _train(tmp_path, "plain", _toy(dataloader_workers=0, pin_memory=False, cudnn_benchmark=False,
                                           tf32=False), device="cpu")
    _, s1 = _train(tmp_path, "flags", _toy(dataloader_workers=2, pin_memory=True, cudnn_benchmark=True,
                                           tf32=True), device="cpu")
    for part in ("model", "ema"):
        a, b = s0[part], s1[part]
        a, b = (a["model"], b["model"]) if part == "ema" else (a, b)
        for k in a:
            assert torch.equal(a[k], b[k]), (part, k)
    assert flags == (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)   # untouched on CPU
    assert "grad_scaler" not in s1


def test_resumed_run_with_workers_is_the_uninterrupted_run(tmp_path):
    config = _toy(n_iters=8, dataloader_workers=2)
    _, full = _train(tmp_path, "full", config, device="cpu")
    part = _toy(n_iters=5, dataloader_workers=2)
    _train(tmp_path, "split", part, device="cpu")
    _, resumed = _train(tmp_path, "split", config, device="cpu")
    for k in full["model"]:
        assert torch.equal(full["model"][k], resumed["model"][k]), k


@pytest.mark.skipif(not CUDA, reason="fp16 autocast with a GradScaler needs CUDA")
def test_fp16_training_on_cuda_is_the_fp32_training_within_5_percent(tmp_path):
    base, _ = _train(tmp_path, "fp32", _toy(n_iters=30), device="cuda")
    half, state = _train(tmp_path, "fp16", _toy(n_iters=30, autocast="fp16"), device="cuda")
    assert all(v.dtype == torch.float32 for v in state["model"].values())   # master weights stay float32
    assert "grad_scaler" in state and state["grad_scaler"]["scale"] > 0
    assert abs(half["loss"] - base["loss"]) <= 0.05 * base["loss"], (half["loss"], base["loss"])
