"""``--mode eval``: per checkpoint the test loss, test-set bits/dim, samples and their quality; resumable.

``evaluate(config, workdir, checkpoint=None, device=None) -> dict``

Which checkpoints: ``checkpoint`` (a step, a path, ``"latest"``, or ``-1`` / ``"all"``), else ``eval.checkpoint``
(-1 = every checkpoint in ``<workdir>/checkpoints``, oldest first; a step = that one).  Eval keys missing from the
config (an older run's ``config.json``) take the defaults of ``configs/default.py``.

Stages, per checkpoint, in this order (EMA weights):

  ``loss``     the training objective on the test split with a fixed generator (``eval.seed``)          [always]
  ``bpd``      bits/dim of the first ``eval.bpd_num_examples`` test examples through the probability-flow ODE
               (``sde_diffusion.likelihood.nll``), ``eval.bpd_batch_size`` at a time               [``eval.enable_bpd``]
  ``elbo``     variational bounds (``sde_diffusion.elbo``) of the first ``eval.elbo_num_examples`` test examples:
               DDPM's discrete bound on the VP chain (``eval.elbo_num_steps`` levels, 0 = all) for the beta,
               posterior and (learned-variance models) learned reverse variances from the same network calls, and
               the continuous-time bound (``eval.elbo_num_t`` draws of t, ``eval.elbo_importance``); each with its
               prior / diffusion / decoder terms; batches are resumable units                   [``eval.enable_elbo``]
  ``samples``  ``eval.num_generated`` samples with ``config.sampling.*``, ``eval.generate_batch_size`` at a time
                                                                                          [``eval.enable_sampling``]
  ``metrics``  ``eval.sample_metrics``: ``digits`` (``DigitsEvaluator``: confident-label share, class coverage,
               Fréchet distance in the classifier's feature space, next to the same numbers for as many real training
               digits, the floor) or ``inception`` (FID, KID, IS against ``eval.fid_reference`` with the Inception
               weights ``eval.inception_weights``); ``auto`` picks by dataset, toy data get none      [with samples]

What the bits/dim are: the mean over examples (and ``eval.bpd_num_repeats`` dequantisation draws) of
``likelihood.nll(...).bpd``, i.e. -log2 of the model's density at time ``eval.bpd_eps`` of the uniformly dequantised
datum per dimension, in the units of the data's L levels (see ``sde_diffusion.likelihood``: ``uniform`` is score_sde's
(k + U)/L, so 8-bit numbers compare with published ones; ``uniform_centered`` centres the bins on the values the model
was trained on).  Toy data are continuous: -log2 p_eps(x) / D.  Class-conditional models: log p(x | y) with the
test labels.  ``bpd_stderr`` is the standard error of that mean over the (example, draw) pairs, which includes the
Hutchinson and dequantisation noise.  The samples of batch i use the seed ``mix_seed(eval.sample_seed, i)`` (another salt than
``--mode sample``'s, so they differ from its samples with the same seed).

Under torchrun (``distributed``) rank 0 runs everything above and writes every file; the other ranks wait in
``_serve`` and compute their share of the work units of the bpd, elbo and samples stages (``distributed.run_sharded``:
rank k takes units k, k + K, ...; rank 0 records each round as it arrives).  A unit's result depends on its own seed
only, so the numbers do not depend on the number of processes and a stopped evaluation resumes with any number.  The
test loss and the sample metrics run on rank 0 alone.  The Inception statistics file does not record which
weights made it: delete it after changing ``eval.inception_weights``.

Files under ``<workdir>/eval/``:

  ``eval_<step:08d>.json``               summary of a checkpoint (written once all its enabled stages are done)
  ``step_<step:08d>/state.json``         the progress record (below)
  ``step_<step:08d>/samples.npz``, ``samples.png``   the samples (data space, as ``--mode sample`` writes them)
  ``step_<step:08d>/sample_batches/``    finished sample batches while the stage runs (removed when it is done)
  ``digits_classifier.pt``               the digits classifier (trained once, then loaded)
  ``inception_<dataset>_<split>.npz``    Inception statistics of the reference data (computed once)

TensorBoard (``<workdir>/tensorboard``): ``eval/test_loss``, ``eval/bpd``, ``eval/bpd_stderr``, ``eval/bpd_nfe``,
``eval/elbo_<bound>_{bpd, bpd_stderr, prior_bpd, diffusion_bpd, decoder_bpd}`` (bound: beta, posterior, learned,
continuous),
``eval/sample_nfe``, the image ``eval/samples``, ``eval/digits_*`` and ``eval/digits_floor_*``, or ``eval/fid``,
``eval/kid``, ``eval/inception_score``; at the checkpoint's step.

Resumability.  ``state.json`` (rewritten atomically: temp file + rename) holds per stage its settings, its finished
work units and whether its TensorBoard scalars were written: a bpd batch's partial sums (sum and sum of squares of
bits/dim, sum of nats, NFE) are recorded under the batch's index as soon as it finishes, a sample batch is written to
its own ``.npz`` (atomically) and then recorded.  Every unit has its own seed (``mix_seed(seed, unit)``), so a unit's
result does not depend on which run computed it: an interrupted evaluation resumes with the first unrecorded unit,
never redoes or double-counts a recorded one, and ends with the numbers an uninterrupted run gives.  A stage whose
settings changed since it was recorded is recomputed (with a warning); a checkpoint whose enabled stages are all done
is skipped, and its recorded summary is returned.  TensorBoard scalars are written once per stage and checkpoint (after
a flush the stage is marked; only a kill in between could repeat them).

Reliability.  One evaluation per workdir at a time (the OS lock ``<workdir>/.lock-eval``; a second one is refused with
the holder's PID; a training may run alongside, it takes its own lock).  Temporary files under ``eval/`` left by a
killed evaluation are removed at start-up.  SIGTERM / SIGINT finish the current work unit, record it and raise
``lifecycle.Stopped`` (exit 143 / 130 from ``main.py``); a second signal aborts at once.  Checkpoints are verified
against their SHA-256 digest when loaded: a corrupt one stops the evaluation with its name; so does a model whose
weights, test loss or bits/dim are not finite.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
from absl import logging

from ..atomic import atomic_path, remove_stale_temp_files
from ..autoencoder import is_latent
from .. import configs as configs_lib
from .. import likelihood as likelihood_lib
from ..data import get_data_scaler, get_dataset, mix_seed
from ..likelihood import nll
from ..losses import get_loss_fn
from ..networks import get_score_fn
from .checkpoints import (CKPT_RE, CheckpointError, atomic_write_text, checkpoint_dir, list_checkpoints,
                          load_checkpoint, load_model, resolve_checkpoint)
from . import distributed, lifecycle
from .sampling import generate, load_guidance_classifier, sampling_labels, save_samples
from .utils import get_device, image_grid

Tensor = torch.Tensor

__all__ = ["EvaluationError", "test_loss", "evaluate", "eval_dir", "state_path", "summary_path", "summary_line", "STAGES"]

STAGES = ("loss", "bpd", "elbo", "samples", "metrics")
SAMPLE_METRICS = ("auto", "digits", "inception", "none")
DEQUANTIZE = ("auto", "uniform", "uniform_centered", "none")
_BPD_SALT, _SAMPLE_SALT, _ELBO_SALT = 0xB9D, 0x5A3, 0xE1B0


class EvaluationError(ValueError):
    """Evaluation settings or inputs that cannot be used (an unknown option, missing Inception weights, ...)."""


# ------------------------------------------------------------------------------------------------ paths
def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, "eval")


def step_dir(workdir: str, step: int) -> str:
    return os.path.join(eval_dir(workdir), f"step_{int(step):08d}")


def state_path(workdir: str, step: int) -> str:
    return os.path.join(step_dir(workdir, step), "state.json")


def summary_path(workdir: str, step: int) -> str:
    return os.path.join(eval_dir(workdir), f"eval_{int(step):08d}.json")


# ------------------------------------------------------------------------------------------------ test loss
@torch.no_grad()
def test_loss(config, sde, model, device="cpu") -> dict:
    """Mean training loss over the test split (labels kept, never dropped), with t and z from ``eval.seed``."""
    device = torch.device(device)
    dataset = get_dataset(config, "test")
    scaler = get_data_scaler(config)
    loss_fn = get_loss_fn(config, sde)
    gen = torch.Generator(device=device).manual_seed(int(config.eval.seed))
    codec = None
    if is_latent(config):       # latent diffusion: the loss is measured on the encoded test data
        from .autoencoder_train import load_codec
        codec = load_codec(config, device, expected=getattr(model, "autoencoder_identity", None))
    total, count = 0.0, 0
    for x, y in dataset.iterate(int(config.eval.batch_size)):
        x = scaler(x.to(device))
        if codec is not None:
            x = codec.encode(x, generator=gen)
        y = y.to(device) if int(config.model.num_classes) > 0 else None
        loss = loss_fn(model, x, y, train=False, generator=gen)
        total += float(loss) * x.shape[0]
        count += x.shape[0]
    return {"test_loss": total / max(count, 1), "num_examples": count}


# ------------------------------------------------------------------------------------------------ config
def _with_eval_defaults(config):
    """A copy of ``config`` with the eval keys it lacks (an older run's config.json) set to the defaults."""
    from ..configs.default import get_default_config
    defaults = get_default_config().eval
    missing = [k for k in defaults.keys() if k not in config.eval]
    if not missing:
        return config
    config = copy.deepcopy(config)
    with config.unlocked():
        for k in missing:
            config.eval[k] = defaults[k]
    logging.info("eval keys absent from this config take their defaults: %s", ", ".join(missing))
    return config


def _choice(value, allowed, key) -> str:
    v = str(value).lower()
    if v not in allowed:
        raise EvaluationError(f"eval.{key} = {value!r} is not one of {', '.join(allowed)}")
    return v


def _positive(value, key, minimum=1):
    if value < minimum:
        raise EvaluationError(f"eval.{key} must be >= {minimum}, got {value}")
    return value


def _normalised(obj):
    """JSON round trip: what a settings dict looks like after being stored (tuples -> lists)."""
    return json.loads(json.dumps(obj))


def _metrics_kind(config) -> str:
    e, name = config.eval, config.data.dataset.lower()
    kind = _choice(e.sample_metrics, SAMPLE_METRICS, "sample_metrics")
    if kind == "auto":
        kind = {"digits": "digits", "cifar10": "inception"}.get(name, "none")
    if kind == "digits" and name != "digits":
        raise EvaluationError(f"eval.sample_metrics = 'digits' needs 8x8 digit samples, but data.dataset = {name!r}")
    if kind == "inception" and name == "toy":
        raise EvaluationError("eval.sample_metrics = 'inception' needs images; toy data are points")
    return kind


def _plan(config, dataset) -> Dict[str, dict]:
    """The enabled stages with the settings their results depend on (normalised, comparable with stored ones)."""
    e, name = config.eval, config.data.dataset.lower()
    toy = name == "toy"
    plan = {"loss": {"batch_size": _positive(int(e.batch_size), "batch_size"), "seed": int(e.seed),
                     "loss": config.training.loss, "weighting": config.training.weighting,
                     "reduce": config.training.reduce, "eps": float(config.training.eps),
                     "num_examples": len(dataset)}}
    latent = is_latent(config)
    if latent and (bool(e.enable_bpd) or bool(e.get("enable_elbo", False))):
        logging.info("a latent model (model.autoencoder_workdir): bits/dim and variational bounds would be those of "
                     "the latents, not of the data; the bpd and elbo stages are skipped")
    if bool(e.enable_bpd) and not latent:
        method = _choice(e.bpd_method, ("hutchinson", "exact"), "bpd_method")
        solver = _choice(e.bpd_solver, likelihood_lib.SOLVERS, "bpd_solver")
        deq = _choice(e.bpd_dequantize, DEQUANTIZE, "bpd_dequantize")
        levels = int(e.bpd_num_levels) or int(getattr(dataset, "levels", 0))
        if toy:
            if deq not in ("auto", "none"):
                raise EvaluationError(f"toy data are continuous: eval.bpd_dequantize must be 'auto' or 'none', "
                                      f"got {e.bpd_dequantize!r}")
            deq, data_range, levels = None, None, 0
        else:
            if levels < 2:
                raise EvaluationError(f"eval.bpd_num_levels must be >= 2 (or 0 for the dataset's), got {levels}")
            if deq == "auto":
                deq = "uniform" if (bool(config.data.uniform_dequantization) or levels >= 256) else "uniform_centered"
            elif deq == "none":
                deq = None
            data_range = [-1.0, 1.0] if config.data.centered else [0.0, 1.0]
        n = int(e.bpd_num_examples)
        if n == 0 or n < -1:
            raise EvaluationError(f"eval.bpd_num_examples must be >= 1 or -1 (all), got {n}")
        if n == -1 or n > len(dataset):
            if n > len(dataset):
                logging.warning("eval.bpd_num_examples = %d > the %d test examples: using all of them", n,
                                len(dataset))
            n = len(dataset)
        bpd = {"num_examples": n, "batch_size": _positive(int(e.bpd_batch_size), "bpd_batch_size"),
               "num_repeats": _positive(int(e.bpd_num_repeats), "bpd_num_repeats"), "seed": int(e.seed),
               "method": method, "solver": solver, "eps": float(e.bpd_eps), "dequantize": deq,
               "num_levels": levels, "data_range": data_range}
        if method == "hutchinson":
            bpd["num_probes"] = _positive(int(e.bpd_num_probes), "bpd_num_probes")
            bpd["probe"] = _choice(e.bpd_probe, ("rademacher", "gaussian"), "bpd_probe")
        if solver == "rk45":
            bpd["rtol"], bpd["atol"] = float(e.bpd_rtol), float(e.bpd_atol)
            if bpd["rtol"] <= 0 or bpd["atol"] <= 0:
                raise EvaluationError(f"eval.bpd_rtol and eval.bpd_atol must be positive, got {bpd['rtol']}, "
                                      f"{bpd['atol']}")
        else:
            bpd["num_steps"] = _positive(int(e.bpd_num_steps), "bpd_num_steps")
        plan["bpd"] = bpd
    if bool(e.get("enable_elbo", False)) and not latent:
        plan["elbo"] = _elbo_plan(config, dataset)
    if bool(e.enable_sampling):
        import solvers
        if config.sampling.method not in solvers.available():
            raise EvaluationError(f"sampling.method {config.sampling.method!r} is not one of "
                                  f"{', '.join(solvers.available())}")
        if str(config.sampling.task).lower() != "generate":
            raise EvaluationError(f"eval draws plain samples: sampling.task must be 'generate', not "
                                  f"{config.sampling.task!r} (or set eval.enable_sampling=false)")
        bs = int(e.generate_batch_size) or int(config.sampling.batch_size)
        samples = {"num": _positive(int(e.num_generated), "num_generated"),
                   "batch_size": _positive(bs, "generate_batch_size"), "seed": int(e.sample_seed),
                   "num_classes": int(config.model.num_classes), "sampling": config.sampling.to_dict()}
        plan["samples"] = samples
        kind = _metrics_kind(config)
        if kind != "none":
            if samples["num"] < 2:
                raise EvaluationError(f"sample metrics need eval.num_generated >= 2, got {samples['num']}")
            metrics = {"kind": kind, "samples": samples}
            if kind == "digits":
                metrics["floor_seed"] = int(e.seed)
            else:
                from ..evaluation.fid import PROTOCOLS
                # the convention a number was computed with is part of its settings (and of the summary)
                preprocess = _choice(e.fid_preprocess, tuple(PROTOCOLS), "fid_preprocess")
                prc_k = _positive(int(e.prc_neighborhood), "prc_neighborhood") if bool(e.enable_prc) else 0
                if prc_k and samples["num"] <= prc_k:
                    raise EvaluationError(f"precision / recall need eval.num_generated > eval.prc_neighborhood = "
                                          f"{prc_k}, got {samples['num']} (or set eval.enable_prc=false)")
                metrics.update(reference=_choice(e.fid_reference, ("train", "test"), "fid_reference"),
                               weights=os.path.basename(str(e.inception_weights)),
                               preprocess=preprocess,
                               kid_subsets=_positive(int(e.kid_subsets), "kid_subsets"),
                               kid_subset_size=_positive(int(e.kid_subset_size), "kid_subset_size", 2),
                               is_splits=_positive(int(e.is_splits), "is_splits"),
                               prc_neighborhood=prc_k, prc_seed=int(e.seed), **PROTOCOLS[preprocess])
            plan["metrics"] = metrics
    return _normalised(plan)


# ------------------------------------------------------------------------------------------------ checkpoints
def _checkpoint_step(path: str) -> int:
    m = CKPT_RE.search(os.path.basename(path))
    return int(m.group(1)) if m else int(load_checkpoint(path)["step"])


def _checkpoints(workdir: str, config, checkpoint) -> Tuple[List[Tuple[int, str]], bool]:
    """[(step, path)] to evaluate and whether that is 'every checkpoint'."""
    if checkpoint is None:
        checkpoint = int(config.eval.checkpoint)
    if checkpoint in (-1, "-1", "all"):
        found = list_checkpoints(workdir)
        if not found:
            raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first "
                                  f"(python main.py --mode train --workdir {workdir} ...)")
        return found, True
    path = resolve_checkpoint(workdir, checkpoint)
    return [(_checkpoint_step(path), path)], False


