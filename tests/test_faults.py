"""Fault injection: kills, signals, corrupt checkpoints, full disks, concurrent runs and bad input, on toy_2d.

Every check compares with a fact independent of the code under test: the tensors of an uninterrupted run (bitwise),
the SHA-256 of every workdir file before and after, exit codes, the PID of the process holding the lock, and the exact
one-line messages.  Killed / signalled runs are forked children of the test process (no interpreter start-up, so a
dozen kills cost seconds); one test per signal also runs the real ``python main.py`` in a subprocess.  The slow
variants (``-m slow``) repeat the kill test with 30 kills and run the subprocess checks.
"""
import errno
import glob
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import zipfile

import numpy as np
import pytest
import torch

from sde_diffusion import atomic, configs
from sde_diffusion.run import checkpoints as ckpt_lib
from sde_diffusion.run import evaluate as ev
from sde_diffusion.run import lifecycle
from sde_diffusion.run import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
sys.path.insert(0, ROOT)
import main as main_cli  # noqa: E402

sys.path.remove(ROOT)

N_ITERS, CKPT_FREQ = 60, 10
TRAIN = {"training.n_iters": N_ITERS, "training.checkpoint_freq": CKPT_FREQ, "training.batch_size": 64,
         "training.log_freq": 10, "training.snapshot_freq": 0, "training.keep_checkpoints": 3,
         "training.progress": False, "model.dropout": 0.1}
EVAL = {"eval.num_samples": 200, "eval.batch_size": 100, "eval.bpd_num_examples": 60, "eval.bpd_batch_size": 10,
        "eval.bpd_rtol": 1e-3, "eval.bpd_atol": 1e-3, "eval.num_generated": 60, "eval.generate_batch_size": 10,
        "eval.progress": False, "sampling.num_steps": 10}


def toy_config(**extra):
    return configs.apply_overrides(configs.get_config("toy_2d"), dict(TRAIN, **extra))


def cli_args(mode, wd, *extra, config="toy_2d", **over):
    args = ["main.py", "--mode", mode, "--workdir", wd]
    if config:
        args += ["--config", config]
    return args + [f"--config.{k}={v}" for k, v in over.items()] + list(extra)


def run_cli(capsys, args):
    """``main.py`` in this process: (exit code, stdout, stderr lines)."""
    capsys.readouterr()
    code = main_cli.cli(args)
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]


def file_hashes(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def temp_files(folder):
    return glob.glob(os.path.join(folder, "**", ".tmp-*"), recursive=True) + \
        glob.glob(os.path.join(folder, ".tmp-*"))


def steps(wd):
    return [s for s, _ in ckpt_lib.list_checkpoints(wd)]


def assert_bitwise_equal(path_a, path_b):
    """Model, EMA and optimiser tensors of two checkpoint files are bitwise equal (plain torch.load)."""
    a = torch.load(path_a, weights_only=True)
    b = torch.load(path_b, weights_only=True)
    assert a["step"] == b["step"]
    for name, v in a["model"].items():
        assert torch.equal(v, b["model"][name]), name
    for name, v in a["ema"]["model"].items():
        assert torch.equal(v, b["ema"]["model"][name]), name
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == a["step"]
    for pid, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][pid][k]), (pid, k)


# ------------------------------------------------------------------------------------------------ forked children
def fork(fn, log=None):
    """Run ``fn()`` in a forked child (stdout/stderr to ``log``); its return value is the exit code."""
    pid = os.fork()
    if pid == 0:                                                   # pragma: no cover - the child
        code = 0
        try:
            if log:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
                sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
            code = fn() or 0
        except BaseException:                                      # noqa: BLE001
            traceback.print_exc()
            code = 99
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    return pid


