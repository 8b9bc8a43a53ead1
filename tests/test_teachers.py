"""The teachers' identity recorded in the workdir and checked on resume, eval, predict and
export (issue 18, item 1: a workdir trained with random teachers and rerun with real weights
logged "resumed", and predict then scored with the old random teachers)."""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest
from flax import serialization

from rstpm_jax import export, predict, run, sharding
from rstpm_jax import workdir as workdir_lib
from rstpm_jax.models import resnet
from tests.conftest import load_config

SIZE = 32


def _config(root: str, **model):
    config = load_config("stpm")
    config.data.root, config.data.categories, config.data.image_size = root, "fabric", SIZE
    config.data.holdout_fraction = 0.25
    config.train.batch_size, config.eval.batch_size, config.train.epochs = 8, 8, 1
    config.eval.figures, config.model.random_teachers = False, True
    for key, value in model.items():
        config.model[key] = value
    return config


def _weights(path: str, seed: int) -> str:
    """A converted-looking resnet18 weight file (random values of another seed)."""
    variables = resnet.build("resnet18").init(jax.random.key(seed), np.zeros((1, SIZE, SIZE, 3), np.float32))
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(variables))))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained one epoch with random teachers (seed 0)."""
    from rstpm_jax.data import synthetic
    base = tmp_path_factory.mktemp("teachers")
    root = str(base / "data")
    synthetic.generate(root, seed=0, image_size=SIZE, categories=("fabric",))
    workdir = str(base / "work")
    run.train_and_evaluate(_config(root), workdir)
    return root, workdir, _weights(str(base / "resnet18.msgpack"), seed=7)


def _copy(trained, tmp_path) -> str:
    dst = str(tmp_path / "work")
    shutil.copytree(trained[1], dst)
    return dst


def test_the_record_says_what_the_teachers_are(trained):
    _, workdir, _ = trained
    record = json.load(open(os.path.join(workdir, "teachers.json")))
    assert record == {"teacher1": {"arch": "resnet18", "stages": 3, "weights": "random", "seed": 0},
                      "teacher2": None}


def test_rerun_with_real_weights_is_refused_before_anything_changes(trained, tmp_path):
    root, _, weights = trained
    workdir = _copy(trained, tmp_path)
    config_before = open(os.path.join(workdir, "config.json")).read()
    config = _config(root, random_teachers=False, teacher1_weights=weights)
    config.train.epochs = 2
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        run.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - t0
    text = str(e.value)
    assert ("teacher1: the workdir holds random resnet18 up to layer3 (seed 0), the config asks for "
            f"resnet18 up to layer3 from {weights} (sha256 ") in text
    assert "new --workdir" in text
    assert open(os.path.join(workdir, "config.json")).read() == config_before  # not rewritten
    assert sorted(os.listdir(os.path.join(workdir, "fabric", "checkpoints"))) == ["1"]
    assert seconds < 5, seconds  # before any data is read
    config = _config(root)
    config.seed = 1  # random teachers of another seed are other teachers too
    with pytest.raises(ValueError, match=r"random resnet18 up to layer3 \(seed 0\), the config asks for "
                                         r"random resnet18 up to layer3 \(seed 1\)"):
        run.train_and_evaluate(config, workdir)


def test_predict_eval_and_export_refuse_a_config_that_names_other_teachers(trained, tmp_path, capsys):
    """config.json saying real weights beside random teachers (what the bug left behind)."""
    root, _, weights = trained
    workdir = _copy(trained, tmp_path)
    path = os.path.join(workdir, "config.json")
    saved = json.load(open(path))
    saved["model"].update(random_teachers=False, teacher1_weights=weights)
    json.dump(saved, open(path, "w"))
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="teacher1: the workdir holds random resnet18"):
        workdir_lib.load_trained(workdir_lib.load_config(workdir), workdir, "fabric", mesh)
    images = os.path.join(root, "fabric", "test", "good")
    assert predict.main(["--workdir", workdir, "--category", "fabric", "--input", images,
                         "--output", str(tmp_path / "pred"), "--no_progress"]) == 2
    assert "teacher1: the workdir holds random resnet18" in capsys.readouterr().err
    assert export.main(["--workdir", workdir, "--category", "fabric", "--output",
                        str(tmp_path / "m.jaxexport"), "--platforms", "cpu"]) == 2
    assert "teacher1: the workdir holds random resnet18" in capsys.readouterr().err
    eval_config = _config(root, random_teachers=False, teacher1_weights=weights)
    eval_config.mode = "eval"
    with pytest.raises(ValueError, match="teacher1: the workdir holds random resnet18"):
        run.train_and_evaluate(eval_config, workdir)


def test_a_workdir_without_the_record_is_checked_by_value(trained, tmp_path):
    """Written before teachers.json: the saved teachers are compared with the config's (random
    ones rebuilt from the seed, real ones loaded when the files are there); a match is recorded
    on the next training run, a mismatch refused."""
    root, _, weights = trained
    workdir = _copy(trained, tmp_path)
    os.remove(os.path.join(workdir, "teachers.json"))
    mesh = sharding.make_mesh()
    config = workdir_lib.load_config(workdir)
    _, teachers, _ = workdir_lib.load_trained(config, workdir, "fabric", mesh)  # random, seed 0: equal
    config.model.random_teachers, config.model.teacher1_weights = False, weights
    with pytest.raises(ValueError, match="written before teachers.json was recorded.*holds other values"):
        workdir_lib.load_trained(config, workdir, "fabric", mesh)
    config_before = open(os.path.join(workdir, "config.json")).read()
    with pytest.raises(ValueError, match="written before teachers.json was recorded.*holds other values"):
        run.train_and_evaluate(_config(root, random_teachers=False, teacher1_weights=weights), workdir)
    assert not os.path.exists(os.path.join(workdir, "teachers.json"))
    assert open(os.path.join(workdir, "config.json")).read() == config_before  # refused before writing
    run.train_and_evaluate(_config(root), workdir)  # the same config: checked, recorded, nothing trained
    assert json.load(open(os.path.join(workdir, "teachers.json")))["teacher1"]["weights"] == "random"


def test_weight_files_are_compared_by_content(trained, tmp_path):
    _, _, weights = trained
    config = _config("unused", random_teachers=False, teacher1_weights=weights)
    recorded = workdir_lib.teachers_identity(config)
    moved = shutil.copy(weights, tmp_path / "moved.msgpack")
    config.model.teacher1_weights = str(moved)
    assert workdir_lib.teacher_differences(recorded, workdir_lib.teachers_identity(config)) == []
    _weights(str(moved), seed=8)  # reconverted in place: other values
    diffs = workdir_lib.teacher_differences(recorded, workdir_lib.teachers_identity(config))
    assert len(diffs) == 1 and recorded["teacher1"]["sha256"][:12] in diffs[0]
    # eval/predict/export compare what the config names, not the files (they may be absent)
    assert workdir_lib.teacher_differences(recorded, workdir_lib.teachers_identity(config, hash_files=False),
                                           compare_files=False) == []
    config.model.student2 = True  # a second teacher (and teacher 1 up to layer4) is another model
    diffs = workdir_lib.teacher_differences(recorded, workdir_lib.teachers_identity(config, hash_files=False),
                                            compare_files=False)
    assert any("teacher2: the workdir holds none" in d for d in diffs)
    assert any("teacher1" in d and "layer4" in d for d in diffs)
