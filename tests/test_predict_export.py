"""Production inference: the predict CLI, its thresholds and outputs, and the jax.export artifact.

One STPM model is trained once per session (synthetic fabric at its native 64x64, 4 epochs,
a quarter of train/good held out for the thresholds) by
``python -m rstpm_jax.main``; the CLIs run in subprocesses like a production line would.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rstpm_jax import export, predict
from tests import _train_helpers as h

SIZE = 64  # the synthetic images' own size: no resize, so evaluation and predict see the same pixels
TRAIN = ["--config.data.categories=fabric", "--config.model.random_teachers=True",
         f"--config.data.image_size={SIZE}", "--config.train.batch_size=8", "--config.train.epochs=4",
         "--config.data.holdout_fraction=0.25", "--config.eval.batch_size=8",
         "--config.eval.figures=False"]


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("predict_export")


@pytest.fixture(scope="session")
def trained(base):
    from rstpm_jax.data import synthetic
    root = str(base / "data")
    synthetic.generate(root, seed=0, image_size=SIZE, categories=("fabric",))
    workdir = str(base / "work")
    h.run(h.main_cmd("stpm.py", workdir, f"--config.data.root={root}", *TRAIN),
          h.env(str(base / "jax_cache")))
    return root, workdir


def _predict_cli(base, workdir: str, inputs: str, out: str, *flags: str) -> tuple[dict, list[str]]:
    """``python -X importtime -m rstpm_jax.predict ...`` -> (predictions.json, modules imported).
    The jax backend (the default is the fastest installed; test_deploy covers the others)."""
    cmd = [sys.executable, "-X", "importtime", "-m", "rstpm_jax.predict", "--workdir", workdir,
           "--category", "fabric", "--input", inputs, "--output", out, "--no_progress", "--backend", "jax",
           *flags]
    proc = subprocess.run(cmd, cwd=h.REPO, env=h.env(str(base / "jax_cache")), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    modules = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line]
    with open(os.path.join(out, "predictions.json")) as f:
        return json.load(f), modules


def _no_tensorflow(modules: list[str]) -> None:
    assert "jax" in modules and "PIL.Image" in modules  # the import log was read
    tf = [m for m in modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets")]
    assert not tf, tf[:5]


@pytest.fixture(scope="session")
def predicted(base, trained):
    """The synthetic test set through the CLI, raw (npy) maps."""
    root, workdir = trained
    out = str(base / "pred_test")
    summary, modules = _predict_cli(base, workdir, os.path.join(root, "fabric", "test", "*", "*.png"),
                                    out, "--map_format", "npy", "--batch_size", "6")
    return out, summary, modules


def _test_scores(workdir: str) -> dict[str, tuple[int, float]]:
    with open(os.path.join(workdir, "fabric", "test_scores.csv")) as f:
        return {r["file"]: (int(r["label"]), float(r["score"])) for r in csv.DictReader(f)}


def test_predict_reproduces_evaluation_scores_without_tensorflow(trained, predicted):
    _, workdir = trained
    out, summary, modules = predicted
    _no_tensorflow(modules)
    reference = _test_scores(workdir)  # written by evaluation (tf.data pipeline)
    rows = summary["predictions"]
    assert summary["skipped"] == [] and len(rows) == len(reference) == 16
    assert sorted(r["file"] for r in rows) == sorted(reference)
    for r in rows:
        np.testing.assert_allclose(r["score"], reference[r["file"]][1], rtol=1e-5, err_msg=r["file"])
        amap = np.load(os.path.join(out, r["map"]))
        assert amap.shape == (SIZE, SIZE) and amap.dtype == np.float32
        np.testing.assert_allclose(amap.max(), r["score"], rtol=1e-6)  # score = max of the map
    with open(os.path.join(out, "predictions.csv")) as f:
        table = list(csv.DictReader(f))
    assert [t["file"] for t in table] == [r["file"] for r in rows]
    assert [t["decision"] for t in table] == [r["decision"] for r in rows]


def test_thresholds_from_normal_images_beat_chance(trained, predicted):
    from sklearn.metrics import balanced_accuracy_score
    _, workdir = trained
    _, summary, _ = predicted
    with open(os.path.join(workdir, "fabric", "thresholds.json")) as f:
        saved = json.load(f)
    with open(os.path.join(workdir, "fabric", "results.json")) as f:
        f1_threshold = json.load(f)["metrics"]["image_f1_threshold"]
    thr = summary["thresholds"]
    assert thr["image_threshold"] == saved["image_threshold"]
    assert thr["pixel_threshold"] == saved["pixel_threshold"]
    assert thr["image_threshold_source"].startswith("thresholds.json")
    assert thr["test_f1_optimal_image_threshold"] == f1_threshold  # reported, not used
    assert summary["normalization"]["scale"] == saved["normalization"]["scale"] == saved["image_threshold"]
    reference = _test_scores(workdir)
    labels, decisions = [], []
    for r in summary["predictions"]:
        assert r["decision"] == ("anomalous" if r["score"] > saved["image_threshold"] else "normal")
        np.testing.assert_allclose(r["normalized_score"], r["score"] / saved["image_threshold"])
        labels.append(reference[r["file"]][0])
        decisions.append(int(r["decision"] == "anomalous"))
    assert sum(labels) == 12 and len(labels) == 16
    assert balanced_accuracy_score(labels, decisions) > 0.5, list(zip(labels, decisions))


@pytest.fixture(scope="session")
def mixed(base, trained, predicted):
    """A folder of odd inputs: grayscale, JPEG, other sizes, a corrupt PNG and a text file."""
    root, workdir = trained
    src = sorted(glob.glob(os.path.join(root, "fabric", "test", "*", "*.png")))
    folder = base / "mixed"
    folder.mkdir()
    shutil.copy(src[0], folder / "copy.png")
    rgb = Image.open(src[4]).convert("RGB")
    rgb.convert("L").resize((40, 24), Image.BILINEAR).save(folder / "gray_40x24.png")
    rgb.resize((96, 48), Image.BILINEAR).save(folder / "wide.jpg", quality=95)
    data = open(src[8], "rb").read()
    (folder / "corrupt.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    # a command-line image threshold between the test scores
    override = float(np.median([r["score"] for r in predicted[1]["predictions"]]))
    out = str(base / "pred_mixed")
    summary, modules = _predict_cli(base, workdir, str(folder), out, "--image_threshold", repr(override))
    return str(folder), out, summary, modules, override


def test_corrupt_and_non_image_files_are_named_and_the_rest_processed(mixed):
    folder, out, summary, modules, _ = mixed
    _no_tensorflow(modules)
    skipped = {os.path.basename(s["file"]): s["error"] for s in summary["skipped"]}
    assert sorted(skipped) == ["corrupt.png", "notes.txt"], skipped
    assert all("corrupt.png" in e or "notes.txt" in e for e in skipped.values())
    sizes = {os.path.basename(r["file"]): (r["width"], r["height"]) for r in summary["predictions"]}
    assert sizes == {"wide.jpg": (96, 48), "copy.png": (SIZE, SIZE), "gray_40x24.png": (40, 24)}
    for r in summary["predictions"]:
        for key in ("map", "overlay", "mask"):
            with Image.open(os.path.join(out, r[key])) as im:
                assert im.size == (r["width"], r["height"]), (key, r["file"])
                if key == "map":
                    assert im.mode.startswith("I;16") or im.mode == "I", im.mode


def test_png16_maps_use_the_recorded_scale_and_masks_the_pixel_threshold(predicted, mixed):
    _, out, summary, _, override = mixed
    enc, p_thr = summary["map_encoding"], summary["thresholds"]["pixel_threshold"]
    assert enc["format"] == "png16" and enc["full_scale"] == pytest.approx(predict.MAP_FULL_SCALE * p_thr)
    rows = {os.path.basename(r["file"]): r for r in summary["predictions"]}
    # the byte-identical copy: decoded map == the raw map of the first run (quantisation only)
    ref_row = next(r for r in predicted[1]["predictions"] if r["file"].endswith(
        os.path.join("color", "000.png")))
    raw = np.load(os.path.join(predicted[0], ref_row["map"]))
    decoded = np.asarray(Image.open(os.path.join(out, rows["copy.png"]["map"])), np.float64)
    decoded = decoded / 65535 * enc["full_scale"]
    np.testing.assert_allclose(decoded, np.minimum(raw, enc["full_scale"]),
                               atol=enc["full_scale"] / 65535)
    np.testing.assert_allclose(rows["copy.png"]["score"], ref_row["score"], rtol=1e-5)
    for r in rows.values():
        amap = np.asarray(Image.open(os.path.join(out, r["map"])), np.float64) / 65535 * enc["full_scale"]
        mask = np.asarray(Image.open(os.path.join(out, r["mask"])))
        assert set(np.unique(mask)) <= {0, 255}
        clear = np.abs(amap - p_thr) > enc["full_scale"] / 65535  # away from quantisation at the threshold
        np.testing.assert_array_equal((mask > 0)[clear], (amap > p_thr)[clear])
        assert r["image_threshold"] == override
        assert r["decision"] == ("anomalous" if r["score"] > override else "normal")
        # normalisation stays the model's (thresholds.json), whatever threshold is used
        np.testing.assert_allclose(r["normalized_score"], r["score"] / summary["normalization"]["scale"])
    assert summary["thresholds"]["image_threshold_source"] == "command line"


def test_map_resize_is_bilinear():
    import jax
    amap = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    up = predict.resize_map(amap, (48, 80))
    ref = np.asarray(jax.image.resize(amap, (48, 80), method="bilinear", antialias=False))
    np.testing.assert_allclose(up, ref, atol=1e-5)
    np.testing.assert_array_equal(predict.resize_map(amap, (32, 32)), amap)


def test_inputs_and_output_names(tmp_path):
    for rel in ("a/x.png", "a/x.jpg", "b/x.png", "b/c/y.bmp", ".hidden/z.png", "a/.w.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = predict.list_inputs(str(tmp_path))  # a folder: every file below it, hidden ones left out
    assert [os.path.relpath(f, tmp_path) for f in found] == ["a/x.jpg", "a/x.png", "b/x.png", "b/c/y.bmp"]
    assert predict.output_names(found) == ["a__x_jpg", "a__x_png", "b__x", "b__c__y"]
    assert predict.list_inputs(str(tmp_path / "**" / "*.png")) == [str(tmp_path / "a" / "x.png"),
                                                                   str(tmp_path / "b" / "x.png")]
    assert predict.list_inputs(str(tmp_path / "b" / "x.png")) == [str(tmp_path / "b" / "x.png")]


def test_clear_errors(trained, tmp_path, capsys):
    _, workdir = trained
    common = ["--output", str(tmp_path / "o"), "--no_progress"]
    assert predict.main(["--workdir", workdir, "--category", "carpet", "--input", workdir, *common]) == 2
    err = capsys.readouterr().err
    assert "'carpet'" in err and "fabric" in err  # names the missing one and what is there
    assert predict.main(["--workdir", workdir, "--category", "fabric",
                         "--input", str(tmp_path / "none" / "*.png"), *common]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert predict.main(["--workdir", str(tmp_path), "--category", "fabric", "--input", workdir,
                         *common]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--image_threshold"):
        predict.resolve_thresholds(workdir, "fabric", image_threshold=-1.0)
    (tmp_path / "fabric").mkdir()
    with pytest.raises(ValueError, match="pass --image_threshold"):
        predict.resolve_thresholds(str(tmp_path), "fabric")


def test_predict_never_scores_its_own_output(base, trained, capsys):
    """Issue 18: `--input X --output X/out` run twice scored X/out's maps, masks and overlays;
    a reused output folder kept the previous run's files beside the new CSV."""
    import time
    root, workdir = trained
    folder = base / "own_output"
    folder.mkdir()
    for src in sorted(glob.glob(os.path.join(root, "fabric", "test", "*", "000.png"))):
        shutil.copy(src, folder / f"{os.path.basename(os.path.dirname(src))}.png")
    n = len(os.listdir(folder))
    out = folder / "out"
    args = ["--workdir", workdir, "--category", "fabric", "--output", str(out), "--no_progress"]
    assert predict.main([*args, "--input", str(folder)]) == 0
    first = json.load(open(out / "predictions.json"))
    assert first["num_images"] == n
    (out / "my_notes.txt").write_text("kept")
    t0 = time.perf_counter()
    assert predict.main([*args, "--input", str(folder)]) == 2  # refused: not empty
    assert time.perf_counter() - t0 < 5  # before the model is loaded
    err = capsys.readouterr().err
    assert f"--output {out} is not empty" in err and "--overwrite" in err
    assert predict.main([*args, "--input", str(folder / "good.png"), "--overwrite"]) == 0
    second = json.load(open(out / "predictions.json"))
    assert [r["file"] for r in second["predictions"]] == [str(folder / "good.png")]
    for sub in ("maps", "overlays", "masks"):  # the first run's files are gone
        assert os.listdir(out / sub) == ["good.png"], sub
    assert (out / "my_notes.txt").read_text() == "kept"  # not predict's: untouched
    assert predict.main([*args, "--input", str(folder), "--overwrite"]) == 0
    third = json.load(open(out / "predictions.json"))
    assert third["num_images"] == n and not any(str(out) in r["file"] for r in third["predictions"])
    assert predict.main([*args[:4], "--output", str(folder / "good.png"), "--input", str(folder)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_export_refuses_unknown_platforms_at_once(trained, tmp_path, capsys):
    """Issue 18: `--platforms=cpu,gpu` failed after 30 s with a raw RuntimeError."""
    import time
    _, workdir = trained
    t0 = time.perf_counter()
    assert export.main(["--workdir", workdir, "--category", "fabric", "--output", str(tmp_path / "m"),
                        "--platforms=cpu,gpu"]) == 2
    assert time.perf_counter() - t0 < 1
    err = capsys.readouterr().err
    assert "unknown ['gpu']" in err and "'cuda'" in err and "cpu, cuda, rocm, tpu" in err
    assert not os.path.exists(tmp_path / "m")


FRESH = r"""
import json, sys
import numpy as np
from rstpm_jax import export
model = export.load(sys.argv[1])
images = np.load(sys.argv[2])
small, full = model(images[:3]), model(images)
try:
    model(np.zeros((1, 16, 16, 3), np.float32))
    wrong_size = "accepted"
except Exception as e:
    wrong_size = type(e).__name__
np.savez(sys.argv[3], map3=small["map"], score3=small["score"], map=full["map"], score=full["score"])
heavy = [m for m in sys.modules if m.split(".")[0] in ("flax", "tensorflow", "optax", "orbax")
         or m.startswith("rstpm_jax.models")]
print(json.dumps({"heavy": heavy, "wrong_size": wrong_size, "meta": model.meta}))
"""


def test_exported_artifact_in_a_fresh_process_matches_the_model(base, trained, predicted):
    root, workdir = trained
    out, summary, _ = predicted
    artifact = str(base / "export" / "model.jaxexport")
    h.run([sys.executable, "-m", "rstpm_jax.export", "--workdir", workdir, "--category", "fabric",
           "--output", artifact], h.env(str(base / "jax_cache")))
    rows = summary["predictions"]
    images = np.stack([predict.preprocess(np.asarray(Image.open(r["file"]).convert("RGB")), (SIZE, SIZE))
                       for r in rows])
    np.save(base / "images.npy", images)
    result = json.loads(h.run([sys.executable, "-c", FRESH, artifact, str(base / "images.npy"),
                               str(base / "exported.npz")], h.env()).stdout.strip().splitlines()[-1])
    assert result["heavy"] == []  # jax alone
    assert result["wrong_size"] != "accepted"
    got = np.load(base / "exported.npz")
    maps = np.stack([np.load(os.path.join(out, r["map"])) for r in rows])  # the in-process model
    scores = np.array([r["score"] for r in rows])
    assert got["map"].shape == (16, SIZE, SIZE) and got["map3"].shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(got["map"], maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["map3"], maps[:3], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["score"], scores, rtol=1e-5)
    meta = result["meta"]
    assert meta["image_size"] == [SIZE, SIZE] and meta["input"]["shape"] == ["b", SIZE, SIZE, 3]
    assert meta["thresholds"]["image_threshold"] == summary["thresholds"]["image_threshold"]
    assert meta["normalization"]["scale"] == summary["normalization"]["scale"]
    np.testing.assert_allclose(meta["mean"], [0.485, 0.456, 0.406], rtol=1e-6)
    assert "cpu" in meta["platforms"]


# Keys added to the config after the first release: a workdir written before has none of them.
NEWER_KEYS = {"": ("plugins",), "data": ("tfds_dir",), "model": ("fast_cpu_ops",), "loss": ("kwargs",),
              "maps": ("distance", "distance_kwargs", "kwargs")}


def test_a_workdir_of_an_earlier_version_still_predicts(base, trained, predicted):
    """config.json without the newer keys (as the first release wrote it) and no teachers.json:
    defaults are merged in and predict gives the same scores."""
    _, workdir = trained
    _, summary, _ = predicted
    old = str(base / "old_work")
    shutil.copytree(workdir, old)
    path = os.path.join(old, "config.json")
    config = json.load(open(path))
    for section, keys in NEWER_KEYS.items():
        for key in keys:
            (config[section] if section else config).pop(key)
    json.dump(config, open(path, "w"))
    os.remove(os.path.join(old, "teachers.json"))  # recorded since issue 18: checked by value without it
    files = [r["file"] for r in summary["predictions"]][:4]
    got, _ = _predict_cli(base, old, files[0].rsplit("/", 1)[0] + "/*.png", str(base / "pred_old"),
                          "--map_format", "npy")
    want = {r["file"]: r["score"] for r in summary["predictions"]}
    assert got["predictions"]
    for r in got["predictions"]:
        np.testing.assert_allclose(r["score"], want[r["file"]], rtol=1e-6, err_msg=r["file"])
