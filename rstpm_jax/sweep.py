"""Ablation sweep (paper Tables 4-5): every ablation over the requested categories, one table.

``python -m rstpm_jax.sweep --config configs/mvtec.py --workdir DIR [--models stpm,rstpm]``
trains and evaluates each model into ``DIR/<model>/`` with the data/train/eval keys of
``--config`` and writes ``DIR/ablation.md`` and ``.csv``.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from rstpm_jax import run
from rstpm_jax.ablations import ABLATIONS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per model.")
flags.DEFINE_list("models", list(ABLATIONS), f"Models to run, from {list(ABLATIONS)}.")
config_flags.DEFINE_config_file("config", None, "Base config (data, train, eval keys).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run.quiet_library_logs()
    run.sweep(FLAGS.config, FLAGS.workdir, FLAGS.models)


if __name__ == "__main__":
    app.run(main)
