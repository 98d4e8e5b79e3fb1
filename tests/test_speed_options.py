"""The single-device speed options (``config.compute``) leave the numbers' meaning unchanged.

Each option is compared with an independent fact: the EMA and Adam with their formulas written out in float64, the
bf16 loss with the float32 loss of the same batch and noise (bf16 keeps 8 mantissa bits: relative rounding 2^-9 per
operation; through a few layers the loss moves by well under 3 %, the bound used), channels_last with the contiguous
layout (the same kernels' maths: float32 rounding only).  Speed itself is measured in ``experiments/throughput.py``,
not here.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sde_diffusion import configs  # noqa: E402
from sde_diffusion.ema import ExponentialMovingAverage  # noqa: E402


def _net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 3))


@pytest.mark.parametrize("foreach", [True, False])
def test_ema_update_is_the_formula(foreach):
    model = _net()
    ema = ExponentialMovingAverage(model, decay=0.9, foreach=foreach)
    expected = [p.detach().double().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        d = min(0.9, (1 + k) / (10 + k))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
        ema.update(model)
    for e, p in zip(expected, ema.model.parameters()):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-6)


def test_foreach_ema_equals_the_loop_ema():
    model = _net()
    a = ExponentialMovingAverage(model, decay=0.999, foreach=True)
    b = ExponentialMovingAverage(model, decay=0.999, foreach=False)
    assert a.foreach and not b.foreach
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1).add_(0.01)
        a.update(model)
        b.update(model)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-8)   # float32 lerp either way: observed bitwise


def _adam_reference(p0, grads, lr, b1, b2, eps, wd):
    """Adam (Kingma & Ba, Algorithm 1, with PyTorch's L2 weight decay) in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double() + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop", "auto"])
def test_every_adam_implementation_is_adam(impl):
    from sde_diffusion.run.train import _fused_supported, build_optimizer
    config = configs.get_config("toy_2d")
    config.compute.adam_impl = impl
    config.optim.weight_decay = 0.01
    w = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(3, 4))
    if impl == "fused" and not _fused_supported([w]):
        pytest.skip("fused Adam is not supported by this PyTorch on CPU")
    opt = build_optimizer(config, [w])
    p0 = w.detach().clone()
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(3, 4, generator=g) for _ in range(7)]
    for grad in grads:
        w.grad = grad.clone()
        opt.step()
    o = config.optim
    expected = _adam_reference(p0, grads, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_bad_compute_values_are_one_line():
    from sde_diffusion.configs import validation
    for key, value, message in [
            ("threads", -1, "config key 'compute.threads' must be an integer >= 0 (0 = PyTorch's default), got -1"),
            ("grad_accum", 3, "config key 'compute.grad_accum' must divide training.batch_size = 256 (micro-batches "
                              "of equal size), got 3"),
            ("autocast", "fp8", "config key 'compute.autocast' must be one of none, bf16, fp16, auto, got 'fp8'"),
            ("adam_impl", "fast", "config key 'compute.adam_impl' must be one of auto, fused, foreach, loop, got "
                                  "'fast'"),
            ("dist_timeout", 0, "config key 'compute.dist_timeout' must be a finite number > 0 (seconds), got 0")]:
        config = configs.get_config("toy_2d")
        config.compute[key] = value
        with pytest.raises(configs.ConfigError) as e:
            validation.validate(config, "train")
        assert str(e.value) == message


def _loss_on_one_batch(config, model, autocast=False, channels_last=False):
    from sde_diffusion.losses import get_loss_fn
    sde = configs.build_sde(config)
    loss_fn = get_loss_fn(config, sde)
    g = torch.Generator().manual_seed(5)
    shape = (16, config.data.num_channels, config.data.image_size, config.data.image_size)
    x = torch.rand(shape, generator=g) * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(11)                                     # the same t and z for every variant
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return float(loss_fn(model, x, None, train=False))


def _small_digits():
    from sde_diffusion.networks import get_network
    config = configs.get_config("vp_digits")
    config.model.nf = 16
    config.model.num_classes = 0
    torch.manual_seed(0)
    model = get_network(config)
    with torch.no_grad():                     # a trained-looking network: the zero-initialised output layer is not
        for p in model.parameters():          # all that is tested
            p.add_(0.02 * torch.randn_like(p))
    return config, model


def test_bf16_autocast_loss_is_the_fp32_loss_within_3_percent():
    config, model = _small_digits()
    fp32 = _loss_on_one_batch(config, model)
    bf16 = _loss_on_one_batch(config, model, autocast=True)
    assert abs(bf16 - fp32) <= 0.03 * abs(fp32), (bf16, fp32)
    assert bf16 != fp32                       # autocast really ran in bf16


def test_channels_last_loss_is_the_contiguous_loss():
    config, model = _small_digits()
    fp32 = _loss_on_one_batch(config, model)
    nhwc = _loss_on_one_batch(config, model.to(memory_format=torch.channels_last), channels_last=True)
    assert abs(nhwc - fp32) <= 1e-5 * abs(fp32), (nhwc, fp32)


def _train_toy(tmp_path, name, **compute):
    from sde_diffusion.run.train import train
    config = configs.get_config("toy_2d")
    config.training.n_iters = 15
    config.training.batch_size = 64
    config.training.snapshot_freq = 0
    config.training.progress = False
    config.model.nf = 32
    for k, v in compute.items():
        config.compute[k] = v
    out = train(config, str(tmp_path / name))
    state = torch.load(out["checkpoint"], weights_only=True)
    return out, state


def test_training_with_every_cpu_option_on_stays_the_same_training(tmp_path):
    base, s0 = _train_toy(tmp_path, "base", adam_impl="loop", ema_foreach=False)
    fast, s1 = _train_toy(tmp_path, "fast", adam_impl="auto", ema_foreach=True, channels_last=True)
    for k in s0["model"]:                     # fused / foreach Adam and foreach EMA: float rounding only
        torch.testing.assert_close(s1["model"][k], s0["model"][k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s1["ema"]["model"][k], s0["ema"]["model"][k], rtol=1e-4, atol=1e-5)
    bf16, s2 = _train_toy(tmp_path, "bf16", autocast="bf16")
    assert all(v.dtype == torch.float32 for v in s2["model"].values())   # master weights stay float32
    assert abs(bf16["loss"] - base["loss"]) <= 0.05 * base["loss"], (bf16["loss"], base["loss"])


def test_threads_are_set_at_start_up(tmp_path, capsys):
    import main as main_cli
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code = main_cli.cli(["main.py", "--mode", "train", "--config", "toy_2d", "--workdir", str(tmp_path / "w"),
                             "--config.training.n_iters=2", "--config.training.snapshot_freq=0",
                             "--config.model.nf=16", "--config.compute.threads=1"])
        assert code == 0
        assert torch.get_num_threads() == 1
        code = main_cli.cli(["main.py", "--mode", "train", "--config", "toy_2d", "--workdir", str(tmp_path / "v"),
                             "--config.compute.threads=-1"])
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "error: config key 'compute.threads' must be an integer >= 0 (0 = PyTorch's default), got -1"
        assert not (tmp_path / "v").exists()
    finally:
        torch.set_num_threads(before)


def _compile_usable():
    try:
        import torch._inductor  # noqa: F401
        import torch._dynamo  # noqa: F401
    except Exception:            # noqa: BLE001 — any import failure means: no compile here
        return False
    return hasattr(torch, "compile")


@pytest.mark.slow
@pytest.mark.skipif(not _compile_usable(), reason="torch.compile (inductor) is not usable here")
def test_compiled_training_is_the_same_training(tmp_path):
    base, s0 = _train_toy(tmp_path, "base")
    comp, s1 = _train_toy(tmp_path, "compiled", compile=True)
    assert not any(k.startswith("_orig_mod") for k in s1["model"])          # the checkpoint holds the plain module
    for k in s0["model"]:
        torch.testing.assert_close(s1["model"][k], s0["model"][k], rtol=1e-3, atol=1e-4)


def test_autocast_auto_is_bf16_exactly_where_the_device_computes_it_natively(tmp_path, monkeypatch):
    """``compute.autocast=auto``: bf16 on a CPU with AVX512-BF16 / AMX, float32 on one without (emulated bf16 is
    several times slower there); an auto run on a native-bf16 CPU is the bf16 run, bit for bit."""
    from sde_diffusion.run import train as train_lib
    cpu = torch.device("cpu")
    monkeypatch.setattr(train_lib, "native_cpu_bf16", lambda: False)
    assert train_lib.resolve_autocast("auto", cpu) == "none"
    assert train_lib.resolve_autocast("bf16", cpu) == "bf16" and train_lib.resolve_autocast("none", cpu) == "none"
    monkeypatch.setattr(train_lib, "native_cpu_bf16", lambda: True)
    assert train_lib.resolve_autocast("auto", cpu) == "bf16"
    _, auto = _train_toy(tmp_path, "auto", autocast="auto")
    _, bf16 = _train_toy(tmp_path, "bf16", autocast="bf16")
    for k in bf16["model"]:
        assert torch.equal(auto["model"][k], bf16["model"][k]), k
