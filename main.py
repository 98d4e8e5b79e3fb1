"""Command line: train, sample or evaluate a score-based diffusion model.

    python main.py --mode train  --config vp_digits --workdir runs/digits
    python main.py --mode sample --workdir runs/digits [--config.sampling.method=pc] [--checkpoint 6000]
    python main.py --mode eval   --workdir runs/digits

``--config`` takes a named config (vp_cifar, subvp_cifar, ve_cifar, vp_digits, toy_2d, toy_1d), a Python file with
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
flags.DEFINE_enum("mode", None, ["train", "sample", "eval"], "What to do.")
flags.DEFINE_string("config", None, "Config name, .py file with get_config(), or .json file "
                    "(default: <workdir>/config.json of an existing run).")
flags.DEFINE_string("workdir", None, "Run folder: checkpoints, TensorBoard logs, samples.")
flags.DEFINE_string("checkpoint", None, "sample/eval: checkpoint step or path (default: the latest).")
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
        elif FLAGS.mode == "sample":
            from sde_diffusion.run.sampling import sample
            out = sample(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, device=FLAGS.device,
                         out_dir=FLAGS.out_dir)
            print(f"samples: {out['npz']}\ngrid:    {out['png']}")
        else:
            from sde_diffusion.run.evaluate import evaluate
            out = evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, device=FLAGS.device)
            print(f"step {out['step']}: test loss {out['test_loss']:.6f} ({out['num_examples']} examples) "
                  f"-> {out['path']}")
    except (DatasetError, CheckpointError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