# ------------------------------------------------------------------------------------------------ state
class _State:
    """``step_<step>/state.json``: {"step", "stages": {name: {"settings", "done", "tensorboard", ...}}}."""

    def __init__(self, workdir: str, step: int):
        self.path = state_path(workdir, step)
        self.data = {"step": int(step), "stages": {}}
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                self.data = json.load(f)

    def save(self) -> None:
        atomic_write_text(json.dumps(self.data, indent=1), self.path)

    def stage(self, name: str, settings: dict, reset_hook=None) -> dict:
        """The record of a stage for these settings; a record made with other settings is discarded."""
        stages = self.data["stages"]
        rec = stages.get(name)
        if rec is not None and rec.get("settings") != settings:
            logging.warning("step %d: the %s settings changed since they were recorded; recomputing %s",
                            self.data["step"], name, name)
            rec = None
            if reset_hook:
                reset_hook()
        if rec is None:
            rec = stages[name] = {"settings": settings, "done": False, "tensorboard": False}
        return rec

    def complete(self, plan: Dict[str, dict]) -> bool:
        stages = self.data["stages"]
        return all(name in stages and stages[name].get("settings") == s and stages[name].get("done")
                   and stages[name].get("tensorboard") for name, s in plan.items())


def _atomic_savez(path: str, **arrays) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


