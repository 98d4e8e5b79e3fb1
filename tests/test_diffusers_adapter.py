"""Models from elsewhere (issue 16): a diffusers ``UNet2DModel`` and its scheduler config through
``sde_diffusion.external`` sample with our DDIM and DPM-Solver++(2M) exactly as diffusers' own schedulers do.

A tiny random-weight UNet2DModel (8x8, block_out_channels (16, 32), one layer per block) is ``save_pretrained`` to a
temporary folder together with its scheduler config and loaded back through the adapter in float64.  Both sides start
from the same x_T and walk the same timesteps.  What remains is diffusers' float32: its ``alphas_cumprod`` is a float32
cumulative product (ours is float64), and ``DPMSolverMultistepScheduler.step`` casts the sample to float32 for the
update.  With the scheduler's table replaced by our float64 one, DDIM agrees to rounding (measured 5e-16 relative) and
DPM-Solver++(2M) to float32 arithmetic (measured 2e-7 relative).  Random weights make eps-model samples large (x0_hat
= (x - sigma eps) / a with a ~ 1e-2 at the top level), so differences are relative to max |x|.
"""
import json
import os

import numpy as np
import pytest
import torch

import solvers
from sde_diffusion import external
from sde_diffusion.discrete_vp import DiscreteVP, beta_table

diffusers = pytest.importorskip("diffusers")
F64 = dict(dtype=torch.float64)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

TABLES = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
          "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
          "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2")}


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 layers_per_block=1, norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


@pytest.fixture(scope="module")
def saved(unet, tmp_path_factory):
    """folder(table, prediction_type): the UNet and a DDIMScheduler config saved side by side (bare layout)."""
    cache = {}

    def make(table, prediction_type):
        key = (table, prediction_type)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"unet_{table}_{prediction_type}")
            unet.save_pretrained(str(d))
            diffusers.DDIMScheduler(**TABLES[table], prediction_type=prediction_type, clip_sample=False,
                                    set_alpha_to_one=True, steps_offset=0).save_pretrained(str(d))
            cache[key] = str(d)
        return cache[key]
    return make


def _x_T(seed, n=2):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), **F64)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _their_loop(sched, unet, x, **step_kw):
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, **step_kw).prev_sample
    return x


# ------------------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize("table", sorted(TABLES))
def test_beta_tables_match_diffusers(table):
    """Our float64 beta tables equal diffusers' float32 ones to float32 rounding; the cumulative products differ by
    diffusers' float32 cumprod (measured 4e-7, 9e-7, 1.3e-5 relative for linear, scaled_linear, cosine)."""
    sched = diffusers.DDIMScheduler(**TABLES[table])
    ours = beta_table(**{k: v for k, v in TABLES[table].items() if k != "beta_schedule"},
                      schedule=TABLES[table]["beta_schedule"])
    assert float(((ours - sched.betas.double()) / ours).abs().max()) < 1e-6
    path = DiscreteVP(ours, table)
    assert float(((path.alphas_cumprod - sched.alphas_cumprod.double()) / path.alphas_cumprod).abs().max()) < 3e-5


