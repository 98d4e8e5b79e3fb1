"""``python main.py --mode train|sample|eval|train_classifier ...`` — the command line of a checkout; the installed
package has the same as the console command ``sde-diffusion``.  See ``sde_diffusion/cli.py`` (or ``--helpfull``)."""
from sde_diffusion.cli import (FLAGS, MODES, apply_threads, cli, load_config, main,  # noqa: F401  (re-exported)
                               run, _parse_flags, _split_overrides)

if __name__ == "__main__":
    run()