class _Writer:
    """TensorBoard writer opened on first use; ``flush`` before a stage is marked as logged."""

    def __init__(self, workdir: str):
        self.logdir = os.path.join(workdir, "tensorboard")
        self.writer = None
        self.available = True

    def _get(self):
        if self.writer is None and self.available:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.warning("tensorboard is not installed: the JSON files are the only record")
                self.available = False
                return None
            self.writer = SummaryWriter(self.logdir)
        return self.writer

    def scalars(self, values: Dict[str, float], step: int) -> None:
        w = self._get()
        if w is not None:
            for tag, v in values.items():
                if v is not None and np.isfinite(v):
                    w.add_scalar(tag, float(v), step)

    def image(self, tag: str, img: np.ndarray, step: int) -> None:
        w = self._get()
        if w is not None:
            w.add_image(tag, img, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ------------------------------------------------------------------------------------------------ the context
class _Context:
    """What every checkpoint shares: config, device, test set, evaluators (built once, on first use)."""

    def __init__(self, config, workdir: str, device, dataset):
        self.config, self.workdir, self.device, self.dataset = config, workdir, device, dataset
        self.progress = None if bool(config.eval.progress) else True      # tqdm's disable: None = only on a tty
        self._digits = None
        self._inception = None
        self._reference = None
        self.current_path = None
        self.dist = distributed.current()
        self.workers_listening = self.dist.enabled        # the other ranks wait in _serve for rank 0's orders

    def order(self, order: dict) -> None:
        """Send the other ranks of the process group (waiting in ``_serve``) their next order; no-op in one
        process."""
        if self.workers_listening:
            self.dist.broadcast(order)

    def digits(self):
        if self._digits is None:
            from ..evaluation.digits import DigitsEvaluator
            self._digits = DigitsEvaluator(cache_dir=eval_dir(self.workdir), device=self.device)
            logging.info("digits classifier: test accuracy %.4f (%s)", self._digits.test_accuracy,
                         "trained" if self._digits.info["trained"] else "cached")
        return self._digits

    def inception(self):
        if self._inception is None:
            from ..evaluation.fid import InceptionMetrics
            preprocess = self.inception_preprocess()
            try:
                # (path, device) alone for the default convention: the call stand-ins in tests replace
                model = (load_fid_inception(self.config.eval.inception_weights, self.device)
                         if preprocess == "pytorch_fid" else
                         load_fid_inception(self.config.eval.inception_weights, self.device, preprocess=preprocess))
            except (FileNotFoundError, ValueError) as e:
                raise EvaluationError(str(e)) from None
            self._inception = InceptionMetrics(None, self.device, model=model)
        return self._inception

    def inception_preprocess(self) -> str:
        """``eval.fid_preprocess``: the Inception's input convention, ``pytorch_fid`` or ``tf``."""
        return str(self.config.eval.get("fid_preprocess", "pytorch_fid")).lower()

    def reference(self):
        """Inception statistics (mu, sigma, pool3) of the ``eval.fid_reference`` split, cached as .npz (one file per
        input convention: ``inception_<dataset>_<split>.npz`` for pytorch_fid's, ``inception_tf_...`` for TF's)."""
        if self._reference is None:
            from ..evaluation.fid import compute_features, feature_statistics, load_statistics, save_statistics
            split = str(self.config.eval.fid_reference).lower()
            tag = "" if self.inception_preprocess() == "pytorch_fid" else f"{self.inception_preprocess()}_"
            path = os.path.join(eval_dir(self.workdir),
                                f"inception_{tag}{self.config.data.dataset.lower()}_{split}.npz")
            if os.path.isfile(path):
                self._reference = load_statistics(path)
            else:
                from tqdm.auto import tqdm
                ds = get_dataset(self.config, split)
                metrics = self.inception()
                bs = metrics.batch_size
                batches = tqdm(ds.iterate(bs), total=math.ceil(len(ds) / bs), desc=f"inception {split} set",
                               dynamic_ncols=True, disable=self.progress)
                pool3 = compute_features(metrics.model, (x for x, _ in batches), self.device)["pool3"]
                mu, sigma = feature_statistics(pool3)
                pool3 = pool3.astype(np.float32)        # as stored: a later run (KID) sees the same features
                save_statistics(path, mu, sigma, pool3=pool3)
                self._reference = {"mu": mu, "sigma": sigma, "pool3": pool3}
                logging.info("Inception statistics of %d %s images -> %s", pool3.shape[0], split, path)
        return self._reference


def load_fid_inception(path, device, preprocess: str = "pytorch_fid"):
    from ..evaluation.inception import load_fid_inception as load
    return load(path, device, preprocess=preprocess)


# ------------------------------------------------------------------------------------------------ stages
def _stage_loss(ctx, model_fn, rec, state) -> dict:
    config, sde, model = model_fn()
    res = test_loss(config, sde, model, ctx.device)
    if not math.isfinite(res["test_loss"]):
        raise EvaluationError(f"the test loss of {ctx.current_path} is {res['test_loss']}: the model gives "
                              f"non-finite values (diverged or damaged weights)")
    logging.info("step %d: test loss %.6f over %d examples", state.data["step"], res["test_loss"],
                 res["num_examples"])
    return res


def _first_examples(dataset, n: int, batch_size: int):
    xs, ys, have = [], [], 0
    for x, y in dataset.iterate(batch_size):
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _test_batches(ctx, model_fn, n: int, bs: int):
    """What a per-batch likelihood stage needs: ``(config, sde, model, x_all, y_all, data scaler, conditional)``."""
    config, sde, model = model_fn()
    x_all, y_all = _first_examples(ctx.dataset, n, bs)
    return config, sde, model, x_all, y_all, get_data_scaler(config), int(config.model.num_classes) > 0


def _bpd_work(ctx, model_fn, s, step):
    """The function ``(r, i) -> unit`` computing bits/dim batch i of dequantisation draw r (its own seed), on any
    rank."""
    n, bs = s["num_examples"], s["batch_size"]
    config, sde, model, x_all, y_all, scaler, conditional = _test_batches(ctx, model_fn, n, bs)
    kwargs = dict(method=s["method"], solver=s["solver"], eps=s["eps"], dequantize=s["dequantize"])
    if s["dequantize"] is not None:
        kwargs.update(num_levels=s["num_levels"], data_range=tuple(s["data_range"]))
    for key in ("num_probes", "probe", "rtol", "atol", "num_steps"):
        if key in s:
            kwargs[key] = s[key]

    def work(unit):
        r, i = unit
        t0 = time.perf_counter()
        xb = scaler(x_all[i * bs:(i + 1) * bs]).to(ctx.device)
        yb = y_all[i * bs:(i + 1) * bs].to(ctx.device) if conditional else None
        gen = torch.Generator().manual_seed(mix_seed(s["seed"], _BPD_SALT, r, i))
        res = nll(sde, get_score_fn(sde, model, train=False, y=yb), xb, generator=gen, **kwargs)
        bpd = res.bpd.detach().double().cpu()
        if not torch.isfinite(bpd).all():
            raise EvaluationError(f"non-finite bits/dim in batch {i} of step {step}: the model in "
                                  f"{ctx.current_path} gives non-finite values (diverged or damaged weights)")
        return {"n": int(bpd.numel()), "sum_bpd": float(bpd.sum()), "sumsq_bpd": float((bpd ** 2).sum()),
                "sum_nll": float(res.nll.detach().double().sum()), "nfe": int(res.nfe),
                "seconds": time.perf_counter() - t0}
    return work


def _stage_bpd(ctx, model_fn, rec, state) -> dict:
    s = rec["settings"]
    n, bs, R = s["num_examples"], s["batch_size"], s["num_repeats"]
    nb = math.ceil(n / bs)
    units = rec.setdefault("units", {})
    todo = [(r, i) for r in range(R) for i in range(nb) if f"{r}:{i}" not in units]
    step = state.data["step"]
    if todo:
        def record(unit, result, bar):
            units[f"{unit[0]}:{unit[1]}"] = result
            done = units.values()
            bar.set_postfix(bpd=f"{sum(u['sum_bpd'] for u in done) / sum(u['n'] for u in done):.4f}")
        _run_units(ctx, model_fn, "bpd", s, step, todo, record, state, R * nb, R * nb - len(todo), "bits/dim",
                   lambda: f"{len(units)} of {R * nb} bits/dim batches")
    ordered = [units[f"{r}:{i}"] for r in range(R) for i in range(nb)]
    count = sum(u["n"] for u in ordered)
    total = sum(u["sum_bpd"] for u in ordered)
    mean = total / count
    var = max(sum(u["sumsq_bpd"] for u in ordered) - count * mean ** 2, 0.0) / max(count - 1, 1)
    result = {"bpd": mean, "bpd_stderr": math.sqrt(var / count),
              "nll_nats": sum(u["sum_nll"] for u in ordered) / count, "num_examples": n, "num_evaluations": count,
              "nfe_per_batch": sum(u["nfe"] for u in ordered) / len(ordered),
              "seconds": sum(u["seconds"] for u in ordered), "method": s["method"], "solver": s["solver"],
              "dequantize": s["dequantize"], "num_levels": s["num_levels"]}
    logging.info("step %d: %.4f +- %.4f bits/dim over %d test examples (%s trace, %s, dequantisation %s; %.0f NFE "
                 "per batch, %.1f s)", step, mean, result["bpd_stderr"], n, s["method"], s["solver"], s["dequantize"],
                 result["nfe_per_batch"], result["seconds"])
    return result


# ------------------------------------------------------------------------------------------------ elbo
def _elbo_plan(config, dataset) -> dict:
    """Settings of the ``elbo`` stage: DDPM's discrete bound (VP only) for each reverse variance, and the continuous
    bound (``eval.elbo_num_t`` > 0), on the first ``eval.elbo_num_examples`` test examples."""
    from .. import elbo as elbo_lib
    e = config.eval
    toy = config.data.dataset.lower() == "toy"
    n = int(e.elbo_num_examples)
    if n == 0 or n < -1:
        raise EvaluationError(f"eval.elbo_num_examples must be >= 1 or -1 (all), got {n}")
    n = len(dataset) if n == -1 or n > len(dataset) else n
    sde_name = str(config.training.sde).lower()
    discrete = sde_name in ("vp", "vpsde")
    if not discrete:
        logging.info("eval.enable_elbo: training.sde = %s has no DDPM chain; only the continuous bound is computed",
                     sde_name)
    K = int(e.elbo_num_steps)
    N = int(config.model.num_scales)
    if discrete and not 0 <= K <= N:
        raise EvaluationError(f"eval.elbo_num_steps must be in [0, model.num_scales = {N}] (0 = all), got {K}")
    num_t = int(e.elbo_num_t)
    if num_t < 0 or (num_t == 0 and not discrete):
        raise EvaluationError(f"eval.elbo_num_t must be >= 1 (the continuous bound is the only one on "
                              f"{sde_name}), got {num_t}" if not discrete else f"eval.elbo_num_t must be >= 0, "
                              f"got {num_t}")
    levels = 0 if toy else (int(e.get("bpd_num_levels", 0)) or int(getattr(dataset, "levels", 0)))
    if not toy and levels < 2:
        raise EvaluationError(f"the discretised decoder needs the data's levels (eval.bpd_num_levels or the "
                              f"dataset's), got {levels}")
    learned = bool(config.model.get("learned_variance", False))
    variances = (["beta", "posterior"] + (["learned"] if learned else [])) if discrete else []
    return {"num_examples": n, "batch_size": _positive(int(e.elbo_batch_size), "elbo_batch_size"),
            "seed": int(e.seed), "variances": variances, "num_steps": K if discrete else None,
            "decoder": "gaussian" if toy else "discretized", "num_levels": levels,
            "data_range": None if toy else ([-1.0, 1.0] if config.data.centered else [0.0, 1.0]),
            "clip_denoised": bool(e.elbo_clip_denoised), "num_t": num_t,
            "importance": _choice(e.elbo_importance, elbo_lib.IMPORTANCE, "elbo_importance")}


def _elbo_work(ctx, model_fn, s, step):
    """The function ``i -> unit`` computing the bounds of test batch i (its own seed), on any rank."""
    from .. import elbo as elbo_lib
    from ..networks import get_model
    n, bs = s["num_examples"], s["batch_size"]
    config, sde, model, x_all, y_all, scaler, conditional = _test_batches(ctx, model_fn, n, bs)
    dec = dict(decoder=s["decoder"], clip_denoised=s["clip_denoised"])
    if s["decoder"] == "discretized":
        dec.update(num_levels=s["num_levels"], data_range=tuple(s["data_range"]))

    def work(i):
        t0 = time.perf_counter()
        xb = scaler(x_all[i * bs:(i + 1) * bs]).to(ctx.device)
        yb = y_all[i * bs:(i + 1) * bs].to(ctx.device) if conditional else None
        m = get_model(sde, model, train=False, y=yb)
        gen = torch.Generator(device=ctx.device).manual_seed(mix_seed(s["seed"], _ELBO_SALT, i))
        bounds, nfe = {}, 0
        if s["variances"]:
            found = elbo_lib.discrete_elbos(sde, m, xb, num_steps=s["num_steps"] or None,
                                            variances=s["variances"], generator=gen, **dec)
            bounds.update(found)
            nfe += next(iter(found.values())).nfe
        if s["num_t"]:
            bounds["continuous"] = elbo_lib.continuous_elbo(sde, m, xb, num_t=s["num_t"],
                                                            importance=s["importance"], generator=gen, **dec)
            nfe += bounds["continuous"].nfe
        unit = {"n": int(xb.shape[0]), "nfe": nfe, "dim": int(xb[0].numel())}
        for name, b in bounds.items():
            total = b.total.detach().double().cpu()
            if not torch.isfinite(total).all():
                raise EvaluationError(f"non-finite {name} bound in batch {i} of step {step}: the model in "
                                      f"{ctx.current_path} gives non-finite values")
            unit[name] = {"sum": float(total.sum()), "sumsq": float((total ** 2).sum()),
                          **{f"sum_{k}": float(getattr(b, k).double().sum())
                             for k in ("prior", "diffusion", "decoder")}}
        unit["seconds"] = time.perf_counter() - t0
        return unit
    return work


def _stage_elbo(ctx, model_fn, rec, state) -> dict:
    """Per batch: every bound's per-example totals and terms, summed (and the totals' squares) into the unit."""
    s = rec["settings"]
    n, bs = s["num_examples"], s["batch_size"]
    nb = math.ceil(n / bs)
    units = rec.setdefault("units", {})
    todo = [i for i in range(nb) if str(i) not in units]
    step = state.data["step"]
    if todo:
        def record(i, result, bar):
            units[str(i)] = result
        _run_units(ctx, model_fn, "elbo", s, step, todo, record, state, nb, nb - len(todo), "bounds",
                   lambda: f"{len(units)} of {nb} bound batches")
    ordered = [units[str(i)] for i in range(nb)]
    count = sum(u["n"] for u in ordered)
    D = ordered[0]["dim"]
    to_bpd = 1.0 / (D * math.log(2.0))
    out = {}
    for name in [k for k in ordered[0] if isinstance(ordered[0][k], dict)]:
        mean = sum(u[name]["sum"] for u in ordered) / count
        var = max(sum(u[name]["sumsq"] for u in ordered) - count * mean ** 2, 0.0) / max(count - 1, 1)
        se = math.sqrt(var / count)
        out[name] = {"bpd": mean * to_bpd, "bpd_stderr": se * to_bpd, "nats": mean, "nats_stderr": se,
                     **{f"{k}_bpd": sum(u[name][f"sum_{k}"] for u in ordered) / count * to_bpd
                        for k in ("prior", "diffusion", "decoder")}}
    result = {"bounds": out, "num_examples": n, "dim": D, "num_steps": s["num_steps"], "num_t": s["num_t"],
              "importance": s["importance"], "decoder": s["decoder"], "num_levels": s["num_levels"],
              "nfe_per_batch": sum(u["nfe"] for u in ordered) / len(ordered),
              "seconds": sum(u["seconds"] for u in ordered)}
    for name, b in out.items():
        logging.info("step %d: %s bound %.4f +- %.4f bits/dim (prior %.4f, diffusion %.4f, decoder %.4f) over %d "
                     "test examples", step, name, b["bpd"], b["bpd_stderr"], b["prior_bpd"], b["diffusion_bpd"],
                     b["decoder_bpd"], n)
    return result


def _elbo_scalars(result: dict) -> Dict[str, float]:
    values = {}
    for name, b in result["bounds"].items():
        for k in ("bpd", "bpd_stderr", "prior_bpd", "diffusion_bpd", "decoder_bpd"):
            values[f"eval/elbo_{name}_{k}"] = b[k]
    return values


def _sample_batch_path(workdir, step, i) -> str:
    return os.path.join(step_dir(workdir, step), "sample_batches", f"batch_{i:06d}.npz")


def _reset_samples(workdir, step):
    def hook():
        shutil.rmtree(os.path.join(step_dir(workdir, step), "sample_batches"), ignore_errors=True)
        for name in ("samples.npz", "samples.png"):
            p = os.path.join(step_dir(workdir, step), name)
            if os.path.exists(p):
                os.remove(p)
    return hook


def _sample_work(ctx, model_fn, settings, step):
    """The function ``i -> (arrays, seconds)`` that draws sample batch i (its own seed), on any rank."""
    config, sde, model = model_fn()
    device = ctx.device
    N, bs = settings["num"], settings["batch_size"]
    classifier = None
    if str(config.sampling.guidance).lower() == "classifier":
        classifier = load_guidance_classifier(config, sde, device=device)
        num_classes = int(classifier[1].num_classes)
    else:
        num_classes = int(config.model.num_classes)
    labels = sampling_labels(config, N, num_classes)

    def work(i):
        t0 = time.perf_counter()
        b = min(bs, N - i * bs)
        lab = labels[i * bs:i * bs + b] if labels is not None else None
        res = generate(config, sde, model, num_samples=b, batch_size=b, device=device, labels=lab,
                       seed=mix_seed(settings["seed"], _SAMPLE_SALT, i), classifier=classifier)
        arrays = {"samples": res["samples"].numpy().astype(np.float32), "nfe": np.int64(res["nfe"])}
        if lab is not None:
            arrays["labels"] = lab.numpy().astype(np.int64)
        return arrays, time.perf_counter() - t0
    return work


#: the stages whose work units run on every rank of a process group (``_run_units``, ``_serve``)
_WORK = {"bpd": _bpd_work, "elbo": _elbo_work, "samples": _sample_work}


def _run_units(ctx, model_fn, kind, s, step, todo, record, state, total, done, desc, recorded) -> None:
    """Compute the stage's unrecorded units ``todo`` (on every rank of a process group: ``distributed.run_sharded``)
    and ``record(unit, result, bar)`` each one on rank 0, saving the state after each; a graceful stop raises with
    ``recorded()`` (what is recorded) in its message."""
    work = _WORK[kind](ctx, model_fn, s, step)       # rank 0 loads first: a failure here reaches the others as an order
    ctx.order({"kind": kind, "path": ctx.current_path, "settings": s, "todo": todo, "step": step})
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=done, desc=f"{desc} step {step}", unit="batch", dynamic_ncols=True,
               disable=ctx.progress)

    def rec(unit, result):
        record(unit, result, bar)
        state.save()
        bar.update(1)

    try:
        distributed.run_sharded(ctx.dist, todo, work, rec, where=f"{desc} for step {step}",
                                stop_message=lambda: f"stopped by {{signal}} while evaluating step {step}: "
                                f"{recorded()} recorded in {state.path}; run the same command to resume")
    except BaseException:
        ctx.workers_listening = False           # run_sharded stopped every rank
        raise
    finally:
        bar.close()


