"""Command line: train, sample or evaluate a score-based diffusion model.

``python main.py --mode MODE ...`` in a checkout, or the installed console command ``sde-diffusion MODE ...`` (the same
flags; the mode may come first without ``--mode``):

    python main.py --mode train  --config vp_digits --workdir runs/digits
    sde-diffusion train          --config vp_digits --workdir runs/digits
    python main.py --mode sample --workdir runs/digits [--config.sampling.method=pc] [--checkpoint 6000]
    python main.py --mode eval   --workdir runs/digits
    python main.py --mode train_classifier --config digits_classifier --workdir runs/digits_cls
    python main.py --mode train_autoencoder --config ldm_digits --workdir runs/digits_ae    (latent diffusion: then
    python main.py --mode train --config ldm_digits --workdir runs/ldm_digits                 its latent model)
    python main.py --mode export --workdir runs/digits [--checkpoint 6000] [--out_dir DIR] [--overwrite]

Models from elsewhere and exported models (``--mode sample``, no checkpoint in the workdir needed; samples go to
``<workdir>/samples/diffusers`` or ``.../export_step_<step>``):

    --config.model.source=diffusers --config.model.path=DIR     (a diffusers UNet2DModel folder + scheduler config)
    --config.model.source=export --config.model.path=DIR        (a folder written by --mode export)

Controllable generation (``--mode sample``):

    --config.sampling.class_label=3 --config.sampling.guidance=cfg --config.sampling.guidance_scale=2
    --config.sampling.guidance=classifier --config.sampling.classifier_workdir=runs/digits_cls
    --config.sampling.task=inpaint --config.sampling.dataset_index=5 --config.sampling.mask=right_half
    --config.sampling.task=colorize --config.sampling.image=PATH          (3-channel data)

``--config`` takes a named config (vp_cifar, subvp_cifar, ve_cifar, vp_digits, toy_2d, toy_1d, vp_digits_cond,
vp_cifar_cond, digits_classifier, cifar_classifier, fm_digits, edm_digits, fm_cifar, edm_cifar, ldm_digits, ldm_cifar;
configs.CONFIG_NAMES lists all), a Python file with
``get_config()`` or a JSON file; without it the run's own ``<workdir>/config.json`` is used (to resume, sample or
evaluate).  Any key can be overridden
with ``--config.a.b=v`` (or ``--config.a.b v``): an unknown key or a value of the wrong type is an error naming the
closest valid keys.

Data-parallel training on K processes (one per GPU, or CPU processes with gloo), one or several nodes:

    torchrun --nproc_per_node=K main.py --mode train --config vp_cifar --workdir runs/cifar
    torchrun --nnodes=N --node_rank=I --nproc_per_node=K --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        --rdzv_id=cifar main.py --mode train --config vp_cifar --workdir /shared/runs/cifar

Only rank 0 prints messages and writes files; ``--mode sample`` and ``--mode eval`` run in one process.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
MODES = ("train", "sample", "eval", "train_classifier", "export", "train_autoencoder")
flags.DEFINE_enum("mode", None, list(MODES),
                  "What to do (train_classifier: the time-dependent classifier for classifier guidance; export: "
                  "the EMA weights as safetensors + config.json; train_autoencoder: the KL autoencoder of a latent "
                  "config such as ldm_digits).")
flags.DEFINE_string("config", None, "Config name, .py file with get_config(), or .json file "
                    "(default: <workdir>/config.json of an existing run).")
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, TensorBoard logs, samples.")
flags.DEFINE_string("checkpoint", None, "sample: checkpoint step or path (default: the latest); eval: "
                    "that checkpoint only (default: every checkpoint not yet evaluated).")
flags.DEFINE_string("device", None, "cpu, cuda, cuda:1, ... (default: config.device = auto: CUDA when available).")
flags.DEFINE_string("out_dir", None, "sample: output folder (default <workdir>/samples/step_<step>); export: the "
                    "export's folder (default <workdir>/export/step_<step>).")
flags.DEFINE_bool("overwrite", False, "export: replace an export already in the output folder.")
flags.mark_flags_as_required(["mode", "workdir"])

_OVERRIDES = []


def _split_overrides(argv):
    """Take ``--config.a.b=v`` / ``--config.a.b v`` out of argv (absl does not know them)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" in body:
                overrides.append(body)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{body}={argv[i + 1]}")
                i += 1
            else:
                raise SystemExit(f"error: override {arg} needs a value (--config.{body}=VALUE)")
            i += 1
            continue
        rest.append(arg)
        i += 1
    return rest, overrides