def wait(pid, timeout=120.0):
    """Exit code of the child (negative: killed by that signal)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish within {timeout} s")


def wait_for(predicate, timeout=60.0, pid=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if pid is not None and os.waitpid(pid, os.WNOHANG)[0]:
            raise AssertionError("the child ended before the condition held")
        time.sleep(0.005)
    raise AssertionError("timed out")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the same arithmetic in this process, its children and the subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 60-update run (checkpoints 40, 50, 60)."""
    wd = str(tmp_path_factory.mktemp("faults") / "reference")
    train_lib.train(toy_config(), wd, device="cpu")
    assert steps(wd) == [40, 50, 60]
    return wd


def copy_run(reference, tmp_path, name="wd"):
    wd = str(tmp_path / name)
    shutil.copytree(reference, wd)
    return wd


# ------------------------------------------------------------------------------------------------ SIGKILL
def _kill_campaign(reference, wd, kills, seed):
    """``kills`` SIGKILLs: every fourth one inside a checkpoint write (half the bytes in the temporary file), the rest
    after a random delay; after each, every checkpoint on disk loads and verifies.  Then the run finishes and must
    equal the uninterrupted one bit for bit."""
    rng = random.Random(seed)
    config = toy_config()
    done = kills_done = mid_write = 0
    while kills_done < kills:
        during_write = kills_done % 4 == 1

        def child():
            # 50 ms per update: the 10 updates between two checkpoints outlast the longest delay below, so every
            # timed kill lands before the run can finish, however fast the machine
            get_loss = train_lib.get_loss_fn

            def slow_get_loss_fn(*args, **kwargs):
                loss_fn = get_loss(*args, **kwargs)

                def slow(*a, **k):
                    time.sleep(0.05)
                    return loss_fn(*a, **k)
                return slow
            train_lib.get_loss_fn = slow_get_loss_fn
            if during_write:
                def dying_write(data, path, durable=True):
                    with atomic.atomic_path(path) as tmp:
                        with open(tmp, "wb") as f:
                            f.write(data[: len(data) // 2])
                            f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                ckpt_lib.atomic_write_bytes = dying_write
            train_lib.train(config, wd, device="cpu")
        pid = fork(child, log=os.devnull)
        if not during_write:
            time.sleep(rng.uniform(0.02, 0.45))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        code = wait(pid)
        if code == 0:
            done += 1
            break                                          # finished before the kill landed
        assert code == -signal.SIGKILL, code
        kills_done += 1
        mid_write += during_write
        for _, path in ckpt_lib.list_checkpoints(wd):      # never an unreadable or unverifiable checkpoint
            ckpt_lib.load_checkpoint(path)
    if not done:
        train_lib.train(config, wd, device="cpu")
    assert temp_files(wd) == []                            # the half-written temporaries were cleaned at start-up
    assert steps(wd) == [40, 50, 60]
    assert_bitwise_equal(ckpt_lib.resolve_checkpoint(reference, 60), ckpt_lib.resolve_checkpoint(wd, 60))
    return kills_done, mid_write


def test_sigkill_at_random_moments_and_mid_write_resumes_bitwise(reference, tmp_path):
    kills, mid_write = _kill_campaign(reference, str(tmp_path / "killed"), kills=12, seed=1)
    assert kills >= 10 and mid_write >= 3


@pytest.mark.slow
def test_sigkill_thirty_times(reference, tmp_path):
    kills, mid_write = _kill_campaign(reference, str(tmp_path / "killed"), kills=30, seed=2)
    assert kills >= 25


# ------------------------------------------------------------------------------------------------ SIGTERM / SIGINT
STOP_RE = r"stopped by {} at step (\d+): (?:checkpoint (\S+) written|the latest checkpoint is (\S+)); run the same " \
          r"command to resume"


def _signal_run(reference, tmp_path, signum):
    wd = str(tmp_path / "stopped")
    log = str(tmp_path / "log.txt")
    pid = fork(lambda: main_cli.cli(cli_args("train", wd, **TRAIN)), log=log)
    wait_for(lambda: os.path.exists(os.path.join(wd, "checkpoints", "ckpt_00000010.pt")), pid=pid)
    time.sleep(0.05)                                         # (mostly) in the middle of an update
    os.kill(pid, signum)
    code = wait(pid)
    err = open(log).read()
    name = signal.Signals(signum).name
    return wd, code, err, name


@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_of_the_reached_step_and_resumes_exactly(reference, tmp_path, signum, exit_code):
    wd, code, err, name = _signal_run(reference, tmp_path, signum)
    assert code == exit_code, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, err[-2000:]
    m = re.fullmatch(STOP_RE.format(name), lines[0])
    assert m, lines[0]
    step, path = int(m.group(1)), m.group(2) or m.group(3)
    assert 10 <= step < N_ITERS and path == ckpt_lib.resolve_checkpoint(wd, step)
    assert (m.group(2) is not None) == (step % CKPT_FREQ != 0)      # written unless the periodic one is that step
    state = ckpt_lib.load_checkpoint(path)
    assert state["step"] == step and state["ema"]["num_updates"] == step      # no finished update is lost
    assert temp_files(wd) == []
    train_lib.train(toy_config(), wd, device="cpu")
    assert_bitwise_equal(ckpt_lib.resolve_checkpoint(reference, 60), ckpt_lib.resolve_checkpoint(wd, 60))


def test_a_second_signal_aborts_at_once(tmp_path):
    """The first SIGTERM asks for the stop checkpoint; a second one while it is being written (here: a 30 s write)
    ends the process within seconds, exit 143, one line, no temporary file, the earlier checkpoints intact."""
    wd = str(tmp_path / "wd")
    log = str(tmp_path / "log.txt")
    marker = str(tmp_path / "saving")

    def child():
        real = ckpt_lib.save_checkpoint

        def slow_save(*args, **kwargs):
            if lifecycle.stop_requested() is not None:
                open(marker, "w").close()
                time.sleep(30)
            return real(*args, **kwargs)
        train_lib.ckpt_lib.save_checkpoint = slow_save
        return main_cli.cli(cli_args("train", wd, **dict(TRAIN, **{"training.n_iters": 100000})))
    pid = fork(child, log=log)
    wait_for(lambda: os.path.exists(os.path.join(wd, "checkpoints", "ckpt_00000010.pt")), pid=pid)
    before = {p: h for p, h in file_hashes(wd).items() if p.startswith("checkpoints")}
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: os.path.exists(marker), timeout=30, pid=pid)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    code = wait(pid)
    assert time.monotonic() - t0 < 5
    err = open(log).read()
    assert code == 143 and "Traceback" not in err, err[-2000:]
    assert err.splitlines()[-1].startswith("aborted by a second signal (SIGTERM after SIGTERM) while training in ")
    after = {p: h for p, h in file_hashes(wd).items() if p.startswith("checkpoints")}
    assert set(before) <= set(after) and all(after[p] == h for p, h in before.items())
    assert temp_files(wd) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum,exit_code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_through_a_real_subprocess(reference, tmp_path, signum, exit_code):
    wd = str(tmp_path / "wd")
    cmd = [sys.executable, MAIN] + cli_args("train", wd, **TRAIN)[1:]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: os.path.exists(os.path.join(wd, "checkpoints", "ckpt_00000010.pt")), timeout=120)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, err[-2000:]
    assert "Traceback" not in err
    m = re.fullmatch(STOP_RE.format(signal.Signals(signum).name), err.splitlines()[-1])
    assert m and 10 <= int(m.group(1)) < N_ITERS
    train_lib.train(toy_config(), wd, device="cpu")
    assert_bitwise_equal(ckpt_lib.resolve_checkpoint(reference, 60), ckpt_lib.resolve_checkpoint(wd, 60))


