"""Smoke test of the process-family comparison (``experiments/compare_processes.py --quick``): VP, EDM, flow matching
and latent flow matching each train a few updates, are sampled by the same solvers at two NFEs and scored by the digits
classifier in data space; the run's own checks (finite samples of data shape in [0, 1] for every cell, the real-data
floor below every model, the requested NFE met, bits/dim of the dequantised digits >= 0 under the adaptive ODE) must
pass."""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:          # `experiments` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))


def test_compare_processes_quick(tmp_path):
    module = importlib.import_module("experiments.compare_processes")
    res = module.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    text = (tmp_path / "results.md").read_text()
    assert "## Checks" in text and "- [ ]" not in text
    for name in ("quality", "training", "winners"):
        assert (tmp_path / f"{name}.csv").is_file()
    assert (tmp_path / "fd_vs_nfe.png").is_file()
    families = set(res["quality"].column("family"))
    assert families == {"vp", "edm", "fm", "ldm"}
    for fam in families:
        assert (tmp_path / f"samples_{fam}.png").is_file()
    # every (family, solver, NFE) cell is there once, with a finite distance and a real coverage count
    rows = res["quality"].rows
    assert len(rows) == len({(r["family"], r["solver"], r["nfe_target"]) for r in rows}) == 4 * 2 * 2
    assert all(0 <= r["coverage"] <= 10 and 0 <= r["confident"] <= 1 for r in rows)
    # test bits/dim (adaptive RK45) of the data-space families: dequantised 17-level digits, so >= 0
    train = {r["family"]: r for r in res["training"].rows}
    for fam in ("vp", "edm", "fm"):
        assert isinstance(train[fam]["bpd"], float) and train[fam]["bpd"] >= 0, train[fam]
        assert train[fam]["bpd_nfe_per_batch"] > 0
    assert train["ldm"].get("bpd") is None
    assert "- [x] every bits/dim is >= 0" in text


def test_a_negative_bits_per_dim_is_reported_as_invalid():
    module = importlib.import_module("experiments.compare_processes")
    ok = module.bpd_cells({"bpd": 2.2, "bpd_stderr": 0.04, "nfe_per_batch": 500.0}, "adaptive rk45", True)
    assert ok == {"bpd": 2.2, "bpd_stderr": 0.04, "bpd_nfe_per_batch": 500.0}
    bad = module.bpd_cells({"bpd": -6.05, "bpd_stderr": 0.24, "nfe_per_batch": 100.0}, "fixed-step heun, 50 steps",
                           False)
    assert bad["bpd"] == "invalid" and bad["bpd_stderr"] is None and "-6.05" in bad["bpd_note"]
    assert "--bpd-solver rk45" in bad["bpd_note"]
