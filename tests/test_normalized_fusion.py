"""A workdir trained with ``maps.fusion=normalized_multiply``: evaluation stores the held-out
map statistics in thresholds.json, and predict, the jax export and the ONNX export apply the
same maps (STPM on synthetic fabric, 64x64, 1 epoch). ONNX: through evaluation's artifact
(``eval.backend=onnxruntime``), which ``export --format onnx`` shares."""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from rstpm_jax import export, predict
from tests import _train_helpers as h

SIZE = 64
TRAIN = ["--config.data.categories=fabric", "--config.model.random_teachers=True",
         f"--config.data.image_size={SIZE}", "--config.train.batch_size=8", "--config.train.epochs=1",
         "--config.data.holdout_fraction=0.25", "--config.eval.batch_size=8", "--config.eval.figures=False",
         "--config.train.select_epoch=last", "--config.maps.kwargs.q_low=0.8", "--config.maps.kwargs.q_high=0.99"]
# STPM (fast) with configs/rstpm_normalized.py's fusion rule and quantile keys.
CONFIG = ("from configs import rstpm_normalized, stpm\n\n\n"
          "def get_config():\n    return rstpm_normalized.normalized(stpm.get_config())\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from rstpm_jax.data import synthetic
    base = tmp_path_factory.mktemp("normalized_fusion")
    root = str(base / "data")
    synthetic.generate(root, seed=0, image_size=SIZE, categories=("fabric",))
    workdir = str(base / "work")
    (base / "stpm_normalized.py").write_text(CONFIG)
    cmd = h.main_cmd("stpm.py", workdir, f"--config.data.root={root}", *TRAIN)
    cmd[3] = f"--config={base / 'stpm_normalized.py'}"
    h.run(cmd, h.env(str(base / "jax_cache")))
    with open(os.path.join(workdir, "fabric", "test_scores.csv")) as f:
        rows = list(csv.DictReader(f))
    images = np.stack([predict.preprocess(np.asarray(Image.open(r["file"]).convert("RGB")), (SIZE, SIZE))
                       for r in rows])
    return base, workdir, images, np.array([float(r["score"]) for r in rows])


def test_thresholds_hold_the_held_out_statistics(trained):
    _, workdir, _, _ = trained
    saved = json.load(open(os.path.join(workdir, "fabric", "thresholds.json")))
    stats = saved["map_statistics"]
    assert stats["fusion"] == "normalized_multiply" and stats["split"] == "holdout"
    assert stats["quantiles"] == [0.8, 0.99]
    assert set(stats["maps"]["student1"]) == {"layer1", "layer2", "layer3"}
    assert all(lo < hi for levels in stats["maps"].values() for lo, hi in levels.values())


def test_predict_and_exports_apply_the_same_maps_as_evaluation(trained):
    base, workdir, images, eval_scores = trained
    model = predict.Predictor(workdir, "fabric", batch_size=len(images))
    maps, scores = model(images)
    np.testing.assert_allclose(scores, eval_scores, rtol=1e-5)  # evaluation's test_scores.csv

    exported, meta = export.export_category(workdir, "fabric", platforms=("cpu",))
    saved = json.load(open(os.path.join(workdir, "fabric", "thresholds.json")))
    assert meta["map_statistics"] == saved["map_statistics"]
    out = exported.call(images)
    # flax layers against the fast CPU convolutions: float32 noise, enlarged by the normalisation
    np.testing.assert_allclose(np.asarray(out["map"]), maps, rtol=1e-4, atol=1e-6 * float(maps.max()))


def test_a_workdir_without_statistics_is_refused_by_name(trained):
    base, workdir, _, _ = trained
    old = str(base / "no_stats")
    shutil.copytree(workdir, old)
    path = os.path.join(old, "fabric", "thresholds.json")
    saved = json.load(open(path))
    del saved["map_statistics"]
    json.dump(saved, open(path, "w"))
    with pytest.raises(ValueError, match="map_statistics"):
        predict.Predictor(old, "fabric")
    with pytest.raises(ValueError, match="map_statistics"):
        export.export_category(old, "fabric", platforms=("cpu",))


def test_evaluation_through_onnx_bakes_the_same_statistics(trained):
    pytest.importorskip("jax2onnx")
    pytest.importorskip("onnxruntime")
    from rstpm_jax import evaluate, sharding
    from rstpm_jax import workdir as workdir_lib
    from rstpm_jax.data.sources import Source

    base, workdir, images, _ = trained
    config = workdir_lib.load_config(workdir)
    config.eval.backend = "onnxruntime"
    mesh = sharding.make_mesh()
    model, tv, sv = workdir_lib.load_trained(config, workdir, "fabric", mesh)
    infer, deployment, stats = evaluate.evaluated_infer(config, Source(str(config.data.root)), "fabric", model,
                                                        tv, sv, mesh, str(base / "eval_onnx"))
    saved = json.load(open(os.path.join(workdir, "fabric", "thresholds.json")))
    assert stats == saved["map_statistics"] == infer.meta["map_statistics"]
    assert deployment["backend"] == "onnxruntime"
    maps, _ = predict.Predictor(workdir, "fabric", batch_size=4)(images[:4])
    np.testing.assert_allclose(infer(images[:4])["map"], maps, rtol=1e-3, atol=1e-4 * float(maps.max()))
