"""``experiments/throughput.py``'s side-by-side benchmark: the peer rows exist, the peers are the sizes they claim,
a missing score_sde checkout is skipped with a message, and the loader drives a checkout through score_sde_pytorch's
own API (a stub checkout with its documented layout stands in for the real one, which this machine has not got).
Speed itself is measured by the script, never asserted here."""
from __future__ import annotations

import csv
import os
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from experiments import throughput  # noqa: E402
from sde_diffusion import configs, networks  # noqa: E402


def _diffusers():
    """diffusers is installed (found without importing it: its import is slow)."""
    import importlib.util
    return importlib.util.find_spec("diffusers") is not None


# score_sde_pytorch's layout and the API the loader uses (configs/vp/ddpm/cifar10.py: get_config(); models/ddpm.py:
# DDPM(config) called as model(x, labels); models/ema.py: ExponentialMovingAverage(parameters, decay).update(
# parameters); losses.py: get_optimizer, optimization_manager, get_step_fn(sde, train, optimize_fn, reduce_mean,
# continuous, likelihood_weighting) -> step_fn(state, batch); sde_lib.py: VPSDE(beta_min, beta_max, N)), in miniature
STUB = {
    "configs/vp/ddpm/cifar10.py": """
        import ml_collections, torch
        def get_config():
            c = ml_collections.ConfigDict()
            c.training = ml_collections.ConfigDict(dict(continuous=False, reduce_mean=True, likelihood_weighting=False))
            c.data = ml_collections.ConfigDict(dict(image_size=32, num_channels=3, centered=True))
            c.model = ml_collections.ConfigDict(dict(name="ddpm", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                attn_resolutions=(16,), dropout=0.1, beta_min=0.1, beta_max=20.0, num_scales=1000, ema_rate=0.9999))
            c.optim = ml_collections.ConfigDict(dict(optimizer="Adam", lr=2e-4, beta1=0.9, eps=1e-8, weight_decay=0,
                warmup=5000, grad_clip=1.0))
            c.device = torch.device("cpu")
            return c
        """,
    "models/ddpm.py": """
        import torch
        from torch import nn
        class DDPM(nn.Module):
            def __init__(self, config):
                super().__init__()
                nf, ch = config.model.nf, config.data.num_channels
                self.embed = nn.Embedding(config.model.num_scales, nf)
                self.conv_in = nn.Conv2d(ch, nf, 3, padding=1)
                self.norm = nn.GroupNorm(32, nf)
                self.conv_out = nn.Conv2d(nf, ch, 3, padding=1)
            def forward(self, x, labels):
                assert labels.dtype == torch.long
                h = self.conv_in(x) + self.embed(labels)[:, :, None, None]
                return self.conv_out(torch.nn.functional.silu(self.norm(h)))
        """,
    "models/ema.py": """
        import torch
        class ExponentialMovingAverage:
            def __init__(self, parameters, decay):
                self.decay, self.shadow_params = decay, [p.clone().detach() for p in parameters]
                self.updates = 0
            def update(self, parameters):
                self.updates += 1
                with torch.no_grad():
                    for s, p in zip(self.shadow_params, parameters):
                        s.sub_((1 - self.decay) * (s - p))
        """,
    "sde_lib.py": """
        import torch
        class VPSDE:
            def __init__(self, beta_min, beta_max, N):
                self.N = N
                betas = torch.linspace(beta_min / N, beta_max / N, N)
                self.sqrt_alphas_cumprod = torch.cumprod(1 - betas, 0).sqrt()
                self.sqrt_1m_alphas_cumprod = (1 - self.sqrt_alphas_cumprod ** 2).sqrt()
        """,
    "losses.py": """
        import torch
        STEPS = []
        def get_optimizer(config, params):
            return torch.optim.Adam(params, lr=config.optim.lr, betas=(config.optim.beta1, 0.999), eps=config.optim.eps)
        def optimization_manager(config):
            def optimize_fn(optimizer, model, step, lr=config.optim.lr, warmup=config.optim.warmup,
                            grad_clip=config.optim.grad_clip):
                for g in optimizer.param_groups:
                    g["lr"] = lr * min(step / warmup, 1.0)
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
                optimizer.step()
            return optimize_fn
        def get_step_fn(sde, train, optimize_fn=None, reduce_mean=False, continuous=True, likelihood_weighting=False):
            assert train and not continuous and reduce_mean
            def step_fn(state, batch):
                model, optimizer = state["model"], state["optimizer"]
                optimizer.zero_grad()
                labels = torch.randint(0, sde.N, (batch.shape[0],))
                noise = torch.randn_like(batch)
                a, s = sde.sqrt_alphas_cumprod[labels], sde.sqrt_1m_alphas_cumprod[labels]
                loss = (model(a[:, None, None, None] * batch + s[:, None, None, None] * noise, labels)
                        - noise).square().mean()
                loss.backward()
                optimize_fn(optimizer, model, step=state["step"])
                state["step"] += 1
                state["ema"].update(model.parameters())
                STEPS.append(state["step"])
                return loss
            return step_fn
        """,
}


