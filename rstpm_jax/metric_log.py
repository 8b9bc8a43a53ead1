"""Training metrics as JSON lines and TensorBoard scalars (host 0 only)."""

from __future__ import annotations

import json
import os

import jax
from absl import logging


class MetricLog:
    """``DIR/metrics.jsonl`` and ``DIR/tensorboard``: one record per logged step."""

    def __init__(self, directory: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            try:
                from flax.metrics import tensorboard  # noqa: PLC0415 (needs TensorFlow)
                self.writer = tensorboard.SummaryWriter(os.path.join(directory, "tensorboard"))
            except ImportError as e:  # pragma: no cover - TF is in the train extra
                logging.warning("TensorBoard logging off (%s).", e)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.scalar(f"train/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
