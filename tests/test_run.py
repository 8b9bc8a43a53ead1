"""A run end to end: the README's plugin example (a loss and a fusion rule of one's own, with
parameters from the config, one compiled step for every category) and training and
evaluating from prepared TFDS data through ``main``."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests import _train_helpers as h

README = os.path.join(h.REPO, "README.md")
SMALL = ["--config.data.image_size=32", "--config.train.batch_size=8", "--config.eval.batch_size=8",
         "--config.eval.figures=False", "--config.train.epochs=1", "--config.model.random_teachers=True"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("run_data") / "synthetic")
    # At the training size: predict and the pipeline then see the same pixels (no resize).
    synthetic.generate(root, seed=0, image_size=32, categories=("fabric", "mesh"))
    return root


def readme_block(first_line: str) -> str:
    """The README's python code block that starts with ``first_line``."""
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"README has {len(found)} python blocks starting with {first_line!r}"
    return found[0]


def test_readme_plugin_example_runs_from_config_plugins(data, tmp_path, monkeypatch):
    from rstpm_jax import losses, run, train

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_plugins.py").write_text(readme_block("# my_plugins.py"))
    (tmp_path / "my_experiment.py").write_text(readme_block("# configs/my_experiment.py"))
    monkeypatch.syspath_prepend(str(plugins))
    spec = importlib.util.spec_from_file_location("my_experiment", tmp_path / "my_experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert "my_plugins" not in sys.modules  # imported by the run, from config.plugins
    config.data.root, config.data.categories = data, "fabric,mesh"
    config.data.image_size, config.train.batch_size, config.eval.batch_size = 32, 8, 8
    config.train.epochs, config.eval.figures, config.model.random_teachers = 1, False, True
    config.model.teacher2 = "resnet18"  # a smaller teacher 2 compiles faster; the example is unchanged

    train.compile_group_step.cache_clear()
    workdir = str(tmp_path / "work")
    rows = run.train_and_evaluate(config, workdir)
    assert set(rows) == {"fabric", "mesh"}
    assert "my_plugins" in sys.modules
    bound = losses.from_config(config.loss, config.maps)
    assert bound.name == "cosine_l1" and dict(bound.kwargs) == {"l1_weight": 0.05}
    # The kwargs are bound by value: a second run of a config built anew (one category) finds
    # the first run's compiled step.
    again = module.get_config()
    again.data.root, again.data.categories, again.data.image_size = data, "mesh", 32
    again.train.batch_size, again.eval.batch_size, again.train.epochs = 8, 8, 1
    again.eval.figures, again.model.random_teachers, again.model.teacher2 = False, True, "resnet18"
    run.train_and_evaluate(again, str(tmp_path / "work2"))
    info = train.compile_group_step.cache_info()
    assert (info.misses, info.currsize) == (1, 1) and info.hits >= 1, info
    for category in rows:
        record = json.load(open(os.path.join(workdir, category, "results.json")))
        assert record["config"]["maps"]["kwargs"] == {"student2_weight": 0.5}
        assert 0.0 <= record["pixel_auroc"] <= 1.0

    # predict in a fresh process imports the plugins from the workdir's config ...
    env = h.env()
    env["PYTHONPATH"] = str(plugins) + os.pathsep + env["PYTHONPATH"]
    out = str(tmp_path / "pred")
    proc = subprocess.run([sys.executable, "-m", "rstpm_jax.predict", "--workdir", workdir, "--category",
                           "mesh", "--input", os.path.join(data, "mesh", "test"), "--output", out,
                           "--no_progress"], cwd=h.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = {r["file"]: r["score"] for r in json.load(open(os.path.join(out, "predictions.json")))["predictions"]}
    with open(os.path.join(workdir, "mesh", "test_scores.csv")) as f:
        next(f)
        for line in f:
            path, _, score = line.rstrip("\n").rsplit(",", 2)
            assert scores[path] == pytest.approx(float(score), rel=1e-4, abs=1e-7)
    # ... and says what to do when they cannot be imported.
    proc = subprocess.run([sys.executable, "-m", "rstpm_jax.predict", "--workdir", workdir, "--category",
                           "mesh", "--input", os.path.join(data, "mesh", "test"), "--output", out + "2",
                           "--no_progress"], cwd=h.REPO, env=h.env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0 and "config.plugins" in proc.stderr and "my_plugins" in proc.stderr


def test_train_and_evaluate_from_prepared_tfds_data(data, tmp_path):
    """main with data.tfds_dir prepares the TFDS data once and trains and evaluates from it; it
    then evaluates again with the image folder gone."""
    root = str(tmp_path / "raw")
    shutil.copytree(data, root)
    tfds_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "work")
    env = h.env()
    args = [f"--config.data.tfds_dir={tfds_dir}", "--config.data.categories=mesh", *SMALL]
    h.run(h.main_cmd("stpm.py", workdir, f"--config.data.root={root}", *args), env)
    assert os.path.isdir(os.path.join(tfds_dir, "mvtec_ad", "mesh"))
    before = json.load(open(os.path.join(workdir, "mesh", "results.json")))
    shutil.rmtree(root)
    h.run(h.main_cmd("stpm.py", workdir, f"--config.data.root={root}", *args, "--config.mode=eval"), env)
    after = json.load(open(os.path.join(workdir, "mesh", "results.json")))
    assert after["num_test_images"] == before["num_test_images"] > 0
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
