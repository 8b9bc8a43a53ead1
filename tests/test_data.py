"""Data: MVTec layout scan, synthetic dataset, TFDS builder and the tf.data pipeline."""

import hashlib
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from rstpm_jax.data import input_pipeline as ip
from rstpm_jax.data import mvtec, preprocess, synthetic

STD_LEVEL = 1.0 / 255 / preprocess.IMAGENET_STD.min()  # one grey level after normalisation


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    counts = synthetic.generate(out, seed=0)
    assert set(counts) == set(synthetic.CATEGORIES)
    return out


@pytest.fixture
def broken(root, tmp_path):
    """A writable copy of the small grayscale category, to break in each test."""
    dst = tmp_path / "data"
    shutil.copytree(os.path.join(root, "mesh"), dst / "mesh")
    return str(dst)


def _files_digest(folder):
    h = hashlib.sha256()
    for dirpath, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            h.update(os.path.relpath(os.path.join(dirpath, name), folder).encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def _to_uint8(images):
    return np.round((images * preprocess.IMAGENET_STD + preprocess.IMAGENET_MEAN) * 255).astype(np.int32)


def _collect(batches):
    batches = list(batches)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# --- categories, synthetic data, scan -------------------------------------------------


def test_category_names():
    assert len(mvtec.CATEGORIES) == 15 and len(set(mvtec.CATEGORIES)) == 15
    assert set(mvtec.TEXTURES) == {"carpet", "grid", "leather", "tile", "wood"}
    assert set(mvtec.TEXTURES) | set(mvtec.OBJECTS) == set(mvtec.CATEGORIES)
    assert not set(mvtec.TEXTURES) & set(mvtec.OBJECTS)


def test_synthetic_counts_match_scan(root):
    for category in synthetic.CATEGORIES:
        files = mvtec.scan_category(root, category)
        assert len(files.train) == synthetic.NUM_TRAIN
        per_defect = {}
        for item in files.test:
            per_defect[item.defect] = per_defect.get(item.defect, 0) + 1
            assert item.label == (item.defect != "good")
            assert (item.mask_path is None) == (item.defect == "good")
        expected = {"good": synthetic.NUM_TEST_GOOD}
        expected.update({d: synthetic.NUM_TEST_PER_DEFECT for d in synthetic.DEFECTS[category]})
        assert per_defect == expected
        assert files.test[0].defect == "good"  # good first, then defects A-Z
    assert ip.num_examples(root, "fabric", "test") == 4 + 3 * 4
    assert ip.num_examples(root, "fabric", "holdout", holdout_fraction=0.1) == 3
    assert ip.num_examples(root, "fabric", "train", holdout_fraction=0.1) == 29
    assert ip.num_examples(root, "fabric", "holdout", holdout_fraction=0.0) == 0
    # grayscale stays grayscale on disk, colour is RGB
    with Image.open(mvtec.scan_category(root, "mesh").train[0]) as im:
        assert im.mode == "L" and im.size == (128, 128)
    with Image.open(mvtec.scan_category(root, "button").train[0]) as im:
        assert im.mode == "RGB"


def test_synthetic_is_deterministic_small_and_has_a_cli(root, tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path / "a"), "--seed", "0"])
    assert "wrote 136 images" in capsys.readouterr().out
    assert _files_digest(str(tmp_path / "a")) == _files_digest(root)
    synthetic.generate(str(tmp_path / "b"), seed=1, categories=("mesh",))
    assert _files_digest(str(tmp_path / "b" / "mesh")) != _files_digest(os.path.join(root, "mesh"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    assert size < 5 * 2**20
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.generate(str(tmp_path / "b"), seed=1, categories=("mesh",))
    synthetic.generate(str(tmp_path / "b"), seed=0, categories=("mesh",), overwrite=True)
    assert _files_digest(str(tmp_path / "b" / "mesh")) == _files_digest(os.path.join(root, "mesh"))


def test_a_larger_synthetic_test_split_keeps_the_demo_images(root, tmp_path):
    """More test images (a finer AUROC for a model trained on the demo data) leave the training
    images and the demo's test images as they were, byte for byte."""
    out = tmp_path / "big"
    synthetic.main(["--out", str(out), "--categories", "mesh", "--num-test-good", "6", "--num-test-per-defect", "5"])
    big, demo = out / "mesh", os.path.join(root, "mesh")
    assert _files_digest(str(big / "train")) == _files_digest(os.path.join(demo, "train"))
    for defect in ("good", *synthetic.DEFECTS["mesh"]):
        assert len(os.listdir(big / "test" / defect)) == (6 if defect == "good" else 5)
        for name in os.listdir(os.path.join(demo, "test", defect)):
            kept = (big / "test" / defect / name).read_bytes()
            with open(os.path.join(demo, "test", defect, name), "rb") as f:
                assert kept == f.read(), (defect, name)
    for defect in synthetic.DEFECTS["mesh"]:
        assert len(os.listdir(big / "ground_truth" / defect)) == 5


def test_resolve_categories(root, tmp_path):
    assert mvtec.resolve_categories(root, "all") == ["button", "fabric", "mesh"]
    assert mvtec.resolve_categories(root, " mesh,fabric ,mesh") == ["mesh", "fabric"]
    with pytest.raises(ValueError, match="bottle.*button, fabric, mesh.*mvtec.com"):
        mvtec.resolve_categories(root, "bottle,mesh")
    url = "mvtec.com/company/research/datasets/mvtec-ad"
    with pytest.raises(FileNotFoundError, match=f"does not exist.*{url}"):
        mvtec.resolve_categories(str(tmp_path / "nowhere"), "all")
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(ValueError, match="No category folder.*stuff.*mvtec.com"):
        mvtec.resolve_categories(str(tmp_path / "empty"), "all")


def test_split_train_holdout():
    files = [f"f{i:02d}.png" for i in range(30)]
    train, hold = ip.split_train_holdout(files, 0.1, seed=3)
    assert (train, hold) == ip.split_train_holdout(files, 0.1, seed=3)
    assert len(hold) == 3 and sorted(train + hold) == files and not set(train) & set(hold)
    assert train == sorted(train) and hold == sorted(hold)  # input order kept
    assert hold != ip.split_train_holdout(files, 0.1, seed=4)[1]
    assert ip.split_train_holdout(files, 0.0, seed=3) == (files, [])
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="holdout_fraction"):
            ip.split_train_holdout(files, bad, seed=0)


# --- pipeline -----------------------------------------------------------------------


def test_image_and_mask_aligned_at_native_size(root):
    """Under each mask the pipeline's image has exactly the drawn defect colour, nowhere else."""
    for category in synthetic.CATEGORIES:
        items = ip.test_items(root, category)
        out = _collect(ip.eval_dataset(root, category, image_size=128, global_batch_size=8,
                                       process_index=0, process_count=1))
        pixels = _to_uint8(out["image"])
        assert sorted(out["index"][out["valid"]]) == list(range(len(items)))
        for k, i in enumerate(out["index"]):
            if not out["valid"][k]:
                continue
            item = items[i]
            if item.mask_path is None:
                assert out["mask"][k].sum() == 0 and out["label"][k] == 0
                continue
            with Image.open(item.mask_path) as m:
                np.testing.assert_array_equal(out["mask"][k], np.asarray(m) > 0)
            color = np.array(synthetic.DEFECT_COLORS[category][item.defect])
            dist = np.abs(pixels[k] - color).max(-1)
            mask = out["mask"][k].astype(bool)
            assert mask.sum() > 0 and out["label"][k] == 1
            assert dist[mask].max() <= 1
            assert dist[~mask].min() > 5


def test_image_and_mask_aligned_after_resize(root):
    items = ip.test_items(root, "fabric")
    out = _collect(ip.eval_dataset(root, "fabric", image_size=64, global_batch_size=16,
                                   process_index=0, process_count=1))
    assert out["image"].shape == (16, 64, 64, 3) and out["mask"].shape == (16, 64, 64)
    assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) <= {0, 1}
    pixels = _to_uint8(out["image"])
    for k, i in enumerate(out["index"]):
        if items[i].label:
            color = np.array(synthetic.DEFECT_COLORS["fabric"][items[i].defect])
            dist = np.abs(pixels[k] - color).mean(-1)
            mask = out["mask"][k].astype(bool)
            assert np.median(dist[mask]) < np.median(dist[~mask]) / 4, items[i].path
            if items[i].defect != "scratch":  # blobs: solid inside; a 4-px scratch blurs at 2 px
                assert np.median(dist[mask]) < 15 < np.median(dist[~mask]), items[i].path