def _parse_flags(argv):
    rest, overrides = _split_overrides(argv)
    _OVERRIDES.extend(overrides)
    try:
        return FLAGS(rest)
    except flags.Error as e:
        sys.stderr.write(f"error: {e}\nPass --helpfull to see all flags.\n")
        sys.exit(2)


def _override_value(overrides, key):
    """The value ``--config.<key>=v`` sets (the last one), or None."""
    value = None
    for item in overrides:
        k, sep, v = item.partition("=")
        if sep and k.strip() == key:
            value = v.strip().strip("'\"")
    return value


def load_config(name_or_path, workdir, mode, overrides):
    from sde_diffusion import configs
    if not name_or_path:
        stored = os.path.join(workdir, "config.json")
        source = (_override_value(overrides, "model.source") or "ours").lower()
        if not os.path.isfile(stored) and mode == "sample" and source == "diffusers":
            # a model from elsewhere needs no run: the base config (its data shape is taken from the UNet)
            from sde_diffusion.configs.default import get_default_config
            config = get_default_config()
            config.lock()
            return configs.apply_overrides(config, overrides)
        if not os.path.isfile(stored) and mode == "sample" and source == "export":
            exported = os.path.join(_override_value(overrides, "model.path") or "", "config.json")
            if os.path.isfile(exported):
                stored = exported            # the exported run's config, as a workdir's config.json would be
        if not os.path.isfile(stored):
            raise configs.ConfigError(f"--config is required (no {stored} to fall back on); named configs: "
                                      f"{', '.join(configs.CONFIG_NAMES)}")
        name_or_path = stored
    config = configs.get_config(name_or_path)
    return configs.apply_overrides(config, overrides)


