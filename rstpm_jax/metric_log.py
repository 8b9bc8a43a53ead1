"""Training metrics as JSON lines and TensorBoard scalars (host 0 only)."""

from __future__ import annotations

import json
import os

import jax
from absl import logging


def truncate(path: str, resume_step: int) -> int:
    """Keep the records of ``path`` with ``step <= resume_step`` (and drop a torn last line);
    rewritten atomically. Returns how many records were dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = int(record["step"]) <= resume_step
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                keep = False
            if keep:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return dropped


class MetricLog:
    """``DIR/metrics.jsonl`` and ``DIR/tensorboard``: one record per logged step.

    ``resume_step``: training resumes after that step, so records logged after it (by the
    interrupted run, about to be repeated) are dropped from metrics.jsonl first. TensorBoard
    event files are append-only; TensorBoard itself discards such orphaned steps when it sees a
    step go back (its purge_orphaned_data default).
    """

    def __init__(self, directory: str, resume_step: int | None = None):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            if resume_step is not None:
                dropped = truncate(self.path, int(resume_step))
                if dropped:
                    logging.info("%s: dropped %d record(s) after step %d (resumed there).", self.path,
                                 dropped, resume_step)
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
