"""Command line: train, sample or evaluate a score-based diffusion model.

    python main.py --mode train  --config vp_digits --workdir runs/digits
    python main.py --mode sample --workdir runs/digits [--config.sampling.method=pc] [--checkpoint 6000]
    python main.py --mode eval   --workdir runs/digits
    python main.py --mode train_classifier --config digits_classifier --workdir runs/digits_cls

Controllable generation (``--mode sample``):

    --config.sampling.class_label=3 --config.sampling.guidance=cfg --config.sampling.guidance_scale=2
    --config.sampling.guidance=classifier --config.sampling.classifier_workdir=runs/digits_cls
    --config.sampling.task=inpaint --config.sampling.dataset_index=5 --config.sampling.mask=right_half
    --config.sampling.task=colorize --config.sampling.image=PATH          (3-channel data)

``--config`` takes a named config (vp_cifar, subvp_cifar, ve_cifar, vp_digits, toy_2d, toy_1d, vp_digits_cond,
vp_cifar_cond, digits_classifier, cifar_classifier), a Python file with
``get_config()`` or a JSON file; without it the run's own ``<workdir>/config.json`` is used (to resume, sample or
evaluate).  Any key can be overridden
with ``--config.a.b=v`` (or ``--config.a.b v``): an unknown key or a value of the wrong type is an error naming the
closest valid keys.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", None, ["train", "sample", "eval", "train_classifier"],
                  "What to do (train_classifier: the time-dependent classifier for classifier guidance).")
flags.DEFINE_string("config", None, "Config name, .py file with get_config(), or .json file "
                    "(default: <workdir>/config.json of an existing run).")
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, TensorBoard logs, samples.")
flags.DEFINE_string("checkpoint", None, "sample: checkpoint step or path (default: the latest); eval: "
                    "that checkpoint only (default: every checkpoint not yet evaluated).")
flags.DEFINE_string("device", None, "cpu, cuda, cuda:1, ... (default: config.device = auto: CUDA when available).")
flags.DEFINE_string("out_dir", None, "sample: output folder (default <workdir>/samples/step_<step>).")
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


def load_config(name_or_path, workdir, mode, overrides):
    from sde_diffusion import configs
    if not name_or_path:
        stored = os.path.join(workdir, "config.json")
        if not os.path.isfile(stored):
            raise configs.ConfigError(f"--config is required (no {stored} to fall back on); named configs: "
                                      f"{', '.join(configs.CONFIG_NAMES)}")
        name_or_path = stored
    config = configs.get_config(name_or_path)
    return configs.apply_overrides(config, overrides)


def main(argv):
    if len(argv) > 1:
        sys.stderr.write(f"error: unexpected arguments {argv[1:]}\n")
        sys.exit(2)
    from sde_diffusion import configs
    from sde_diffusion.data import DatasetError
    from sde_diffusion.run.checkpoints import CheckpointError
    from sde_diffusion.run.classifier_train import ClassifierError
    from sde_diffusion.run.sampling import SamplingError
    from sde_diffusion.run.evaluate import EvaluationError
    try:
        config = load_config(FLAGS.config, FLAGS.workdir, FLAGS.mode, _OVERRIDES)
    except configs.ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    try:
        if FLAGS.mode == "train":
            from sde_diffusion.run.train import NonFiniteLossError, train
            try:
                train(config, FLAGS.workdir, device=FLAGS.device)
            except NonFiniteLossError as e:
                sys.stderr.write(f"error: {e}\n")
                sys.exit(1)
        elif FLAGS.mode == "train_classifier":
            from sde_diffusion.run.classifier_train import train_classifier
            out = train_classifier(config, FLAGS.workdir, device=FLAGS.device)
            acc = ", ".join(f"t={t}: {a:.3f}" for t, a in out["eval"]["accuracy"].items())
            print(f"step {out['step']}: checkpoint {out['checkpoint']}\ntest accuracy of p(y | x_t, t): {acc}")
        elif FLAGS.mode == "sample":
            from sde_diffusion.run.sampling import sample
            out = sample(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, device=FLAGS.device,
                         out_dir=FLAGS.out_dir)
            print(f"samples: {out['npz']}\ngrid:    {out['png']}")
            if out.get("class_accuracy"):
                acc = out["class_accuracy"]
                per = " ".join(f"{k}:{v:.2f}" for k, v in acc["per_class"].items())
                print(f"digits classifier agrees with the requested class: {acc['overall']:.3f} overall; {per}")
        else:
            from sde_diffusion.run.evaluate import evaluate, summary_line
            out = evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, device=FLAGS.device)
            for summary in out["results"]:
                print(f"{summary_line(summary)} -> {summary['path']}")
    except (DatasetError, CheckpointError, ClassifierError, SamplingError, EvaluationError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