# ------------------------------------------------------------------------------------------------ corrupt files
def flip_tensor_byte(path):
    """Flip one byte in the middle of the largest tensor record of a checkpoint (torch's zip stores them raw)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        n, m = np.frombuffer(f.read(4), dtype="<u2")
        offset = info.header_offset + 30 + int(n) + int(m) + info.file_size // 2
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def test_byte_flip_is_detected_sample_and_eval_stop_and_training_resumes_from_the_newest_good(reference, tmp_path,
                                                                                           capsys, caplog):
    wd = copy_run(reference, tmp_path)
    latest = ckpt_lib.resolve_checkpoint(wd, 60)
    original = torch.load(latest, weights_only=True)
    flip_tensor_byte(latest)
    flipped = torch.load(latest, weights_only=True)                 # torch itself loads it without complaint ...
    assert any(not torch.equal(flipped[k][n], original[k][n]) for k in ("model",) for n in original[k]) or \
        any(not torch.equal(flipped["ema"]["model"][n], original["ema"]["model"][n]) for n in original["ema"]["model"]) \
        or any(not torch.equal(v, original["optimizer"]["state"][p][k]) for p, st in flipped["optimizer"]["state"].items()
               for k, v in st.items())
    line = (f"error: checkpoint {latest} is corrupt: its contents do not match the SHA-256 digest recorded when it "
            f"was written (damaged on disk or in transfer)")
    before = file_hashes(wd)
    for mode in ("sample", "eval"):                                  # ... sample and eval name it and stop
        code, out, err = run_cli(capsys, cli_args(mode, wd, config=None, **EVAL))
        assert (code, err) == (1, [line]), (mode, err)
    assert file_hashes(wd) == before                                  # nothing written
    caplog.clear()
    code, out, err = run_cli(capsys, cli_args("train", wd, config=None))
    assert code == 0
    warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0] == (
        f"checkpoint {latest} is corrupt: its contents do not match the SHA-256 digest recorded when it was written "
        f"(damaged on disk or in transfer); resuming from {ckpt_lib.resolve_checkpoint(wd, 50)} (step 50), the newest "
        f"good one; the corrupt file is kept")
    assert_bitwise_equal(ckpt_lib.resolve_checkpoint(reference, 60), latest)   # redone from step 50, exactly
    with open(latest + ".corrupt", "rb") as f:                        # the bad file was kept, not deleted
        assert hashlib.sha256(f.read()).hexdigest() == before["checkpoints/ckpt_00000060.pt"]


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty"])
def test_unreadable_checkpoints_are_one_line(reference, tmp_path, capsys, damage):
    wd = copy_run(reference, tmp_path)
    path = ckpt_lib.resolve_checkpoint(wd, 60)
    raw = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write({"truncated": raw[: len(raw) // 3], "zeroed": bytes(len(raw)), "empty": b""}[damage])
    code, out, err = run_cli(capsys, cli_args("sample", wd, config=None))
    assert code == 1 and len(err) == 1 and err[0].startswith(f"error: checkpoint {path} is corrupt: it cannot be read")


def test_non_finite_models_are_refused_in_one_line(reference, tmp_path, capsys):
    """A NaN state is never written; a checkpoint holding NaN EMA weights (crafted with a valid digest) and one with
    huge finite weights (1e28, what a loss overflow leaves) both stop sampling with one line."""
    wd = copy_run(reference, tmp_path)
    state = torch.load(ckpt_lib.resolve_checkpoint(wd, 60), weights_only=True)
    bad = {k: v for k, v in state.items() if k not in ("format", "step", "sha256")}
    name = next(iter(bad["ema"]["model"]))
    bad["ema"]["model"][name] = torch.full_like(bad["ema"]["model"][name], float("nan"))
    with pytest.raises(ckpt_lib.NonFiniteStateError, match=rf"state at step 70 holds non-finite values \(ema\.model\."):
        ckpt_lib.save_checkpoint(wd, bad, 70)
    assert steps(wd) == [40, 50, 60] and temp_files(wd) == []
    full = dict(bad, format=ckpt_lib.FORMAT_VERSION, step=70)
    full["sha256"] = ckpt_lib.state_digest(full)
    torch.save(full, os.path.join(wd, "checkpoints", "ckpt_00000070.pt"))
    code, out, err = run_cli(capsys, cli_args("sample", wd, config=None))
    assert code == 1 and err == [f"error: the EMA weights in {ckpt_lib.resolve_checkpoint(wd, 70)} hold non-finite "
                                 f"values ({name}): the model is unusable; pick an earlier checkpoint "
                                 f"(--checkpoint STEP)"], err
    state = torch.load(ckpt_lib.resolve_checkpoint(wd, 60), weights_only=True)      # a fresh copy
    huge = {k: v for k, v in state.items() if k not in ("format", "step", "sha256")}
    huge["ema"]["model"] = {k: v * 1e28 if v.is_floating_point() else v for k, v in huge["ema"]["model"].items()}
    ckpt_lib.save_checkpoint(wd, huge, 80, keep=0)
    code, out, err = run_cli(capsys, cli_args("sample", wd, "--checkpoint", "80", config=None,
                                              **{"sampling.num_samples": 16, "sampling.num_steps": 5}))
    assert code == 1 and len(err) == 1 and "non-finite" in err[0] and err[0].startswith("error: "), err
    assert not os.path.exists(os.path.join(wd, "samples", "step_00000080", "samples.npz"))


# ------------------------------------------------------------------------------------------------ disk full
class _FailingFile:
    """A real file whose ``write`` stores half the bytes, then fails like a full / read-only disk."""

    def __init__(self, f, code):
        self.f, self.code = f, code

    def write(self, data):
        self.f.write(bytes(data[: len(data) // 2]))
        self.f.flush()
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_write_is_one_line_and_loses_nothing(reference, tmp_path, capsys, monkeypatch, code):
    wd = copy_run(reference, tmp_path)
    before = file_hashes(wd)
    monkeypatch.setattr(atomic, "open", lambda p, mode="r", *a, **k: _FailingFile(open(p, mode, *a, **k), code),
                        raising=False)
    code_, out, err = run_cli(capsys, cli_args("train", wd, config=None, **{"training.n_iters": 70}))
    target = os.path.join(wd, "checkpoints", "ckpt_00000070.pt")
    assert code_ == 1
    assert err[-1] == f"error: cannot write {target}: {os.strerror(code)} ({errno.errorcode[code]})"
    assert [e for e in err if e.startswith("error")] == err[-1:] and not any("Traceback" in e for e in err)
    after = file_hashes(wd)
    assert {p: h for p, h in after.items() if not p.startswith("tensorboard")} == \
        {p: h for p, h in before.items() if not p.startswith("tensorboard")}     # checkpoints and config.json intact
    assert temp_files(wd) == []


def test_a_real_file_size_limit_fails_the_checkpoint_write_in_one_line(reference, tmp_path):
    """No mock: RLIMIT_FSIZE makes the kernel refuse the checkpoint's bytes (EFBIG) in a forked child."""
    import resource
    wd = copy_run(reference, tmp_path)
    before = file_hashes(wd)
    log = str(tmp_path / "log.txt")

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        return main_cli.cli(cli_args("train", wd, config=None, **{"training.n_iters": 70}))
    code = wait(fork(child, log=log))
    err = open(log).read().splitlines()
    target = os.path.join(wd, "checkpoints", "ckpt_00000070.pt")
    assert code == 1 and err[-1] == f"error: cannot write {target}: File too large (EFBIG)", err[-3:]
    after = file_hashes(wd)
    assert {p: h for p, h in after.items() if not p.startswith("tensorboard")} == \
        {p: h for p, h in before.items() if not p.startswith("tensorboard")}
    assert temp_files(wd) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_workdir_is_one_line(reference, tmp_path, capsys):
    wd = copy_run(reference, tmp_path)
    for dirpath, _, _ in os.walk(wd):
        os.chmod(dirpath, 0o555)
    try:
        code, out, err = run_cli(capsys, cli_args("train", wd, config=None, **{"training.n_iters": 70}))
    finally:
        for dirpath, _, _ in os.walk(wd):
            os.chmod(dirpath, 0o755)
    assert code == 1 and len([e for e in err if e.startswith("error")]) == 1 and "Permission denied" in err[-1]


