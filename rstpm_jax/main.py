"""Entry point: ``python -m rstpm_jax.main --config configs/mvtec.py --workdir DIR``.

Trains RSTPM on each requested MVTec AD category, then evaluates it and writes reports.
Override any config key on the command line, e.g. ``--config.data.categories=bottle,cable``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
import logging as std_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries(record) -> bool:
    """Keep orbax's per-save INFO chatter out of the log; warnings and errors pass."""
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    from rstpm_jax import sharding, train  # noqa: PLC0415

    cfg = FLAGS.config
    sharding.initialize_distributed(cfg.distributed.coordinator_address,
                                    int(cfg.distributed.num_processes), int(cfg.distributed.process_id))
    logging.info("config:\n%s", cfg)
    train.train_and_evaluate(cfg, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