def test_normalisation_and_pil_parity(root):
    files = ip._items(root, "button", "train", 0.1, 0)
    raw = np.stack([np.asarray(Image.open(f.path).convert("RGB")) for f in files]).astype(np.float64)
    images, idx = ip.load_images(root, "button", "train", image_size=128, holdout_fraction=0.1, seed=0,
                                 process_index=0, process_count=1)
    np.testing.assert_array_equal(idx, np.arange(len(files)))
    expected = ((raw / 255 - preprocess.IMAGENET_MEAN) / preprocess.IMAGENET_STD).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(images.astype(np.float64).mean(axis=(0, 1, 2)), expected, atol=1e-5)
    np.testing.assert_allclose(images[3], preprocess.load_image_file(files[3].path, 128), atol=1e-5)


def test_pipeline_and_predict_preprocess_identically(broken):
    """Resized images (colour, grayscale, JPEG, odd sizes): the tf.data pipeline feeds exactly
    the pixels predict's PIL preprocessing makes (issue 18: TF's resize differed by about one
    grey level in 16% of the pixels)."""
    cdir = os.path.join(broken, "mesh")
    good = os.path.join(cdir, "train", "good")
    rgb = Image.open(os.path.join(good, "000.png")).convert("RGB")
    rgb.resize((150, 90), Image.BILINEAR).save(os.path.join(good, "odd_size.png"))
    rgb.save(os.path.join(good, "photo.jpg"), quality=90)
    files = mvtec.scan_category(broken, "mesh").train
    for size in (64, (48, 80)):
        images, idx = ip.load_images(broken, "mesh", "train", image_size=size, holdout_fraction=0.0,
                                     seed=0, process_index=0, process_count=1)
        ref = np.stack([preprocess.load_image_file(files[i], size) for i in idx])
        np.testing.assert_array_equal(images, ref)
    out = _collect(ip.eval_dataset(broken, "mesh", image_size=(48, 80), global_batch_size=12,
                                   process_index=0, process_count=1))
    items = ip.test_items(broken, "mesh")
    np.testing.assert_array_equal(out["image"], np.stack([preprocess.load_image_file(items[i].path, (48, 80))
                                                          for i in out["index"]]))


