"""Ablation sweep (paper Tables 4-5): every ablation over the requested categories, one table.

``python -m rstpm_jax.sweep --config configs/mvtec.py --workdir DIR [--models stpm,rstpm]``
trains and evaluates each model into ``DIR/<model>/`` with the data/train/eval keys of
``--config`` and writes ``DIR/ablation.md`` and ``.csv``.
"""

from __future__ import annotations

import copy
import os

from absl import app, flags, logging
from ml_collections import config_flags

from rstpm_jax.ablations import ABLATIONS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Sweep directory: one sub-directory per model.")
flags.DEFINE_list("models", list(ABLATIONS), f"Models to run, from {list(ABLATIONS)}.")
config_flags.DEFINE_config_file("config", None, "Base config (data, train, eval keys).", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def sweep(config, workdir: str, models: list[str]) -> dict[str, dict[str, dict]]:
    """Run ``models`` (names in ABLATIONS) and write the comparison table; returns their results."""
    from rstpm_jax import reports, sharding, train  # noqa: PLC0415

    unknown = [m for m in models if m not in ABLATIONS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {list(ABLATIONS)}.")
    sharding.initialize_distributed(config.distributed.coordinator_address,
                                    int(config.distributed.num_processes),
                                    int(config.distributed.process_id))
    results = {}
    for name in models:
        cfg = copy.deepcopy(config)
        ABLATIONS[name](cfg)
        logging.info("sweep: %s", name)
        results[name] = train.train_and_evaluate(cfg, os.path.join(workdir, name))
    import jax  # noqa: PLC0415
    if jax.process_index() == 0:
        reports.write_ablation_table(workdir, {m: [{"category": c, **r} for c, r in res.items()]
                                               for m, res in results.items()})
    return results


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sweep(FLAGS.config, FLAGS.workdir, FLAGS.models)


if __name__ == "__main__":
    app.run(main)