# ------------------------------------------------------------------------------------------------ concurrency
def test_a_second_training_is_refused_naming_the_holder_and_a_killed_holder_frees_the_lock(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    pid = fork(lambda: main_cli.cli(cli_args("train", wd, **dict(TRAIN, **{"training.n_iters": 100000}))),
               log=os.devnull)
    try:
        # config.json follows the first checkpoint (it is written once that checkpoint exists): wait for both
        wait_for(lambda: os.path.exists(os.path.join(wd, "checkpoints", "ckpt_00000010.pt"))
                 and os.path.exists(os.path.join(wd, "config.json")), pid=pid)
        config_before = open(os.path.join(wd, "config.json"), "rb").read()
        code, out, err = run_cli(capsys, cli_args("train", wd, **dict(TRAIN, seed=7)))
        lock = os.path.join(wd, ".lock-train")
        assert (code, err) == (1, [f"error: workdir {wd} is in use: process {pid} holds its train lock ({lock}); "
                                   f"wait for it to finish or stop it (kill {pid}), or use another --workdir"])
        assert open(os.path.join(wd, "config.json"), "rb").read() == config_before
    finally:
        os.kill(pid, signal.SIGKILL)
        wait(pid)
    assert open(os.path.join(wd, ".lock-train")).read().strip() == str(pid)   # stale file, lock released by the kernel
    train_lib.train(toy_config(**{"training.n_iters": steps(wd)[-1] + 1}), wd, device="cpu")


# ------------------------------------------------------------------------------------------------ bad input
BAD = [
    ({"optim.lr": "nan"}, "train", 2, "error: config key 'optim.lr' must be a finite number > 0, got nan"),
    ({"training.batch_size": -1}, "train", 2, "error: config key 'training.batch_size' must be an integer >= 1, got -1"),
    ({"training.checkpoint_freq": 0}, "train", 2,
     "error: config key 'training.checkpoint_freq' must be an integer >= 1, got 0"),
    ({"training.n_iters": 0}, "train", 2, "error: config key 'training.n_iters' must be an integer >= 1 (a run "
                                          "already at or past n_iters has nothing to do and says so), got 0"),
    ({"training.keep_checkpoints": -1}, "train", 2,
     "error: config key 'training.keep_checkpoints' must be an integer >= 0 (0 keeps every checkpoint), got -1"),
    ({"model.ema_rate": 1.5}, "train", 2, "error: config key 'model.ema_rate' must be a finite number in [0, 1], got "
                                          "1.5"),
    ({"seed": 7}, "train", 2, None),
    ({"optim.lr": 0.01}, "train", 2, None),
    ({"sampling.num_steps": 0}, "sample", 2, "error: config key 'sampling.num_steps' must be an integer >= 1, got 0"),
    ({"eval.batch_size": 0}, "eval", 2, "error: config key 'eval.batch_size' must be an integer >= 1, got 0"),
    ({"training.n_iters": 30}, "train", 0, None),                     # nothing to do: a no-op changes nothing
]


@pytest.mark.parametrize("over,mode,exit_code,line", BAD, ids=[f"{m}-{list(o)[0]}" for o, m, _, _ in BAD])
def test_bad_values_are_one_line_and_leave_the_workdir_unchanged(reference, tmp_path, capsys, over, mode,
                                                                   exit_code, line):
    wd = copy_run(reference, tmp_path)
    before = file_hashes(wd)
    code, out, err = run_cli(capsys, cli_args(mode, wd, config=None, **over))
    assert code == exit_code
    if exit_code == 0:
        assert out.strip().startswith(f"nothing to do: {wd} is already at step 60 >= training.n_iters = 30")
        assert not any(e.startswith("error") for e in err)
    elif line is None:                                 # a resume whose config changes the run's identity
        key = list(over)[0]
        old = json.load(open(os.path.join(wd, "config.json")))
        for part in key.split("."):
            old = old[part]
        assert err == [f"error: the config differs from the run's ({wd}/config.json) in keys that define the run: "
                       f"{key} ({json.dumps(old)} -> {json.dumps(over[key])}); resume with the run's own config (omit "
                       f"--config) or train in a new workdir"], err
    else:
        assert err == [line], err
    assert file_hashes(wd) == before


CONFIG_FILES = [
    ("syntax.py", "def get_config(:\n", "error: config file '{p}' has a syntax error at line 1: "),
    ("raises.py", "raise RuntimeError('boom')\n", "error: config file '{p}' raised RuntimeError while loading: boom"),
    ("bad.json", '{"training": {"n_iters": 5,}}', "error: config file '{p}': the config is not valid JSON: "),
    ("list.json", "[1, 2]", "error: config file '{p}': the config JSON must be an object of sections, got list"),
]


@pytest.mark.parametrize("name,text,prefix", CONFIG_FILES, ids=[c[0] for c in CONFIG_FILES])
def test_broken_config_files_are_one_line(reference, tmp_path, capsys, name, text, prefix):
    wd = copy_run(reference, tmp_path)
    before = file_hashes(wd)
    p = tmp_path / name
    p.write_text(text)
    code, out, err = run_cli(capsys, cli_args("train", wd, config=str(p)))
    assert code == 2 and len(err) == 1 and err[0].startswith(prefix.format(p=p)), err
    assert file_hashes(wd) == before


def test_a_wrong_named_config_on_a_run_keeps_its_config(reference, tmp_path, capsys):
    wd = copy_run(reference, tmp_path)
    before = file_hashes(wd)
    code, out, err = run_cli(capsys, cli_args("train", wd, config="vp_digits"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: the config differs from the run's ({wd}/config.json) in keys that define the "
                             f"run: data.centered (false -> true), data.dataset (\"toy\" -> \"digits\")")
    assert file_hashes(wd) == before
    code, out, err = run_cli(capsys, cli_args("sample", wd, config=None, **{"sampling.num_samples": 8,
                                                                            "sampling.num_steps": 4}))
    assert code == 0, err                              # the run can still be sampled without --config


def test_fresh_workdir_failures(tmp_path, capsys):
    wd = str(tmp_path / "fresh")
    code, out, err = run_cli(capsys, cli_args("train", wd, **{"training.n_iters": 0}))
    assert code == 2 and len(err) == 1 and not os.path.exists(wd)           # nothing created
    f = tmp_path / "a_file"
    f.write_text("x")
    code, out, err = run_cli(capsys, cli_args("train", str(f), **TRAIN))
    assert (code, err) == (2, [f"error: workdir {f} exists and is not a folder"])
    # a learning rate whose loss overflows before the first checkpoint: one line, no checkpoint, no config.json
    code, out, err = run_cli(capsys, cli_args("train", wd, **dict(TRAIN, **{"optim.lr": 1e30})))
    assert code == 1 and [e for e in err if e.startswith("error")] == err[-1:] and \
        re.fullmatch(r"error: non-finite loss \((nan|inf)\) at step \d+: training stopped\. The last good checkpoint "
                     r"\(none yet\) is kept; lower optim\.lr, raise training\.eps or check the data\.", err[-1]), err
    assert steps(wd) == [] and not os.path.exists(os.path.join(wd, "config.json"))
    # ... so the corrected command simply works
    code, out, err = run_cli(capsys, cli_args("train", wd, **dict(TRAIN, **{"training.n_iters": 10})))
    assert code == 0 and steps(wd) == [10]


def test_stale_temporary_files_are_removed_at_start_up(reference, tmp_path, capsys):
    wd = copy_run(reference, tmp_path)
    before = file_hashes(wd)
    stale = [os.path.join(wd, ".tmp-config.json-abc123"), os.path.join(wd, "checkpoints", ".tmp-ckpt_00000070.pt-x"),
             os.path.join(wd, "eval", "step_00000060", ".tmp-state.json-y")]
    for p in stale:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "w").write("half")
    code, out, err = run_cli(capsys, cli_args("train", wd, config=None))       # nothing to do, but cleans up
    assert code == 0 and "nothing to do" in out
    assert not os.path.exists(stale[0]) and not os.path.exists(stale[1])
    assert os.path.exists(stale[2])                  # eval's files are eval's (it may be running): left to eval
    os.remove(stale[2])
    after = file_hashes(wd)
    assert {p: h for p, h in after.items() if not p.startswith("eval")} == before


# ------------------------------------------------------------------------------------------------ eval
def eval_config():
    return toy_config(**EVAL)


def _summary_numbers(wd):
    s = json.load(open(ev.summary_path(wd, 60)))
    with np.load(os.path.join(ev.step_dir(wd, 60), "samples.npz")) as z:
        x = z["samples"]
    return s["test_loss"], s["bpd"]["bpd"], s["bpd"]["bpd_stderr"], s["bpd"]["nll_nats"], x


@pytest.fixture(scope="module")
def eval_reference(reference, tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("eval_ref") / "wd")
    shutil.copytree(reference, wd)
    ev.evaluate(eval_config(), wd, checkpoint=60, device="cpu")
    return _summary_numbers(wd)


def _assert_same_eval(wd, eval_reference):
    got = _summary_numbers(wd)
    assert got[:4] == eval_reference[:4]
    assert np.array_equal(got[4], eval_reference[4])


def test_eval_killed_several_times_ends_with_the_uninterrupted_numbers(reference, eval_reference, tmp_path):
    wd = copy_run(reference, tmp_path)
    rng = random.Random(3)
    kills = 0
    for _ in range(6):
        pid = fork(lambda: ev.evaluate(eval_config(), wd, checkpoint=60, device="cpu"), log=os.devnull)
        time.sleep(rng.uniform(0.2, 1.2))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = wait(pid)
        if code == 0:
            break
        assert code == -signal.SIGKILL
        kills += 1
    assert kills >= 3
    ev.evaluate(eval_config(), wd, checkpoint=60, device="cpu")
    _assert_same_eval(wd, eval_reference)
    assert temp_files(os.path.join(wd, "eval")) == []


def test_eval_sigterm_records_the_finished_batches_and_resumes_exactly(reference, eval_reference, tmp_path):
    wd = copy_run(reference, tmp_path)
    log = str(tmp_path / "log.txt")
    args = cli_args("eval", wd, "--checkpoint", "60", config=None, **EVAL)
    pid = fork(lambda: main_cli.cli(args), log=log)
    state = ev.state_path(wd, 60)

    def some_bpd_recorded():
        try:
            return len(json.load(open(state))["stages"]["bpd"]["units"]) >= 1
        except (OSError, ValueError, KeyError):
            return False
    wait_for(some_bpd_recorded, pid=pid)
    os.kill(pid, signal.SIGTERM)
    code = wait(pid)
    err = open(log).read()
    assert code == 143 and "Traceback" not in err, err[-2000:]
    m = re.fullmatch(rf"stopped by SIGTERM while evaluating step 60: (\d+) of 6 bits/dim batches recorded in "
                     rf"{re.escape(state)}; run the same command to resume", err.splitlines()[-1])
    assert m, err.splitlines()[-1]
    assert len(json.load(open(state))["stages"]["bpd"]["units"]) == int(m.group(1))
    code = main_cli.cli(args)
    assert code == 0
    _assert_same_eval(wd, eval_reference)


def test_a_second_evaluation_of_one_workdir_is_refused(reference, tmp_path, capsys):
    wd = copy_run(reference, tmp_path)
    with lifecycle.WorkdirLock(wd, "eval"):
        code, out, err = run_cli(capsys, cli_args("eval", wd, config=None, **EVAL))
    lock = os.path.join(wd, ".lock-eval")
    assert (code, err) == (1, [f"error: workdir {wd} is in use: process {os.getpid()} holds its eval lock ({lock}); "
                               f"wait for it to finish or stop it (kill {os.getpid()}), or use another --workdir"])