def test_grayscale_becomes_three_equal_channels(root):
    batch = next(iter(ip.train_dataset(root, "mesh", image_size=128, global_batch_size=4, seed=0,
                                       epoch=0, holdout_fraction=0.1, process_index=0,
                                       process_count=1)))
    assert batch["image"].shape == (4, 128, 128, 3)
    pixels = _to_uint8(batch["image"])
    assert np.abs(pixels[..., 0] - pixels[..., 1]).max() <= 1
    assert np.abs(pixels[..., 0] - pixels[..., 2]).max() <= 1
    train = ip._items(root, "mesh", "train", 0.1, 0)
    gray = np.asarray(Image.open(train[batch["index"][0]].path))
    assert np.abs(pixels[0, ..., 1] - gray).max() <= 1


def test_eval_every_image_once_over_two_hosts(root):
    n = ip.num_examples(root, "fabric", "test")
    single = _collect(ip.eval_dataset(root, "fabric", image_size=32, global_batch_size=6,
                                      process_index=0, process_count=1))
    assert single["valid"].sum() == n and list(single["index"][:n]) == list(range(n))
    seen, lengths = [], []
    for p in range(2):
        ds = ip.eval_dataset(root, "fabric", image_size=32, global_batch_size=6,
                             process_index=p, process_count=2)
        batches = list(ds)
        lengths.append(len(batches))
        assert len(ds) == len(batches) == int(np.ceil(n / 6))
        for b in batches:
            assert b["image"].shape[0] == 3
            valid = b["valid"]
            assert (b["index"][~valid] == -1).all() and (b["image"][~valid] == 0).all()
            seen += list(b["index"][valid])
            for k in np.nonzero(valid)[0]:
                np.testing.assert_array_equal(b["image"][k], single["image"][b["index"][k]])
                np.testing.assert_array_equal(b["mask"][k], single["mask"][b["index"][k]])
    assert lengths[0] == lengths[1]
    assert sorted(seen) == list(range(n))
    assert list(ip.eval_dataset(root, "fabric", split="holdout", holdout_fraction=0.0, image_size=32,
                                global_batch_size=4, process_index=0, process_count=1)) == []


