"""Data-parallel training on CPU (gloo), started the way users start it: ``torchrun ... main.py --mode train``.

What is compared with what:
- 2 ranks x batch B/2 against ONE process training on batch B in 2 micro-batches (``compute.grad_accum=2``, no process
  group, no DDP): the same examples and the same per-micro-batch noise, so the updates agree up to the order in which
  float gradients are summed (DDP all-reduces rank-averaged buckets; accumulation adds halves in place).  For two
  ranks that order cannot change a bit (a + b = b + a, halving is exact), and on this CPU the weights come out bitwise
  equal; the test allows rtol 1e-5 / atol 1e-6, the bound for K ranks where the sum of K terms is re-associated.
- a SIGKILL of the whole torchrun group, then the same command: the final checkpoint is bitwise the uninterrupted
  2-rank run's (weights, EMA, Adam moments).
- checkpoints are written once, by rank 0 (a second writer of a step would move the first file aside as .corrupt).
- a non-finite loss on rank 1 only stops both ranks with one message (spawned through ``main.cli``, no hang; marked
  slow: ~15 s, run with ``-m slow``).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "main.py")
N_ITERS = 60
BASE = ["--config.training.batch_size=64", f"--config.training.n_iters={N_ITERS}",
        "--config.training.checkpoint_freq=10", "--config.training.keep_checkpoints=0",
        "--config.training.snapshot_freq=0", "--config.training.log_freq=20", "--config.training.progress=false",
        "--config.model.nf=64", "--config.optim.warmup=10"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _torchrun_cmd(workdir, *extra, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", MAIN,
            "--mode", "train", "--config", "toy_2d", "--workdir", str(workdir), *BASE, *extra]


def _torchrun(workdir, *extra, nproc=2, timeout=180):
    p = subprocess.run(_torchrun_cmd(workdir, *extra, nproc=nproc), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    return p


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _final(workdir):
    return _load(os.path.join(workdir, "checkpoints", f"ckpt_{N_ITERS:08d}.pt"))


def _tensors(state):
    """name -> tensor of the model, the EMA and the Adam moments."""
    out = {f"model.{k}": v for k, v in state["model"].items()}
    out.update({f"ema.{k}": v for k, v in state["ema"]["model"].items()})
    for pid, s in state["optimizer"]["state"].items():
        out.update({f"adam.{pid}.{k}": v for k, v in s.items() if torch.is_tensor(v)})
    return out


def _in_process(workdir, *extra):
    """One process, no process group: ``train()`` with the same overrides."""
    from sde_diffusion import configs
    from sde_diffusion.run.train import train
    config = configs.apply_overrides(configs.get_config("toy_2d"), [a[len("--config."):] for a in BASE + list(extra)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)           # the ranks run one thread each (torchrun's OMP_NUM_THREADS=1)
    try:
        train(config, str(workdir))
    finally:
        torch.set_num_threads(threads)
    return _final(workdir)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp") / "run"
    p = _torchrun(workdir)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return workdir, p


def test_two_ranks_equal_one_process_on_the_whole_batch(two_ranks, tmp_path):
    workdir, p = two_ranks
    ddp = _final(workdir)
    one = _in_process(tmp_path / "accum", "--config.compute.grad_accum=2")
    a, b = _tensors(ddp), _tensors(one)
    assert a.keys() == b.keys() and len(a) > 10
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m} (worst {worst})")
    # the comparison has teeth: one process on B examples with a single noise draw is a different run
    plain = _tensors(_in_process(tmp_path / "plain"))
    assert max(float((a[k] - plain[k]).abs().max()) for k in a) > 1e-4
    # the checkpoint records both ranks' RNG states and the layout it was trained with
    assert ddp["layout"] == {"world_size": 2, "grad_accum": 1}
    assert len(ddp["rng_ranks"]) == 2
    assert torch.equal(ddp["rng_ranks"][0]["torch"], ddp["rng"]["torch"])


def test_checkpoints_and_logs_are_written_once_by_rank_zero(two_ranks):
    workdir, p = two_ranks
    names = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert names == [f"ckpt_{s:08d}.pt" for s in range(10, N_ITERS + 1, 10)], names
    assert sorted(n for n in os.listdir(workdir) if not n.startswith(".")) == ["checkpoints", "config.json",
                                                                               "tensorboard"]
    assert os.listdir(workdir).count(".lock-train") == 1
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1      # one event file: rank 0's
    assert p.stdout.count("training done at step") == 1                     # only rank 0 reports


def _descendants(pid: int):
    """Every live descendant of ``pid`` (by parent pid, whatever their session: torchrun starts each worker in a new
    session, so killing torchrun's process group leaves the workers running)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and all its workers at once, as if the machine died: stop them all first, then kill."""
    procs = [pid] + _descendants(pid)
    for p in procs:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    for p in procs + _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow      # ~40 s on 2 cores beyond the shared two-rank fixture; in-process kills are in test_faults.py
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_sigkill_of_the_group_then_restart_resumes_exactly(two_ranks, tmp_path):
    """torchrun and both ranks SIGKILLed together mid-run; the same command resumes and ends bit for bit equal to an
    uninterrupted run.  (Killing only torchrun's process group is not that: its workers live in their own sessions
    and finish the run unsupervised — the earlier form of this test did that and raced the restart.)"""
    reference = _tensors(_final(two_ranks[0]))
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_cmd(workdir), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = os.path.join(workdir, "checkpoints", "ckpt_00000010.pt")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = _descendants(proc.pid)
    _kill_tree(proc.pid)                           # torchrun and both ranks at once
    proc.wait(timeout=30)
    deadline = time.time() + 30
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert workers and not any(_alive(w) for w in workers)
    done = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert f"ckpt_{N_ITERS:08d}.pt" not in done, "the run finished before the kill: nothing was tested"
    p = _torchrun(workdir)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "resumed from" in p.stderr
    resumed = _tensors(_final(workdir))
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_with_one_checkpoint(tmp_path):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(_torchrun_cmd(workdir, "--config.training.n_iters=100000"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = os.path.join(workdir, "checkpoints", "ckpt_00000010.pt")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)               # torchrun forwards it to both ranks
    _, err = proc.communicate(timeout=90)
    stops = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stops) == 1, err[-3000:]
    step = int(stops[0].split("at step ")[1].split(":")[0])
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert f"ckpt_{step:08d}.pt" in names and not [n for n in names if "corrupt" in n or n.startswith(".")]
    # resumable: the same command (to a near n_iters) continues from it
    p = _torchrun(workdir, f"--config.training.n_iters={step + 3}", "--config.training.checkpoint_freq=1000")
    assert p.returncode == 0 and "resumed from" in p.stderr and f"step {step}" in p.stderr, p.stderr[-3000:]


def test_a_two_rank_run_resumes_in_one_process_and_says_so(two_ranks, tmp_path, caplog):
    import logging
    import shutil
    from sde_diffusion import configs
    from sde_diffusion.run.train import train
    workdir = tmp_path / "moved"
    shutil.copytree(two_ranks[0], workdir)
    config = configs.get_config(str(workdir / "config.json"))
    config.training.n_iters = N_ITERS + 5
    with caplog.at_level(logging.WARNING):
        out = train(config, str(workdir))
    assert out["step"] == N_ITERS + 5 and out["world_size"] == 1
    warned = [r.getMessage() for r in caplog.records if "rank(s)" in r.getMessage()]
    assert len(warned) == 1 and "trained with 2 rank(s) x grad_accum 1 on 1 rank(s) x grad_accum 1" in warned[0]
    state = _load(out["checkpoint"])
    assert state["layout"] == {"world_size": 1, "grad_accum": 1} and "rng_ranks" not in state


def test_a_batch_not_divisible_by_the_world_size_is_one_line(tmp_path, monkeypatch):
    from sde_diffusion import configs
    from sde_diffusion.run import distributed, train as train_lib
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.Context(rank=0, world_size=2, backend="gloo"))
    config = configs.get_config("toy_2d")
    config.training.batch_size = 63
    with pytest.raises(configs.ConfigError) as e:
        train_lib.train(config, str(tmp_path / "w"))
    assert str(e.value) == ("config key 'training.batch_size' must be divisible by world size x compute.grad_accum "
                            "= 2 x 1 = 2 (equal micro-batches on every rank), got 63")
    assert not (tmp_path / "w").exists()