def _stage_samples(ctx, model_fn, rec, state) -> dict:
    s = rec["settings"]
    N, bs = s["num"], s["batch_size"]
    nb = math.ceil(N / bs)
    step = state.data["step"]
    batches = rec.setdefault("batches", {})
    for key in [k for k in batches if not os.path.isfile(_sample_batch_path(ctx.workdir, step, int(k)))]:
        logging.warning("step %d: sample batch %s is recorded but its file is gone; drawing it again", step, key)
        del batches[key]
    todo = [i for i in range(nb) if str(i) not in batches]
    config = ctx.config
    if todo:
        os.makedirs(os.path.dirname(_sample_batch_path(ctx.workdir, step, 0)), exist_ok=True)

        def record(i, result, bar):
            arrays, seconds = result
            _atomic_savez(_sample_batch_path(ctx.workdir, step, i), **arrays)
            batches[str(i)] = {"n": int(arrays["samples"].shape[0]), "nfe": int(arrays["nfe"]), "seconds": seconds}
        _run_units(ctx, model_fn, "samples", s, step, todo, record, state, nb, nb - len(todo), "samples",
                   lambda: f"{len(batches)} of {nb} sample batches")
        config = model_fn()[0]
    xs, ls = [], []
    for i in range(nb):
        with np.load(_sample_batch_path(ctx.workdir, step, i)) as z:
            xs.append(z["samples"])
            if "labels" in z.files:
                ls.append(z["labels"])
    result = {"samples": torch.from_numpy(np.concatenate(xs)), "labels": torch.from_numpy(np.concatenate(ls))
              if ls else None, "nfe": sum(batches[str(i)]["nfe"] for i in range(nb))}
    reference = None
    if config.data.dataset.lower() == "toy":
        reference = ctx.dataset.batch(0, min(5000, len(ctx.dataset)), 12345)[0]
    paths = save_samples(config, result, step_dir(ctx.workdir, step), step=step, reference=reference)
    out = {"num": N, "nfe": result["nfe"], "nfe_per_sample_batch": result["nfe"] / nb,
           "seconds": sum(batches[str(i)]["seconds"] for i in range(nb)),
           "npz": os.path.relpath(paths["npz"], eval_dir(ctx.workdir)),
           "png": os.path.relpath(paths["png"], eval_dir(ctx.workdir)), "method": s["sampling"]["method"],
           "num_steps": s["sampling"]["num_steps"]}
    logging.info("step %d: %d samples with %s (%d steps) in %.1f s -> %s", step, N, out["method"], out["num_steps"],
                 out["seconds"], paths["npz"])
    return out