def test_train_order_depends_only_on_seed_and_epoch(root):
    def run(seed, epoch, p=0, num_hosts=1):
        return list(ip.train_dataset(root, "fabric", image_size=32, global_batch_size=8, seed=seed,
                                     epoch=epoch, holdout_fraction=0.1, process_index=p,
                                     process_count=num_hosts))
    a, b = run(0, 0), run(0, 0)
    n = ip.num_examples(root, "fabric", "train")  # 29 -> 3 batches of 8, remainder dropped
    assert len(a) == n // 8
    order = np.concatenate([x["index"] for x in a])
    np.testing.assert_array_equal(order, np.concatenate([x["index"] for x in b]))
    np.testing.assert_array_equal(a[1]["image"], b[1]["image"])
    assert len(set(order.tolist())) == len(order) and order.max() < n
    assert not np.array_equal(order, np.concatenate([x["index"] for x in run(0, 1)]))
    assert not np.array_equal(order, np.concatenate([x["index"] for x in run(1, 0)]))
    # two hosts read disjoint halves of the same global batches
    h0, h1 = run(0, 0, 0, 2), run(0, 0, 1, 2)
    for g, x0, x1 in zip(a, h0, h1):
        np.testing.assert_array_equal(g["index"], np.concatenate([x0["index"], x1["index"]]))
    # decoding every epoch (no in-memory cache) gives the same batches
    uncached = list(ip.train_dataset(root, "fabric", image_size=32, global_batch_size=8, seed=0, epoch=0,
                                     holdout_fraction=0.1, process_index=0, process_count=1,
                                     cache_max_bytes=0))
    for x, y in zip(a, uncached):
        np.testing.assert_array_equal(x["index"], y["index"])
        np.testing.assert_array_equal(x["image"], y["image"])
    # the image is the file at that index
    files = ip._items(root, "fabric", "train", 0.1, 0)
    np.testing.assert_allclose(a[0]["image"][0], preprocess.load_image_file(files[a[0]["index"][0]].path, 32),
                               atol=STD_LEVEL + 1e-4)


# --- TFDS builder ---------------------------------------------------------------------


