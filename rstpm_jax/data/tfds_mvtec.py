"""TFDS builder for MVTec AD (and any folder with its layout), read from a manual-download directory.

One builder config per category; splits ``train`` (train/good) and ``test``. Categories
that are not one of MVTec AD's 15 get a config made on the fly (``builder()``)::

    b = tfds_mvtec.builder("bottle", data_dir="WORKDIR/tfds")
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=ROOT))
    ds = b.as_dataset(split="test")

or ``tfds_mvtec.prepare(ROOT, "bottle", "WORKDIR/tfds")`` for both steps.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from rstpm_jax.data import mvtec

try:  # TF only prepares data here: keep it off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialised
    pass

_CITATION = """\
@inproceedings{bergmann2019mvtec,
  title={MVTec AD -- A Comprehensive Real-World Dataset for Unsupervised Anomaly Detection},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages={9592--9601},
  year={2019}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
MVTec AD cannot be downloaded automatically (its licence, CC BY-NC-SA 4.0, asks you to
accept it on the website). Get `mvtec_anomaly_detection.tar.xz` from
{mvtec.MVTEC_URL} and extract it:

    mkdir -p ~/data/mvtec_anomaly_detection
    tar -xf mvtec_anomaly_detection.tar.xz -C ~/data/mvtec_anomaly_detection

Then pass that folder as the manual directory, e.g.
`tfds.download.DownloadConfig(manual_dir="~/data/mvtec_anomaly_detection")`. It must hold
one folder per category: <category>/train/good/*.png, <category>/test/<defect>/*.png and
<category>/ground_truth/<defect>/<name>_mask.png. Your own products in the same layout work
too (any folder name becomes a config).
"""


class MvtecAd(tfds.core.GeneratorBasedBuilder):
    """MVTec AD: defect-free training images; test images with pixel masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=c, description=f"MVTec AD category {c!r} "
                                f"({'texture' if c in mvtec.TEXTURES else 'object'}).")
        for c in mvtec.CATEGORIES
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png",
                                            doc="0/255; all zero for good images"),
                "label": tfds.features.ClassLabel(names=["good", "defect"]),
                "defect_type": tfds.features.Text(),
                "file_name": tfds.features.Text(doc="path relative to the category folder"),
            }),
            homepage=mvtec.MVTEC_URL,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        files = mvtec.scan_category(os.fspath(dl_manager.manual_dir), self.builder_config.name)
        return {"train": self._generate_examples(files, "train"),
                "test": self._generate_examples(files, "test")}

    def _generate_examples(self, files: mvtec.CategoryFiles, split: str):
        cdir = os.path.join(files.root, files.category)
        items = files.test if split == "test" else [
            mvtec.TestItem(p, None, 0, mvtec.GOOD) for p in files.train]
        for item in items:
            image = mvtec.read_rgb(item.path)
            h, w = image.shape[:2]
            if item.mask_path is None:
                mask = np.zeros((h, w), np.uint8)
            else:
                mask = mvtec.read_mask(item.mask_path, (w, h))
            name = os.path.relpath(item.path, cdir).replace(os.sep, "/")
            yield name, {"image": image, "mask": (mask * 255)[..., None], "label": item.label,
                         "defect_type": item.defect, "file_name": name}


def builder(category: str, data_dir: str | None = None) -> MvtecAd:
    """The builder for ``category``; a config is made on the fly for non-MVTec names."""
    if category in MvtecAd.builder_configs:
        return MvtecAd(config=category, data_dir=data_dir)
    config = tfds.core.BuilderConfig(name=category, version=MvtecAd.VERSION,
                                     description=f"User category {category!r} in the MVTec AD layout.")
    return MvtecAd(config=config, data_dir=data_dir)


def prepare(root: str, category: str, data_dir: str) -> MvtecAd:
    """Builds ``category`` from the manual directory ``root`` into ``data_dir`` (no-op if done)."""
    b = builder(category, os.path.expanduser(data_dir))
    b.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.path.expanduser(root)))
    return b


class Record(NamedTuple):
    """One prepared example: PNG bytes of the image and mask, the label and the defect type."""

    image: bytes
    mask: bytes
    label: int
    defect: str


_RECORDS: dict[tuple[str, str, str], dict[str, Record]] = {}


def record_name(root: str, category: str, path: str) -> str:
    """The ``file_name`` a prepared example of ``path`` has (relative to the category folder)."""
    return os.path.relpath(path, os.path.join(os.path.expanduser(root), category)).replace(os.sep, "/")


def read_split(root: str, category: str, split: str, data_dir: str) -> dict[str, Record]:
    """``{file_name: Record}`` of a prepared split (prepared from ``root`` first if absent)."""
    key = (os.path.abspath(os.path.expanduser(data_dir)), category, split)
    if key not in _RECORDS:
        b = prepare(root, category, data_dir)
        ds = b.as_dataset(split=split, shuffle_files=False, decoders={
            "image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()})
        _RECORDS[key] = {ex["file_name"].decode(): Record(ex["image"], ex["mask"], int(ex["label"]),
                                                          ex["defect_type"].decode())
                         for ex in ds.as_numpy_iterator()}
    return _RECORDS[key]


def category_files(root: str, category: str, data_dir: str) -> mvtec.CategoryFiles:
    """The category as prepared in ``data_dir``, in ``mvtec.scan_category``'s order; the raw
    folder is needed only to prepare it. When the raw folder is there too, its file list must
    match the prepared one."""
    train = read_split(root, category, "train", data_dir)
    test = read_split(root, category, "test", data_dir)
    cdir = os.path.join(os.path.expanduser(root), category)
    if mvtec.is_category_dir(cdir):
        raw = mvtec.scan_category(root, category, verify=False)
        raw_names = {record_name(root, category, p) for p in raw.train} | {
            record_name(root, category, t.path) for t in raw.test}
        if raw_names != set(train) | set(test):
            changed = sorted(raw_names ^ (set(train) | set(test)))
            raise ValueError(
                f"The TFDS data of {category!r} in {data_dir} is stale: {len(changed)} file(s) differ "
                f"from {cdir} (e.g. {changed[:3]}). Delete {os.path.join(data_dir, 'mvtec_ad', category)} "
                "to rebuild it.")
    items = sorted(test.items(), key=lambda kv: (kv[1].defect != mvtec.GOOD, kv[1].defect, kv[0]))
    return mvtec.CategoryFiles(
        category=category, root=os.path.expanduser(root),
        train=[os.path.join(cdir, n) for n in sorted(train)],
        test=[mvtec.TestItem(os.path.join(cdir, n), None if r.label == 0 else f"{n} (mask in TFDS)",
                             r.label, r.defect) for n, r in items])


def prepared_categories(data_dir: str) -> list[str]:
    """Categories with prepared data under ``data_dir``."""
    base = os.path.join(os.path.expanduser(data_dir), "mvtec_ad")
    return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d))) \
        if os.path.isdir(base) else []
