"""Smoke test of the process-family comparison (``experiments/compare_processes.py --quick``): VP, EDM, flow matching
and latent flow matching each train a few updates, are sampled by the same solvers at two NFEs and scored by the digits
classifier in data space; the run's own checks (finite samples of data shape in [0, 1] for every cell, the real-data
floor below every model, the requested NFE met) must pass."""
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