def test_tfds_builder_prepares_and_loads_both_splits(root, tmp_path):
    from rstpm_jax.data import tfds_mvtec
    assert "mvtec.com" in tfds_mvtec.MvtecAd.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert set(tfds_mvtec.MvtecAd.builder_configs) == set(mvtec.CATEGORIES)
    data_dir = str(tmp_path / "tfds")
    builder = tfds_mvtec.prepare(root, "mesh", data_dir)  # not an MVTec name: dynamic config
    assert builder.info.splits["train"].num_examples == synthetic.NUM_TRAIN
    assert builder.info.splits["test"].num_examples == 4 + 2 * 4
    files = mvtec.scan_category(root, "mesh")
    by_name = {os.path.relpath(t.path, os.path.join(root, "mesh")): t for t in files.test}
    test = list(builder.as_dataset(split="test").as_numpy_iterator())
    assert sorted(ex["file_name"].decode() for ex in test) == sorted(by_name)
    for ex in test:
        item = by_name[ex["file_name"].decode()]
        gray = np.asarray(Image.open(item.path))
        assert ex["image"].shape == (128, 128, 3)
        np.testing.assert_array_equal(ex["image"], np.repeat(gray[..., None], 3, -1))
        assert ex["label"] == item.label and ex["defect_type"].decode() == item.defect
        expected = np.zeros_like(gray) if item.mask_path is None else np.asarray(Image.open(item.mask_path))
        np.testing.assert_array_equal(ex["mask"][..., 0], expected)
    train = list(builder.as_dataset(split="train").as_numpy_iterator())
    assert sorted(ex["file_name"].decode() for ex in train) == sorted(
        os.path.relpath(p, os.path.join(root, "mesh")) for p in files.train)
    assert all(ex["label"] == 0 and ex["mask"].max() == 0 for ex in train)
    # the pipeline reading through TFDS gives the same batches as reading the files
    for split in ("test", "holdout"):
        via_tfds = _collect(ip.eval_dataset(root, "mesh", split=split, image_size=40, global_batch_size=4,
                                            process_index=0, process_count=1, data_dir=data_dir))
        direct = _collect(ip.eval_dataset(root, "mesh", split=split, image_size=40, global_batch_size=4,
                                          process_index=0, process_count=1))
        for key in direct:
            np.testing.assert_array_equal(via_tfds[key], direct[key])
    t1 = next(iter(ip.train_dataset(root, "mesh", image_size=40, global_batch_size=4, seed=0, epoch=2,
                                    holdout_fraction=0.1, process_index=0, process_count=1,
                                    data_dir=data_dir)))
    t2 = next(iter(ip.train_dataset(root, "mesh", image_size=40, global_batch_size=4, seed=0, epoch=2,
                                    holdout_fraction=0.1, process_index=0, process_count=1)))
    np.testing.assert_array_equal(t1["index"], t2["index"])
    np.testing.assert_array_equal(t1["image"], t2["image"])


# --- bad input ------------------------------------------------------------------------


def test_missing_category_lists_what_was_found(root):
    with pytest.raises(FileNotFoundError, match="'bottle' not found.*button, fabric, mesh.*mvtec-ad"):
        mvtec.scan_category(root, "bottle")


def test_empty_train_good(broken):
    for f in os.listdir(os.path.join(broken, "mesh", "train", "good")):
        os.remove(os.path.join(broken, "mesh", "train", "good", f))
    with pytest.raises(ValueError, match="No training images in .*mesh/train/good"):
        mvtec.scan_category(broken, "mesh")


def test_defect_image_without_mask(broken):
    os.remove(os.path.join(broken, "mesh", "ground_truth", "hole", "002_mask.png"))
    with pytest.raises(FileNotFoundError, match=r"test/hole/002.png has no mask.*hole/002_mask.png"):
        mvtec.scan_category(broken, "mesh")


def test_mask_of_another_size_is_resized_with_a_warning(broken):
    path = os.path.join(broken, "mesh", "ground_truth", "scratch", "001_mask.png")
    original = np.asarray(Image.open(path)) > 0
    Image.open(path).resize((64, 64), Image.NEAREST).save(path)
    with pytest.warns(UserWarning, match="001_mask.png is 64x64"):
        mvtec.scan_category(broken, "mesh")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = ip.test_items(broken, "mesh")
        out = _collect(ip.eval_dataset(broken, "mesh", image_size=128, global_batch_size=12,
                                       process_index=0, process_count=1))
    k = next(i for i, t in enumerate(items) if t.mask_path == path)
    assert out["mask"][k].shape == (128, 128)
    assert (out["mask"][k].astype(bool) == original).mean() > 0.97  # nearest 64 -> 128 round trip


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_png_is_named(broken, damage):
    path = os.path.join(broken, "mesh", "train", "good", "005.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(b"not a png at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="Corrupt or truncated image file .*train/good/005.png"):
        mvtec.scan_category(broken, "mesh")


