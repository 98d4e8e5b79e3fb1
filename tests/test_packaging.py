"""The package as users install it: a wheel that works outside the checkout, with its ``sde-diffusion`` console
command; and the experiment scripts' shared command-line conventions (``--help``, ``--quick``, ``--out``)."""
import importlib
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: every experiment script (a new one is held to the same conventions automatically)
EXPERIMENTS = sorted(p[:-3] for p in os.listdir(os.path.join(ROOT, "experiments"))
                     if p.endswith(".py") and not p.startswith("_"))


def _copy_sources(dst):
    """The checkout's sources without runs, outputs or build leftovers (the wheel is built from the copy)."""
    skip = shutil.ignore_patterns(".git", "runs", "outputs", "out", "data", "build", "dist", "*.egg-info",
                                  "__pycache__", ".pytest_cache", "docs")
    shutil.copytree(ROOT, dst, ignore=skip)
    return dst


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(str(tmp / "src"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                           "-w", str(tmp / "dist"), src], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "bdist_wheel" in proc.stderr + proc.stdout:
        pytest.skip("this environment's setuptools cannot build wheels (pip install -e .[dev] brings one that can)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (whl,) = [os.path.join(tmp / "dist", f) for f in os.listdir(tmp / "dist") if f.endswith(".whl")]
    return whl


def test_the_wheel_holds_every_package_config_and_the_console_command(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    from sde_diffusion import configs
    for name in configs.CONFIG_NAMES:
        assert f"sde_diffusion/configs/{name}.py" in names, name
    import solvers
    for method in solvers.available():
        module = solvers.get_sampler(method).fn.__module__
        assert module.replace(".", "/") + ".py" in names, module
    for mod in ("sde_diffusion/cli.py", "sde_diffusion/run/train.py", "solvers/base.py", "solvers/schedules.py"):
        assert mod in names
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)
    assert "sde-diffusion = sde_diffusion.cli:run" in entry


def test_the_installed_console_command_trains_and_samples_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), wheel],
                   check=True, capture_output=True, timeout=300)
    script = target / "bin" / "sde-diffusion"
    assert script.is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], cwd=str(tmp_path), env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=600)
    where = subprocess.run([sys.executable, "-c", "import sde_diffusion, solvers; print(sde_diffusion.__file__); "
                            "print(solvers.__file__)"], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout
    wd = str(tmp_path / "w")
    tiny = ["--config.training.n_iters=20", "--config.training.batch_size=32", "--config.training.checkpoint_freq=20",
            "--config.training.snapshot_freq=0", "--config.training.log_freq=10", "--config.training.progress=false",
            "--config.model.nf=32"]
    proc = run("train", "--config", "toy_2d", "--workdir", wd, *tiny)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training done at step 20" in proc.stdout
    proc = run("sample", "--workdir", wd, "--config.sampling.num_samples=16", "--config.sampling.num_steps=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(proc.stdout.split("samples:")[1].split()[0])
    proc = run("bogus", "--workdir", wd)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: unknown command 'bogus'")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_main_py_and_the_subcommand_form_parse_the_same():
    from sde_diffusion import cli
    assert cli._console_argv(["x", "train", "--workdir", "w"]) == ["x", "--mode", "train", "--workdir", "w"]
    assert cli._console_argv(["x", "--mode", "eval", "--workdir", "w"]) == ["x", "--mode", "eval", "--workdir", "w"]
    with pytest.raises(SystemExit, match="unknown command 'trian'"):
        cli._console_argv(["x", "trian"])


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_has_help_quick_and_out(name, capsys):
    mod = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--quick", "--out", "--seed", "--threads"):
        assert flag in text, (name, flag)


def test_throughput_quick_writes_its_table(tmp_path):
    from experiments import throughput
    medians = throughput.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert set(medians) == {"baseline", "fast"} and all(v > 0 for v in medians.values())
    csv = (tmp_path / "throughput.csv").read_text().splitlines()
    assert csv[0].split(",")[:2] == ["variant", "ms_per_update"] and len(csv) == 3
    assert "loss is finite" in (tmp_path / "results.md").read_text()