def test_discrete_vp_path_meets_the_chain_at_its_levels():
    """Level i sits at t = (i + 1) / N with exactly abar_i; lambda -> t is the exact inverse; the one-step transition
    at a level is DDPM's step with beta_i; the derivatives are those of (a, sigma) (central differences)."""
    path = DiscreteVP(beta_table("squaredcos_cap_v2"), "cos")
    t = path.level_times()
    a, s = path.marginal_coeffs(t)
    assert torch.allclose(a ** 2, path.alphas_cumprod, rtol=1e-13, atol=0)
    assert torch.allclose(a ** 2 + s ** 2, torch.ones_like(a), atol=1e-15)
    assert torch.allclose(path.t_from_log_snr(path.log_snr(t)), t, rtol=0, atol=1e-14)
    x = torch.randn(4, 3, **F64)
    f, G = path.discretize(x, t[10], 1.0 / path.N)
    b = path.discrete_betas[10]
    assert torch.allclose(x + f, torch.sqrt(1 - b) * x, atol=1e-15) and torch.allclose(G, torch.sqrt(b))
    tt = torch.tensor([0.0123, 0.5005, 0.9705], **F64)      # inside segments (beta jumps at the knots)
    h = 1e-7
    (a1, s1), (a0, s0) = path.marginal_coeffs(tt + h), path.marginal_coeffs(tt - h)
    da, ds = path.marginal_coeffs_dt(tt)
    assert torch.allclose((a1 - a0) / (2 * h), da, rtol=1e-6) and torch.allclose((s1 - s0) / (2 * h), ds, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("table,prediction_type", [("linear", "epsilon"), ("squaredcos_cap_v2", "v_prediction"),
                                                   ("scaled_linear", "epsilon")])
def test_our_ddim_equals_diffusers_ddim_scheduler(saved, table, prediction_type):
    """DDIM, eta = 0, 10 steps, leading spacing: our ``leading`` schedule is DDIMScheduler's timesteps, every UNet
    call happens at those integer timesteps, and the samples agree to 1e-12 relative with the same float64 table
    (measured 1e-16 to 5e-16), to 1e-5 with diffusers' float32 table (measured 5e-9, 5e-7, 3e-7)."""
    m = external.load_diffusers(saved(table, prediction_type), dtype=torch.float64)
    assert m.shape == (3, 8, 8) and m.model.output == external.PREDICTION_TYPES[prediction_type]
    n, x_T = 10, _x_T(1)
    seen = []
    fn = m.model.fn
    m.model.fn = lambda x, ts: seen.append(ts.clone()) or fn(x, ts)
    with torch.no_grad():
        ours = solvers.sample(m.sde, m.model, x_T.shape, "ddim", n, x_init=x_T, schedule="leading", **F64)
    m.model.fn = fn
    sched = diffusers.DDIMScheduler.from_pretrained(saved(table, prediction_type))
    sched.set_timesteps(n)
    assert torch.equal(torch.stack([s[0] for s in seen]), sched.timesteps.to(torch.float64))
    assert torch.allclose(ours.timesteps[:-1], m.level_times(sched.timesteps), rtol=0, atol=1e-14)
    theirs32 = _their_loop(sched, m.unet, x_T.clone(), eta=0.0)
    sched.alphas_cumprod = m.sde.alphas_cumprod.clone()         # the same float64 table on both sides
    theirs64 = _their_loop(sched, m.unet, x_T.clone(), eta=0.0)
    assert _rel(ours.samples, theirs64) < 1e-12
    assert _rel(ours.samples, theirs32) < 1e-5


@pytest.mark.parametrize("table,prediction_type,spacing", [("linear", "epsilon", "linspace"),
                                                           ("squaredcos_cap_v2", "v_prediction", "trailing")])
def test_our_dpm_solver_pp_2m_equals_diffusers(saved, table, prediction_type, spacing):
    """DPM-Solver++(2M), 10 steps, final step to sigma = 0 (``final_sigmas_type="zero"``, ``lower_order_final``):
    ours on diffusers' timesteps (``linspace`` spacing: its grid as a custom schedule; ``trailing``: our own
    ``trailing`` schedule) vs ``DPMSolverMultistepScheduler`` with our float64 table.  diffusers casts the sample to
    float32 inside ``step``: agreement to 1e-5 relative (measured 2.3e-7 and 1.4e-7)."""
    folder = saved(table, prediction_type)
    m = external.load_diffusers(folder, dtype=torch.float64)
    n, x_T = 10, _x_T(2)
    sched = diffusers.DPMSolverMultistepScheduler.from_pretrained(
        folder, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
        final_sigmas_type="zero", timestep_spacing=spacing, thresholding=False)
    sched.alphas_cumprod = m.sde.alphas_cumprod.clone()
    sched.set_timesteps(n)
    schedule = m.level_times(sched.timesteps) if spacing == "linspace" else spacing
    with torch.no_grad():
        ours = solvers.sample(m.sde, m.model, x_T.shape, "dpm_solver", n, x_init=x_T, schedule=schedule,
                              order=2, variant="multistep", prediction="x0", **F64)
    assert torch.allclose(ours.timesteps[:-1], m.level_times(sched.timesteps), rtol=0, atol=1e-14)
    theirs = _their_loop(sched, m.unet, x_T.clone())
    assert ours.nfe == n
    assert _rel(ours.samples, theirs) < 1e-5


def test_pipeline_layout_and_float32(unet, tmp_path):
    """A DDPMPipeline folder (unet/ + scheduler/) loads too; in float32 our DDIM stays within 1e-5 relative of the
    float64 run (float32 UNet arithmetic; measured 2.5e-7)."""
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2",
                                                                               prediction_type="v_prediction"))
    pipe.save_pretrained(str(tmp_path / "pipe"))
    m32 = external.load_diffusers(str(tmp_path / "pipe"))
    m64 = external.load_diffusers(str(tmp_path / "pipe"), dtype=torch.float64)
    assert m32.prediction_type == "v_prediction" and m32.sde.schedule_name == "squaredcos_cap_v2"
    x_T = _x_T(3)
    with torch.no_grad():
        a = solvers.sample(m32.sde, m32.model, x_T.shape, "ddim", 5, x_init=x_T.float(), schedule="trailing")
        b = solvers.sample(m64.sde, m64.model, x_T.shape, "ddim", 5, x_init=x_T, schedule="trailing", **F64)
    assert a.samples.dtype == torch.float32
    assert _rel(a.samples.double(), b.samples) < 1e-5