@pytest.fixture
def score_sde_stub(tmp_path, monkeypatch):
    root = tmp_path / "score_sde_pytorch"
    for rel, text in STUB.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield str(root)
    for name in set(sys.modules) - before:            # the stub's top-level modules must not leak into other tests
        if name.split(".")[0] in throughput.SCORE_SDE_MODULES:
            del sys.modules[name]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return {r["network"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("with_diffusers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_quick_benchmark_has_every_peer_row_and_a_profile(tmp_path, score_sde_stub, with_diffusers):
    """(diffusers' import alone takes 5-30 s here, so its variant is slow; ``test_packaging``'s quick run of the
    script checks its row in the default set: ``--quick`` asserts it whenever diffusers is importable.)"""
    out = tmp_path / "out"
    peers = "ours,ours_ref,score_sde" + (",diffusers" if with_diffusers else "")
    throughput.main(["--quick", "--out", str(out), "--no-progress", "--variants", "none", "--profile",
                     "--peers", peers, "--score-sde", score_sde_stub])
    rows = _rows(out / "peers.csv")
    expected = {"ours", "ours_ref", "score_sde"} | ({"diffusers"} if with_diffusers and _diffusers() else set())
    assert set(rows) == expected
    assert rows["ours_ref"]["params"] == rows["ours"]["params"]           # the same network, other kernels
    if "diffusers" in expected:
        assert rows["diffusers"]["params"] == rows["ours"]["params"]      # DDPM's architecture at the same size
    for r in rows.values():
        assert float(r["step_ms"]) > 0 and float(r["evals_per_s"]) > 0 and float(r["activations_MB"]) > 0
    assert float(rows["ours"]["ours_step_speedup"]) == 1.0
    assert len(sys.modules["losses"].STEPS) >= 3                        # the checkout's own step_fn ran
    profile = _rows(out / "profile.csv")
    assert set(profile) == expected
    for r in profile.values():
        cats = sum(float(r[f"{c}_pct"]) for c in throughput.PROFILE_CATEGORIES)
        phases = sum(float(r[f"{c}_pct"]) for c in ("forward", "backward", "update"))
        assert abs(cats - 100) < 0.1 and abs(phases - 100) < 0.1
        assert float(r["conv3x3_pct"]) > 0
    assert float(profile["ours"]["attention_pct"]) > 0 and float(profile["ours"]["conv1x1_pct"]) == 0
    assert float(profile["ours_ref"]["conv1x1_pct"]) > 0
    text = (out / "results.md").read_text()
    assert "the peers table has our row" in text


def test_a_missing_score_sde_checkout_is_skipped_with_a_message(tmp_path):
    mods, why = throughput.load_score_sde(None)
    assert mods is None and "--score-sde PATH" in why
    mods, why = throughput.load_score_sde(str(tmp_path))
    assert mods is None and "is not a score_sde_pytorch checkout (missing models/ddpm.py" in why


@pytest.mark.slow
@pytest.mark.skipif(not _diffusers(), reason="diffusers is not importable")
def test_the_diffusers_peer_is_ddpm_cifar10_at_our_size():
    from diffusers import UNet2DModel
    config = configs.get_config("vp_cifar")
    kw = throughput.diffusers_ddpm_kwargs(config)
    assert kw["block_out_channels"] == (128, 256, 256, 256) and kw["layers_per_block"] == 2
    assert kw["down_block_types"] == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert kw["up_block_types"] == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert kw["dropout"] == 0.1
    with torch.device("meta"):
        theirs = UNet2DModel(**kw)
        ours = networks.get_network(config)
    assert networks.count_parameters(theirs) == networks.count_parameters(ours) == 35_746_307