def _load_samples(ctx, step) -> np.ndarray:
    with np.load(os.path.join(step_dir(ctx.workdir, step), "samples.npz")) as z:
        return z["samples"]


def _stage_metrics(ctx, model_fn, rec, state) -> dict:
    s = rec["settings"]
    step = state.data["step"]
    x = _load_samples(ctx, step)
    if s["kind"] == "digits":
        ev = ctx.digits()
        m = ev.metrics(x)
        floor = ev.floor(num_samples=x.shape[0], seed=s["floor_seed"])
        out = {"kind": "digits", "samples": m, "floor": floor, "classifier_test_accuracy": ev.test_accuracy}
        logging.info("step %d: digits Fréchet distance %.3f (real-data floor %.3f), confident %.3f (floor %.3f), "
                     "classes covered %d/10 (floor %d/10), %d samples", step, m["frechet_distance"],
                     floor["frechet_distance"], m["confident_share"], floor["confident_share"], m["coverage_classes"],
                     floor["coverage_classes"], m["num"])
        return out
    metrics = ctx.inception()
    m = metrics.compute(x, ctx.reference(), kid_subsets=s["kid_subsets"], kid_subset_size=s["kid_subset_size"],
                        is_splits=s["is_splits"], kid_seed=s.get("kid_seed", 0),
                        is_shuffle_seed=s.get("is_shuffle_seed"), prc_neighborhood=s.get("prc_neighborhood", 0),
                        prc_seed=s.get("prc_seed", 0))
    # the convention travels with the numbers: "pytorch_fid" (pytorch-fid's resize) or "tf" (torch-fidelity's)
    out = dict(kind="inception", reference=s["reference"], preprocess=s.get("preprocess", "pytorch_fid"),
               num=int(x.shape[0]), **m)
    logging.info("step %d: FID %.3f, KID %.5f +- %.5f, IS %.3f +- %.3f (%d samples vs the %s split, %s convention)",
                 step, m["fid"], m.get("kid_mean", float("nan")), m.get("kid_std", float("nan")), m["is_mean"],
                 m["is_std"], out["num"], s["reference"], out["preprocess"])
    if "precision" in m:
        logging.info("step %d: precision %.4f, recall %.4f (k = %d, %d reference features)", step, m["precision"],
                     m["recall"], s["prc_neighborhood"], m["prc_num_reference"])
    return out