def as_torchrun_rank(rank: int, port: int, err_path: str) -> None:
    """Make this spawned process rank ``rank`` of a 2-process group as torchrun would (its environment variables),
    with stderr going to ``err_path`` and the checkout importable."""
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, ROOT)


def _rank_main(rank, port, workdir, bad_rank, err_path):
    """A torchrun-like worker: the environment torchrun sets, then ``main.cli``; rank ``bad_rank`` gets NaN data."""
    as_torchrun_rank(rank, port, err_path)
    from sde_diffusion import data
    if rank == bad_rank:
        original = data.ToyDataset.batch

        def batch(self, step, batch_size, seed=0):
            x, y = original(self, step, batch_size, seed)
            return (x * float("nan"), y) if step >= 3 else (x, y)
        data.ToyDataset.batch = batch
    import main
    code = main.cli(["main.py", "--mode", "train", "--config", "toy_2d", "--workdir", workdir, *BASE,
                     "--config.compute.dist_timeout=60"])
    sys.stderr.flush()
    os._exit(code)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two_ranks(target, tmp_path, *args, timeout=120):
    """Run ``target(rank, port, *args, err_path)`` in two spawned processes (a torchrun-like group); returns their
    exit codes and the error lines both printed (``error ...`` / ``[rank k] ...``).  A rank still alive after
    ``timeout`` seconds is killed and fails the test (a hang)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    errs = [str(tmp_path / f"err{r}.txt") for r in range(2)]
    procs = [ctx.Process(target=target, args=(r, port, *args, errs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    lines = [line for e in errs for line in open(e).read().splitlines() if line.startswith(("error", "[rank"))]
    return [p.exitcode for p in procs], lines


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_stops_both_with_one_message(tmp_path):
    codes, lines = spawn_two_ranks(_rank_main, tmp_path, str(tmp_path / "w"), 1)
    assert codes == [1, 1]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: rank 1 of 2 failed during update 4: non-finite loss (nan) at step 3 on rank 1")
    # nothing of the failed update was saved; the run never reached a checkpoint
    assert not os.path.exists(tmp_path / "w" / "checkpoints") or not os.listdir(tmp_path / "w" / "checkpoints")


def test_a_finished_run_is_a_clean_no_op_on_every_rank(two_ranks):
    """Re-running a finished 2-rank run: rank 0 says "nothing to do", both ranks reach the barrier and tear the gloo
    group down together (a rank destroying the group first used to abort its peer with SIGABRT), exit 0, and the
    workdir's checkpoints are unchanged."""
    workdir, _ = two_ranks
    ckpts = os.path.join(workdir, "checkpoints")
    before = {n: os.path.getmtime(os.path.join(ckpts, n)) for n in os.listdir(ckpts)}
    for _ in range(3):
        p = _torchrun(workdir)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "nothing to do" in p.stdout + p.stderr and "Aborted" not in p.stderr
    assert {n: os.path.getmtime(os.path.join(ckpts, n)) for n in os.listdir(ckpts)} == before
