"""Entry point: ``python -m rstpm_jax.main --config configs/mvtec.py --workdir DIR``.

Trains RSTPM on each requested MVTec AD category, then evaluates it and writes reports.
Override any config key on the command line, e.g. ``--config.data.categories=bottle,cable``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rstpm_jax import run  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run.quiet_library_logs()
    logging.info("config:\n%s", FLAGS.config)
    run.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