_RUN = {"loss": _stage_loss, "bpd": _stage_bpd, "elbo": _stage_elbo, "samples": _stage_samples,
        "metrics": _stage_metrics}


def _log_stage(ctx, writer: _Writer, name: str, result: dict, step: int) -> None:
    if name == "loss":
        writer.scalars({"eval/test_loss": result["test_loss"]}, step)
    elif name == "bpd":
        writer.scalars({"eval/bpd": result["bpd"], "eval/bpd_stderr": result["bpd_stderr"],
                        "eval/bpd_nfe": result["nfe_per_batch"]}, step)
    elif name == "elbo":
        writer.scalars(_elbo_scalars(result), step)
    elif name == "samples":
        writer.scalars({"eval/sample_nfe": result["nfe_per_sample_batch"]}, step)
        x = torch.from_numpy(_load_samples(ctx, step))
        if x.dim() == 4:
            writer.image("eval/samples", image_grid(x[:64].clamp(0, 1)).numpy(), step)
        else:
            from PIL import Image
            png = np.asarray(Image.open(os.path.join(eval_dir(ctx.workdir), result["png"])).convert("RGB"))
            writer.image("eval/samples", png.transpose(2, 0, 1).astype(np.float32) / 255.0, step)
    elif name == "metrics":
        if result["kind"] == "digits":
            values = {}
            for prefix, m in (("eval/digits_", result["samples"]), ("eval/digits_floor_", result["floor"])):
                for k in ("frechet_distance", "confident_share", "coverage_classes"):
                    values[prefix + k] = m[k]
            writer.scalars(values, step)
        else:
            values = {"eval/fid": result["fid"], "eval/kid": result.get("kid_mean"),
                      "eval/inception_score": result["is_mean"]}
            for k in ("precision", "recall"):
                if result.get(k) is not None:
                    values[f"eval/{k}"] = result[k]
            writer.scalars(values, step)
    writer.flush()


