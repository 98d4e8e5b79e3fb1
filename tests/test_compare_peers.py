"""Smoke test of the peers benchmark (``experiments/compare_peers.py --quick``): it runs ours, diffusers and
k-diffusion side by side and writes its tables and plots; its own check asserts that our DPM-Solver++(2M) and
k-diffusion's ``sample_dpmpp_2m`` — the same algorithm on the same Karras grid — reach the same error; here also the
floor-free flow-map error: the same algorithm on the same grid gives the same value in both libraries, the closed-form
reference scores fresh exact flow endpoints as zero, and the fitted grid beats the fixed ones.  Skipped when diffusers
or k-diffusion is not importable."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # `experiments` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))


def test_compare_peers_quick(tmp_path):
    pytest.importorskip("diffusers")
    module = importlib.import_module("experiments.compare_peers")
    if module.load_k_diffusion_sampling() is None:
        pytest.skip("k-diffusion's sampling module is not importable")
    res = module.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "## Checks" in text
    for name in ("gauss", "ring"):
        assert (tmp_path / f"results_{name}.csv").is_file()
        assert (tmp_path / f"summary_{name}.csv").is_file()
        assert (tmp_path / f"error_vs_nfe_{name}.png").is_file()
        recs = res[name]["records"]
        families = {r["family"] for r in recs}
        assert {"ours", "diffusers", "k-diffusion"} <= families, families
        assert all(r["nfe"] is None or r["nfe_target"] is None or r["nfe"] <= r["nfe_target"] for r in recs)
        for row in res[name]["summary"]:
            assert row["our error"] is not None and row["peer error"] is not None
        flow = {(r["sampler"], r["schedule"], r["nfe_target"]): r["flow_error"] for r in recs}
        # stochastic samplers have no flow map; every deterministic run has a finite one
        assert all(r["flow_error"] is None for r in recs if "sde" in r["sampler"] or "ancestral" in r["sampler"])
        for nfe in (10, 20):
            ours = flow[("dpm_solver[order=2, variant=multistep]", "edm", nfe)]
            theirs = flow[("k-diff dpmpp_2m", "karras", nfe)]
            assert abs(ours - theirs) <= 0.02 * theirs, (nfe, ours, theirs)
        fitted = flow[("dpm_solver[order=2, variant=multistep]", "optimized", 10)]
        assert fitted < 0.5 * min(flow[("dpm_solver[order=2, variant=multistep]", s, 10)] for s in ("edm", "logsnr"))
        assert all(row["our flow-map error"] is not None for row in res[name]["flow_summary"])


def test_flow_reference_is_exact_on_the_gaussian():
    """The closed-form flow map of the Gaussian target agrees with an independent high-accuracy integration of the
    probability-flow ODE (scipy's DOP853 on the exact score, float64), so the flow-map error measures the sampler."""
    import numpy as np
    import torch
    from scipy.integrate import solve_ivp
    module = importlib.import_module("experiments.compare_peers")
    from experiments.compare_solvers import gauss_target
    from sde_diffusion import sdes
    sde = sdes.VPSDE(0.1, 20.0)
    target = gauss_target(6, 0)
    score = target.dist.score_fn(sde)
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = module.FlowReference(target, sde, score, z)

    def f(t, y):
        x = torch.as_tensor(y, dtype=torch.float64).reshape(3, 6)
        tt = torch.full((3,), t, dtype=torch.float64)
        v = sde.drift(x, tt) - 0.5 * sde.diffusion(tt)[:, None] ** 2 * score(x, tt)     # probability-flow ODE
        return v.reshape(-1).numpy()
    sol = solve_ivp(f, (sde.T, module.EPS), z.reshape(-1).numpy(), method="DOP853", rtol=1e-11, atol=1e-12)
    x_eps = torch.as_tensor(sol.y[:, -1], dtype=torch.float64).reshape(3, 6)
    t = torch.full((3,), module.EPS, dtype=torch.float64)
    a, s = sde.marginal_coeffs(t)
    x0 = (x_eps + s[:, None] ** 2 * score(x_eps, t)) / a[:, None]                          # Tweedie
    assert np.allclose(x0.numpy(), ref.ref.numpy(), rtol=1e-6, atol=1e-8)
    assert ref(ref.ref) == 0.0 and ref(x0) < 1e-5
