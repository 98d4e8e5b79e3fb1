"""Smoke test of the peers benchmark (``experiments/compare_peers.py --quick``): it runs ours, diffusers and
k-diffusion side by side and writes its tables and plots; its own check asserts that our DPM-Solver++(2M) and
k-diffusion's ``sample_dpmpp_2m`` — the same algorithm on the same Karras grid — reach the same error.  Skipped when
diffusers or k-diffusion is not importable."""
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