def _summary(workdir: str, step: int, path: str, state: _State, plan) -> dict:
    st = state.data["stages"]
    loss = st["loss"]["result"]
    out = {"step": step, "checkpoint": path, "test_loss": loss["test_loss"], "num_examples": loss["num_examples"],
           "bpd": st["bpd"]["result"] if "bpd" in plan else None,
           "elbo": st["elbo"]["result"] if "elbo" in plan else None,
           "samples": st["samples"]["result"] if "samples" in plan else None,
           "metrics": st["metrics"]["result"] if "metrics" in plan else None,
           "state": os.path.relpath(state.path, eval_dir(workdir))}
    return out


def _evaluate_checkpoint(ctx, writer, plan, step: int, path: str) -> dict:
    state = _State(ctx.workdir, step)
    spath = summary_path(ctx.workdir, step)
    if state.complete(plan) and os.path.isfile(spath):
        with open(spath, encoding="utf-8") as f:
            summary = json.load(f)
        logging.info("step %d: already evaluated with these settings -> %s", step, spath)
        return summary
    loaded = {}
    ctx.current_path = path

    def model_fn():
        if "model" not in loaded:
            loaded["model"] = load_model(ctx.workdir, config=ctx.config, checkpoint=path, device=ctx.device)
        return loaded["model"]

    for name in STAGES:
        if name not in plan:
            continue
        hook = _reset_samples(ctx.workdir, step) if name == "samples" else None
        rec = state.stage(name, plan[name], reset_hook=hook)
        if not rec["done"]:
            rec["result"] = _RUN[name](ctx, model_fn, rec, state)
            rec["done"] = True
            rec["tensorboard"] = False
            state.save()
            lifecycle.check_stop(f"stopped by {{signal}} while evaluating step {step}: stage {name} recorded in "
                                 f"{state.path}; run the same command to resume")
            if name == "samples":
                shutil.rmtree(os.path.join(step_dir(ctx.workdir, step), "sample_batches"), ignore_errors=True)
        if not rec["tensorboard"]:
            _log_stage(ctx, writer, name, rec["result"], step)
            rec["tensorboard"] = True
            state.save()
    summary = _summary(ctx.workdir, step, path, state, plan)
    atomic_write_text(json.dumps(summary, indent=2), spath)
    return summary


