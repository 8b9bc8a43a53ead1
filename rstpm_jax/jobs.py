"""The jobs of a run: one model per (category, seed), each with its own folder and config.

With one seed (``train.seeds`` empty, or one value) a job's folder is ``WORKDIR/<category>``
as always. With several, ``WORKDIR/seed_<s>/`` is a workdir of its own per seed (its
``config.json`` and ``teachers/``, so predict and export take it as ``--workdir``) and the
job's folder is ``WORKDIR/seed_<s>/<category>``. Jobs whose models are built alike form one
group, trained side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import ml_collections


@dataclasses.dataclass(frozen=True)
class Job:
    """One model to train: its category, seed, config (``seed`` set) and run folder."""

    name: str  # "<category>", or "seed_<s>/<category>" in a run of several seeds
    category: str
    seed: int
    workdir: str  # the folder holding config.json and teachers/ (the job's own run)
    config: ml_collections.ConfigDict = dataclasses.field(compare=False, hash=False, repr=False)

    @property
    def directory(self) -> str:
        return os.path.join(self.workdir, self.category)


def seeds_of(config: ml_collections.ConfigDict) -> list[int]:
    """``train.seeds`` (comma-separated, or a list) or ``[config.seed]``."""
    spec = config.train.get("seeds", "")
    if isinstance(spec, str):
        values = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        values = list(spec or [])
    try:
        seeds = list(dict.fromkeys(int(v) for v in values))
    except ValueError as e:
        raise ValueError(f"config.train.seeds={spec!r}: give integers, e.g. '0,1,2'.") from e
    return seeds or [int(config.seed)]


def runs(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[int, str, ml_collections.ConfigDict]]:
    """``(seed, run folder, its config)`` per seed: the workdir itself for one seed, else
    ``WORKDIR/seed_<s>``."""
    seeds = seeds_of(config)
    out = []
    for seed in seeds:
        cfg = copy.deepcopy(config)
        cfg.seed = seed
        out.append((seed, workdir if len(seeds) == 1 else os.path.join(workdir, f"seed_{seed}"), cfg))
    return out


def plan(config: ml_collections.ConfigDict, workdir: str, categories: list[str]) -> list[Job]:
    """Every (seed, category) of a run, seeds outermost."""
    return [Job(os.path.relpath(os.path.join(run_dir, c), workdir), c, seed, run_dir, cfg)
            for seed, run_dir, cfg in runs(config, workdir) for c in categories]


def run_dirs(jobs: list[Job]) -> dict[str, ml_collections.ConfigDict]:
    """``{run folder: its config}`` (one per seed)."""
    return {j.workdir: j.config for j in jobs}