def test_other_extensions_are_accepted(broken):
    cdir = os.path.join(broken, "mesh")
    before = {i: np.asarray(Image.open(os.path.join(cdir, "train", "good", f"{i:03d}.png")))
              for i in range(4)}
    for i, ext in enumerate([".jpg", ".jpeg", ".bmp", ".tif"]):
        src = os.path.join(cdir, "train", "good", f"{i:03d}.png")
        Image.open(src).save(src[:-4] + ext)
        os.remove(src)
    for name, ext in [("hole/000", ".bmp"), ("scratch/001", ".tiff")]:
        src = os.path.join(cdir, "test", name + ".png")
        Image.open(src).save(src[:-4] + ext)
        os.remove(src)
        mask = os.path.join(cdir, "ground_truth", name + "_mask.png")
        Image.open(mask).save(mask[:-4] + ext)
        os.remove(mask)
    open(os.path.join(cdir, "train", "good", "notes.txt"), "w").write("x")
    with pytest.warns(UserWarning, match="notes.txt"):
        files = mvtec.scan_category(broken, "mesh")
    assert len(files.train) == 32 and len(files.test) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, _ = ip.load_images(broken, "mesh", "train", image_size=128, holdout_fraction=0.0,
                                   seed=0, process_index=0, process_count=1)
        out = _collect(ip.eval_dataset(broken, "mesh", image_size=128, global_batch_size=12,
                                       process_index=0, process_count=1))
        items = ip.test_items(broken, "mesh")
    pixels = _to_uint8(images)
    for i, ext in enumerate([".jpg", ".jpeg", ".bmp", ".tif"]):
        assert files.train[i].endswith(ext)
        tol = 40 if "jp" in ext else 1  # JPEG is lossy
        assert np.abs(pixels[i, ..., 0] - before[i]).mean() <= (8 if tol > 1 else 0.01)
        assert np.abs(pixels[i, ..., 0] - before[i]).max() <= tol
    for k, item in enumerate(items):
        if item.path.endswith((".bmp", ".tiff")):
            np.testing.assert_array_equal(out["mask"][k], np.asarray(Image.open(item.mask_path)) > 0)
            assert out["mask"][k].sum() > 0


def test_bad_batch_sizes(root):
    with pytest.raises(ValueError, match="multiple of the number of hosts"):
        ip.eval_dataset(root, "mesh", image_size=32, global_batch_size=5, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="exceeds the 29 training images"):
        ip.train_dataset(root, "mesh", image_size=32, global_batch_size=64, seed=0, epoch=0,
                         holdout_fraction=0.1, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="Unknown split"):
        ip.num_examples(root, "mesh", "val")


@pytest.mark.parametrize("folder", ["train/good", "test/good"])
def test_truncated_jpeg_fails_at_the_scan(broken, folder):
    """A truncated JPEG passes a header check; the scan's full decode names it (issue 18: it
    used to fail only when the pipeline reached it, after training)."""
    src = os.path.join(broken, "mesh", folder, "003.png")
    jpg = src[:-4] + ".jpg"
    Image.open(src).save(jpg)
    os.remove(src)
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 3])
    with pytest.raises(ValueError, match=f"Corrupt or truncated image file .*{folder}/003.jpg.*truncated"):
        mvtec.scan_category(broken, "mesh")


def test_full_decode_runs_once_per_file(broken, monkeypatch):
    mvtec.scan_category(broken, "mesh")
    calls = []
    real_open = mvtec.Image.open
    monkeypatch.setattr(mvtec.Image, "open", lambda *a, **k: calls.append(a[0]) or real_open(*a, **k))
    mvtec.scan_category(broken, "mesh")
    assert calls == []  # cached per (path, size, mtime)
    path = os.path.join(broken, "mesh", "train", "good", "004.png")
    os.utime(path, ns=(0, 1))  # a changed file is decoded again
    mvtec.scan_category(broken, "mesh")
    assert calls == [path, path]  # verify(), then the full load()


def test_decode_failure_in_the_pipeline_names_the_file(broken):
    """A file that breaks after the scan (same size and mtime): the pipeline error names it."""
    path = os.path.join(broken, "mesh", "train", "good", "003.png")
    mvtec.scan_category(broken, "mesh")
    st = os.stat(path)
    open(path, "wb").write(b"x" * st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="Cannot decode image .*003.png"):
        ip.load_images(broken, "mesh", "train", image_size=32, holdout_fraction=0.0, seed=0,
                       process_index=0, process_count=1)


