"""Where a run's images come from: the folder ``data.root`` (generated for the demo) or the
TFDS data prepared from it in ``data.tfds_dir``; and which categories a run covers."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from rstpm_jax.data import mvtec


@dataclasses.dataclass(frozen=True)
class Source:
    """``root``: the MVTec-layout folder; ``tfds_dir``: prepared TFDS data to read instead (or None)."""

    root: str
    tfds_dir: str | None = None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(name)


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[Source, list[str]]:
    """Resolve ``data.root`` (relative to the workdir when the demo generates it), generate the
    demo data or prepare the TFDS data if asked (host 0; the others wait), and the categories."""
    root = os.path.expanduser(str(config.data.root))
    if config.data.generate_synthetic:
        if not os.path.isabs(root):
            root = os.path.join(workdir, root)
        if not os.path.isdir(root):
            if jax.process_index() == 0:
                from rstpm_jax.data import synthetic  # noqa: PLC0415
                logging.info("Generating the synthetic demo dataset in %s", root)
                synthetic.generate(root, seed=int(config.seed))
            _sync("synthetic-data")
    root = os.path.abspath(root)
    tfds_dir = os.path.abspath(os.path.expanduser(str(config.data.tfds_dir))) if config.data.tfds_dir else None
    categories = resolve_categories(root, str(config.data.categories), tfds_dir)
    if tfds_dir:
        from rstpm_jax.data import tfds_mvtec  # noqa: PLC0415 (TensorFlow)
        if jax.process_index() == 0:
            for category in categories:
                tfds_mvtec.prepare(root, category, tfds_dir)
        _sync("tfds-prepared")
    return Source(root, tfds_dir), categories


def resolve_categories(root: str, spec: str, tfds_dir: str | None = None) -> list[str]:
    """``data.categories`` -> names. With prepared TFDS data and no folder under ``root``, the
    categories prepared there."""
    if tfds_dir and not os.path.isdir(root):
        from rstpm_jax.data import tfds_mvtec  # noqa: PLC0415
        prepared = tfds_mvtec.prepared_categories(tfds_dir)
        names = prepared if spec.strip().lower() == "all" else [
            s.strip() for s in spec.split(",") if s.strip()]
        missing = [n for n in names if n not in prepared]
        if missing or not names:
            raise ValueError(f"data.categories={spec!r}: {missing or 'none'} not prepared in "
                             f"data.tfds_dir={tfds_dir} (prepared: {prepared or 'none'}) and data.root="
                             f"{root} does not exist to prepare them from.")
        return names
    return mvtec.resolve_categories(root, spec)


def check_categories(source: Source, categories: Sequence[str],
                     config: ml_collections.ConfigDict | None = None) -> None:
    """Before the first category trains: every image and mask of every category decoded (a
    folder source; prepared TFDS data was decoded when prepared), and, with ``config``, each
    category's training split (after ``data.holdout_fraction``) at least ``train.batch_size``.
    Raises naming the file or the category."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow, for prepared TFDS data)

    t0, n = time.time(), 0
    for category in categories:
        files = (input_pipeline.category_files(source.root, category, source.tfds_dir) if source.tfds_dir
                 else mvtec.scan_category(source.root, category, verify=True))
        n += len(files.train) + len(files.test) + sum(t.mask_path is not None for t in files.test)
        if config is None:
            continue
        holdout, gbs = float(config.data.holdout_fraction), int(config.train.batch_size)
        try:
            train, _ = input_pipeline.split_train_holdout(files.train, holdout, int(config.seed))
        except ValueError as e:
            raise ValueError(f"{category}: {e}") from e
        # With train.drop_last=False (the default) a small split is one padded batch.
        if config.mode == "train" and len(train) < gbs and config.train.get("drop_last", False):
            raise ValueError(f"{category}: {len(train)} training images (after holding out "
                             f"data.holdout_fraction={holdout}) is fewer than config.train.batch_size={gbs} "
                             "with train.drop_last=True; lower the batch size, add images to train/good or "
                             "set train.drop_last=False.")
    logging.info("Checked %d files of %d categories in %.1f s.", n, len(categories), time.time() - t0)