def test_learned_range_variance_channels_become_the_learned_variance():
    """A UNet with 2C outputs and variance_type learned_range: the first C channels are the prediction, the other C
    (u in [-1, 1]) the learned variance's interpolation frac = (u + 1) / 2 (Nichol & Dhariwal 2021, eq. 15)."""
    torch.manual_seed(1)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=6, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D")).double()
    m = external.from_unet(net, {"variance_type": "learned_range", "beta_schedule": "squaredcos_cap_v2"})
    assert m.model.learned_variance
    x, t = _x_T(4), m.level_times([500])
    with torch.no_grad():
        pred = m.model.predict(m.sde, x, t)
        raw = net(x, torch.tensor([500.0], **F64)).sample
    assert torch.allclose(pred.value, raw[:, :3]) and torch.allclose(pred.log_variance_frac, (raw[:, 3:] + 1) / 2)
    plain = external.from_unet(net, {"beta_schedule": "squaredcos_cap_v2"})
    assert not plain.model.learned_variance


# ------------------------------------------------------------------------------------------------ errors
def test_unusable_models_and_configs_give_one_clear_error(unet, tmp_path):
    with pytest.raises(external.ExternalModelError, match="not a folder"):
        external.load_diffusers(str(tmp_path / "missing"))
    bare = tmp_path / "bare"
    unet.save_pretrained(str(bare))
    with pytest.raises(external.ExternalModelError, match="no scheduler config"):
        external.load_diffusers(str(bare))
    for cfg, msg in [({"beta_schedule": "sigmoid"}, "unsupported beta_schedule"),
                     ({"prediction_type": "flow"}, "unsupported prediction_type"),
                     ({"rescale_betas_zero_snr": True}, "zero_snr|pure noise")]:
        with pytest.raises(external.ExternalModelError, match=msg):
            external.from_unet(unet, cfg)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(external.ExternalModelError, match="only diffusers' UNet2DModel"):
        external.load_diffusers(str(other), scheduler_config={})


def test_missing_diffusers_says_how_to_install(monkeypatch, saved):
    import sys
    monkeypatch.setitem(sys.modules, "diffusers", None)          # import diffusers -> ImportError
    with pytest.raises(external.ExternalModelError, match="pip install diffusers"):
        external.load_diffusers(saved("linear", "epsilon"))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_samples_a_diffusers_model(saved, tmp_path, capsys):
    """``main.py --mode sample --config.model.source=diffusers --config.model.path=DIR --workdir W`` (no run in W,
    no --config) writes samples.npz / samples.png under W/samples/diffusers: the UNet's shape, in [0, 1], equal to
    our DDIM on the adapter with batch 0's seed."""
    from sde_diffusion import cli
    folder, wd = saved("linear", "epsilon"), str(tmp_path / "w")
    code = cli.cli(["main.py", "--mode", "sample", "--workdir", wd, "--device", "cpu",
                    "--config.model.source=diffusers", f"--config.model.path={folder}",
                    "--config.sampling.method=ddim", "--config.sampling.num_steps=4",
                    "--config.sampling.schedule=leading", "--config.sampling.num_samples=3",
                    "--config.sampling.batch_size=3", "--config.sampling.seed=7"])
    out = capsys.readouterr()
    assert code == 0, out.err
    npz = os.path.join(wd, "samples", "diffusers", "samples.npz")
    assert npz in out.out and os.path.isfile(npz.replace(".npz", ".png"))
    x = np.load(npz)["samples"]
    assert x.shape == (3, 3, 8, 8) and x.min() >= 0 and x.max() <= 1
    m = external.load_diffusers(folder)
    from sde_diffusion.data import mix_seed
    from sde_diffusion.run.sampling import SAMPLE_BATCH_SALT
    seed = mix_seed(7, SAMPLE_BATCH_SALT, 0)         # --mode sample: batch i draws from its own seed (one batch here)
    with torch.no_grad():
        ref = solvers.sample(m.sde, m.model, (3, 3, 8, 8), "ddim", 4, generator=torch.Generator().manual_seed(seed),
                             schedule="leading", eps=1e-5)
    np.testing.assert_allclose(x, ((ref.samples + 1) / 2).clamp(0, 1).numpy(), atol=1e-6)
    info = json.load(open(os.path.join(wd, "samples", "diffusers", "sampling_config.json")))
    assert info["model"] == {"source": "diffusers", "path": folder}
    code = cli.cli(["main.py", "--mode", "sample", "--workdir", wd, "--config.model.source=diffusers",
                    "--config.model.path=" + str(tmp_path / "nothing")])
    assert code == 1 and "is not a folder" in capsys.readouterr().err