def summary_line(s: dict) -> str:
    """One line: the test loss, bits/dim and sample metrics of a checkpoint summary."""
    parts = [f"step {s['step']}: test loss {s['test_loss']:.5f}"]
    if s.get("bpd"):
        parts.append(f"{s['bpd']['bpd']:.4f} +- {s['bpd']['bpd_stderr']:.4f} bits/dim")
    if s.get("elbo"):
        parts.append("bounds " + ", ".join(f"{k} {b['bpd']:.4f} +- {b['bpd_stderr']:.4f}"
                                           for k, b in s["elbo"]["bounds"].items()) + " bits/dim")
    m = s.get("metrics")
    if m and m["kind"] == "digits":
        a, f = m["samples"], m["floor"]
        parts.append(f"digits FD {a['frechet_distance']:.2f} (floor {f['frechet_distance']:.2f}), confident "
                     f"{a['confident_share']:.3f} (floor {f['confident_share']:.3f}), coverage "
                     f"{a['coverage_classes']}/10 (floor {f['coverage_classes']}/10)")
    elif m:
        text = f"FID {m['fid']:.2f}, KID {m.get('kid_mean', float('nan')):.4f}, IS {m['is_mean']:.2f}"
        if m.get("precision") is not None:
            text += f", precision {m['precision']:.3f}, recall {m['recall']:.3f}"
        parts.append(text + f" ({m.get('preprocess', 'pytorch_fid')} convention)")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------------ entry point
def evaluate(config, workdir: str, checkpoint=None, device=None) -> dict:
    """Evaluate every (or the named) checkpoint; see the module docstring.

    Returns the summary of the last checkpoint evaluated (``step``, ``test_loss``, ``num_examples``, ``bpd``,
    ``samples``, ``metrics``, ``path`` of its JSON file) with ``results``: the summaries of all, oldest first.
    Raises ``CheckpointError`` for an unknown checkpoint and ``EvaluationError`` for unusable eval settings or missing
    Inception weights, before any work is done.
    """
    dist = distributed.current()
    error = None
    try:
        config = _with_eval_defaults(config)
        configs_lib.validate(config, "eval")
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise EvaluationError(f"workdir {workdir} exists and is not a folder")
        device = distributed.rank_device(dist, get_device(device or config.device))
        ckpts, every = _checkpoints(workdir, config, checkpoint)
        dataset = get_dataset(config, "test")
        plan = _plan(config, dataset)
    except Exception as e:
        error = e
    dist.check(error, "the evaluation's set-up")     # in a process group: every rank stops, rank 0 says why
    if not dist.is_main:
        with lifecycle.handle_signals("graceful", context=f"evaluating {workdir} (rank {dist.rank})"):
            return _serve(dist, config, workdir, device, dataset)
    ctx = _Context(config, workdir, device, dataset)
    try:
        for step, path in ckpts:    # a corrupt checkpoint stops the evaluation before any work (or file), named
            done = _State(workdir, step).complete(plan) and os.path.isfile(summary_path(workdir, step))
            if not done and os.path.isfile(path):
                load_checkpoint(path, map_location="cpu")
        with lifecycle.WorkdirLock(workdir, "eval"), \
                lifecycle.handle_signals("graceful", context=f"evaluating {workdir}"):
            removed = remove_stale_temp_files([eval_dir(workdir)], recursive=True)
            if removed:
                logging.info("removed %d temporary file(s) left by an earlier, killed evaluation", len(removed))
            out = _evaluate(ctx, plan, ckpts, every)
    except BaseException as e:
        # release the other ranks: with rank 0's signal (they stop as it did) or its failure (one line, rank 0's)
        ctx.order({"kind": "stop", "signum": e.signum if isinstance(e, lifecycle.Interrupted) else None,
                   "message": str(e).splitlines()[0] if str(e) else type(e).__name__})
        raise
    ctx.order({"kind": "done"})
    return out


def _serve(dist, config, workdir: str, device, dataset) -> dict:
    """A rank other than 0 of an evaluation: compute its share of the units of every bits/dim, bounds and samples
    stage rank 0 orders (``_run_units``: ``run_sharded``), until rank 0 says it is done (return) or stopped (raise
    as it did).  Rank 0 alone reads the evaluation state, runs the test loss and the sample metrics and writes every
    file; this rank waits for its next order meanwhile (at most ``compute.dist_timeout`` seconds: the process
    group's timeout)."""
    ctx = _Context(config, workdir, device, dataset)         # the test set and device; this rank writes nothing
    loaded = {}
    while True:
        order = dist.broadcast(None)
        kind = order["kind"]
        if kind == "done":
            return {"rank": dist.rank}
        if kind == "stop":
            if order["signum"] is not None:
                e = lifecycle.Stopped(int(order["signum"]), order["message"])
            else:
                e = distributed.RankFailedError(f"rank 0 of {dist.world_size} failed during the evaluation: "
                                                f"{order['message']}")
            e.reported_by_rank0 = True
            raise e
        ctx.current_path = order["path"]
        try:
            if loaded.get("path") != order["path"]:
                loaded.clear()
                loaded["model"] = load_model(workdir, config=config, checkpoint=order["path"], device=device)
                loaded["path"] = order["path"]
            work = _WORK[kind](ctx, lambda: loaded["model"], order["settings"], order["step"])
        except Exception as e:                     # reported through the first round, on every rank
            def work(unit, error=e):
                raise error

        distributed.run_sharded(dist, order["todo"], work, lambda unit, result: None,
                                where=f"{kind} for step {order['step']}")


def _evaluate(ctx, plan, ckpts, every) -> dict:
    workdir = ctx.workdir
    pending = [(s, p) for s, p in ckpts
               if not (_State(workdir, s).complete(plan) and os.path.isfile(summary_path(workdir, s)))]
    if pending and plan.get("metrics", {}).get("kind") == "inception":
        ctx.inception()             # missing or wrong weights: fail before any work
    logging.info("evaluating %d checkpoint(s) of %s (%d already done): stages %s", len(ckpts), workdir,
                 len(ckpts) - len(pending), ", ".join(plan))
    writer = _Writer(workdir)
    results = []
    try:
        for step, path in ckpts:
            if every and not os.path.isfile(path) and (step, path) in pending:
                logging.warning("checkpoint %s disappeared (pruned by a running training?); skipped", path)
                continue
            summary = _evaluate_checkpoint(ctx, writer, plan, step, path)
            logging.info("%s", summary_line(summary))
            results.append(dict(summary, path=summary_path(workdir, step)))
    finally:
        writer.close()
    if not results:
        raise CheckpointError(f"no checkpoint of {checkpoint_dir(workdir)} could be evaluated")
    return dict(results[-1], results=results)