def test_subfolders_are_read_and_masks_follow_them(broken):
    """Images in subfolders of train/good and test/<defect> are read (issue 18: 16 of 32 moved
    to train/good/batch2/ were dropped without a word); a defect's mask sits in the same
    subfolder of ground_truth/<defect>."""
    cdir = os.path.join(broken, "mesh")
    good = os.path.join(cdir, "train", "good")
    before = sorted(os.listdir(good))
    os.makedirs(os.path.join(good, "batch2"))
    for name in before[16:]:
        os.rename(os.path.join(good, name), os.path.join(good, "batch2", name))
    for sub in ("test/hole", "ground_truth/hole"):
        os.makedirs(os.path.join(cdir, sub, "line2"))
    os.rename(os.path.join(cdir, "test/hole/001.png"), os.path.join(cdir, "test/hole/line2/001.png"))
    os.rename(os.path.join(cdir, "ground_truth/hole/001_mask.png"),
              os.path.join(cdir, "ground_truth/hole/line2/001_mask.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is skipped, nothing to warn about
        files = mvtec.scan_category(broken, "mesh")
    assert len(files.train) == 32
    assert [os.path.relpath(p, good) for p in files.train] == before[:16] + [f"batch2/{n}" for n in before[16:]]
    moved = next(t for t in files.test if t.path.endswith("line2/001.png"))
    assert moved.mask_path.endswith("ground_truth/hole/line2/001_mask.png") and moved.label == 1
    # a subfolder image without its mask in the same subfolder is an error naming the expected path
    os.rename(moved.mask_path, os.path.join(cdir, "ground_truth/hole/001_mask.png"))
    with pytest.raises(FileNotFoundError, match="line2/001.png has no mask.*hole/line2/001_mask.png"):
        mvtec.scan_category(broken, "mesh")


def test_every_skipped_path_is_named_in_one_warning(broken):
    good = os.path.join(broken, "mesh", "train", "good")
    os.symlink(os.path.join(good, "gone.png"), os.path.join(good, "broken_link.png"))
    open(os.path.join(good, "notes.txt"), "w").write("x")
    Image.new("RGB", (8, 8)).save(os.path.join(good, "image.webp"))
    os.makedirs(os.path.join(good, "sub"))
    open(os.path.join(good, "sub", "readme.md"), "w").write("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = mvtec.scan_category(broken, "mesh")
    assert len(files.train) == 32
    mine = [str(w.message) for w in caught if good in str(w.message)]
    assert len(mine) == 1, mine
    assert mine[0].startswith(f"Skipping 4 path(s) under {good}")
    for name in ("broken_link.png (broken symlink", "notes.txt (not an image", "image.webp (not an image",
                 "sub/readme.md (not an image"):
        assert name in mine[0], mine[0]


def test_check_categories_decodes_every_category_before_training(root, tmp_path):
    """A corrupt test image in the second category, or a category too small for the batch,
    fails the check that runs before the first category trains."""
    import ml_collections

    from rstpm_jax.data import sources
    data = tmp_path / "data"
    for c in ("button", "mesh"):
        shutil.copytree(os.path.join(root, c), data / c)
    source = sources.Source(str(data))
    config = ml_collections.ConfigDict({"data": {"holdout_fraction": 0.1}, "train": {"batch_size": 8},
                                        "seed": 0, "mode": "train"})
    sources.check_categories(source, ["button", "mesh"], config)
    config.train.batch_size = 30  # 29 training images each after the holdout
    sources.check_categories(source, ["button", "mesh"], config)  # one padded batch (drop_last=False)
    config.train.drop_last = True  # no batch at all
    with pytest.raises(ValueError, match="button: 29 training images .* config.train.batch_size=30"):
        sources.check_categories(source, ["button", "mesh"], config)
    bad = data / "mesh" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(ValueError, match="Corrupt or truncated image file .*mesh/test/good/001.png"):
        sources.check_categories(source, ["button", "mesh"])


def test_scan_synthetic_and_inference_loading_do_not_import_tensorflow(root):
    import subprocess
    import sys
    code = ("import sys\n"
            "from rstpm_jax.data import input_pipeline, mvtec, preprocess, synthetic\n"
            f"mvtec.scan_category({root!r}, 'button')\n"
            f"preprocess.load_image_file(mvtec.scan_category({root!r}, 'mesh').train[0], 32)\n"
            "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