def _rank() -> int:
    """This process's rank under torchrun (0 outside it)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _say(text: str, error: BaseException = None) -> None:
    """One line on stderr (the message's own line breaks folded).  Under torchrun only rank 0 speaks for the group:
    another rank prints only its own failure that no collective handed to rank 0 (a config error is the same on every
    rank, so rank 0's line says it)."""
    if _rank() != 0:
        from sde_diffusion import configs
        if error is None or getattr(error, "reported_by_rank0", False) or isinstance(error, configs.ConfigError):
            return
        text = f"[rank {_rank()}] {text}"
    sys.stderr.write(" ".join(str(text).split("\n")).rstrip() + "\n")
    sys.stderr.flush()


def apply_threads(config) -> int:
    """``torch.set_num_threads(config.compute.threads)`` (0 keeps PyTorch's default); returns the thread count."""
    import torch
    section = config.get("compute")
    n = int(section.get("threads", 0)) if section is not None else 0
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def main(argv):
    if len(argv) > 1:
        _say(f"error: unexpected arguments {argv[1:]}")
        sys.exit(2)
    from sde_diffusion.run import lifecycle
    with lifecycle.handle_signals("abort", context=f"--mode {FLAGS.mode} in {FLAGS.workdir}"):
        try:
            code = _run()
        except lifecycle.Interrupted as e:
            if _rank() == 0:
                _say(str(e))
            code = e.exit_code
    from sde_diffusion.run import distributed
    distributed.exit_process(code)      # a torchrun rank ends here, without tearing its gloo / NCCL group down
    sys.exit(code)


def _train(config):
    from sde_diffusion.run.train import train
    return train(config, FLAGS.workdir, device=FLAGS.device)


def _sample(config):
    from sde_diffusion.run.sampling import sample
    return sample(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, device=FLAGS.device, out_dir=FLAGS.out_dir)


def _eval(config):
    from sde_diffusion.run.evaluate import evaluate
    return evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, device=FLAGS.device)


#: the modes torchrun can start (one process group; rank 0 prints and writes)
_SHARDED_RUN = {"train": _train, "sample": _sample, "eval": _eval}
SHARDED = tuple(_SHARDED_RUN)


def _run() -> int:
    """The mode's work; returns the exit code: 0 done, 1 a run-time failure, 2 a usage / config error (every failure is
    one line on stderr, no traceback)."""
    from sde_diffusion import configs
    from sde_diffusion.atomic import WriteError
    from sde_diffusion.data import DatasetError
    from sde_diffusion.run import distributed, lifecycle
    from sde_diffusion.run.checkpoints import CheckpointError
    from sde_diffusion.run.classifier_train import ClassifierError
    from sde_diffusion.run.evaluate import EvaluationError
    from sde_diffusion.run.sampling import SamplingError
    from sde_diffusion.run.train import NonFiniteLossError, WorkdirError, prepare_workdir
    try:
        prepare_workdir(FLAGS.workdir, create=False)
        # export reads the config stored in the checkpoint; any other mode needs one
        config = None if FLAGS.mode == "export" else load_config(FLAGS.config, FLAGS.workdir, FLAGS.mode, _OVERRIDES)
        if FLAGS.mode in ("train", "sample", "eval"):
            configs.validate(config, FLAGS.mode)
        if distributed.env_world() is not None and distributed.env_world()[1] > 1 and FLAGS.mode not in SHARDED:
            raise configs.ConfigError(f"--mode {FLAGS.mode} runs in one process; start it with python, not torchrun "
                                      f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')}; torchrun runs "
                                      f"{', '.join('--mode ' + m for m in SHARDED)})")
    except (configs.ConfigError, WorkdirError, ValueError) as e:
        _say(f"error: {e}", e)
        return 2
    if FLAGS.mode in ("train", "sample", "eval", "train_autoencoder"):
        apply_threads(config)
    try:
        if FLAGS.mode in SHARDED:
            ctx = distributed.init_from_env(FLAGS.device or config.device,
                                            float(config.compute.dist_timeout) if "compute" in config else 1800.0)
            if not ctx.is_main:
                from absl import logging as absl_logging
                absl_logging.set_verbosity(absl_logging.WARNING)
            try:
                out = _SHARDED_RUN[FLAGS.mode](config)
                distributed.synchronize()          # success on every rank: tear the group down together
            finally:
                distributed.shutdown()
            if not ctx.is_main:
                return 0
        if FLAGS.mode == "train":
            if out.get("nothing_to_do"):
                print(f"nothing to do: {FLAGS.workdir} is already at step {out['step']} >= training.n_iters = "
                      f"{int(config.training.n_iters)} (checkpoint {out['checkpoint']}); raise "
                      f"--config.training.n_iters to train further")
            else:
                print(f"training done at step {out['step']}: checkpoint {out['checkpoint']}")
        elif FLAGS.mode == "train_classifier":
            from sde_diffusion.run.classifier_train import train_classifier
            out = train_classifier(config, FLAGS.workdir, device=FLAGS.device)
            acc = ", ".join(f"t={t}: {a:.3f}" for t, a in out["eval"]["accuracy"].items())
            print(f"step {out['step']}: checkpoint {out['checkpoint']}\ntest accuracy of p(y | x_t, t): {acc}")
        elif FLAGS.mode == "train_autoencoder":
            from sde_diffusion.run.autoencoder_train import train_autoencoder
            out = train_autoencoder(config, FLAGS.workdir, device=FLAGS.device)
            if out["nothing_to_do"]:
                print(f"nothing to do: {FLAGS.workdir} is already at step {out['step']} >= autoencoder.n_iters; "
                      f"checkpoint {out['checkpoint']}")
            else:
                ev = out["eval"]
                print(f"autoencoder done at step {out['step']}: checkpoint {out['checkpoint']}\n"
                      f"test reconstruction mse/pixel {ev['test_mse']:.5f} (mean image {ev['mean_image_mse']:.5f}), "
                      f"KL {ev['test_kl']:.2f} nats/example, latents {tuple(ev['latent_shape'])}, scale factor "
                      f"{out['scale_factor']:.4f}")
        elif FLAGS.mode == "export":
            from sde_diffusion.run.export import export_model
            if _OVERRIDES or FLAGS.config:
                raise configs.ConfigError("--mode export writes the config stored in the checkpoint: it takes no "
                                          "--config nor --config.* overrides")
            out = export_model(FLAGS.workdir, checkpoint=FLAGS.checkpoint, out_dir=FLAGS.out_dir,
                               overwrite=FLAGS.overwrite)
            print(f"exported the EMA weights of step {out['step']} ({out['num_tensors']} tensors, "
                  f"{out['num_parameters']} parameters)\nweights: {out['weights']}\nconfig:  {out['config']}\n"
                  f"sample with: --mode sample --workdir DIR --config.model.source=export "
                  f"--config.model.path={out['out_dir']}")
        elif FLAGS.mode == "sample":
            print(f"samples: {out['npz']}\ngrid:    {out['png']}")
            if out.get("class_accuracy"):
                acc = out["class_accuracy"]
                per = " ".join(f"{k}:{v:.2f}" for k, v in acc["per_class"].items())
                print(f"digits classifier agrees with the requested class: {acc['overall']:.3f} overall; {per}")
        else:
            from sde_diffusion.run.evaluate import summary_line
            for summary in out["results"]:
                print(f"{summary_line(summary)} -> {summary['path']}")
    except (configs.ConfigError, WorkdirError) as e:
        _say(f"error: {e}", e)
        return 2
    except (DatasetError, CheckpointError, ClassifierError, SamplingError, EvaluationError, NonFiniteLossError,
            lifecycle.WorkdirLockedError, WriteError, distributed.RankFailedError) as e:
        _say(f"error: {e}", e)
        return 1
    except FloatingPointError as e:        # solvers.NonFiniteError: the network's scores are not finite
        _say(f"error: {e}; the model gives non-finite values (diverged or damaged weights): try an earlier "
             f"checkpoint (--checkpoint STEP)", e)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _say(f"error: {where}{e.strerror or e}", e)
        return 1
    return 0


def cli(argv) -> int:
    """Run the command line ``argv`` (``argv[0]`` is the program name) in this process; returns the exit code.
    For tests and scripts: the same parsing, messages and exit codes as ``python main.py ...``."""
    FLAGS.unparse_flags()
    del _OVERRIDES[:]
    try:
        rest = _parse_flags(_console_argv(argv))
        main(rest)
    except SystemExit as e:
        if isinstance(e.code, str):
            _say(e.code)
            return 2
        return 0 if e.code is None else int(e.code)
    return 0


def _console_argv(argv):
    """``sde-diffusion MODE ...`` -> ``sde-diffusion --mode MODE ...`` (a leading positional mode is the subcommand)."""
    argv = list(argv)
    if len(argv) > 1 and not argv[1].startswith("-"):
        if argv[1] not in MODES:
            raise SystemExit(f"error: unknown command {argv[1]!r}; commands: {', '.join(MODES)} "
                             f"(sde-diffusion COMMAND --workdir DIR [--config NAME] ...; --helpfull lists all flags)")
        argv[1:2] = ["--mode", argv[1]]
    return argv


def run(argv=None) -> None:
    """Entry point of ``python main.py`` and of the ``sde-diffusion`` console command (setup.py)."""
    try:
        argv = _console_argv(sys.argv if argv is None else argv)
    except SystemExit as e:
        _say(str(e.code))
        sys.exit(2)
    app.run(main, argv=argv, flags_parser=_parse_flags)
