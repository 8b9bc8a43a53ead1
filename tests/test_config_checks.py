"""Config validation before a run reads data or trains (issue 18, items 3-4): every key named,
with what to do; and through ``main``, a bad config or a bad image fails before training."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from rstpm_jax import config_checks
from tests import _train_helpers as h
from tests.conftest import MODEL_CONFIGS, load_config


def _config(**overrides):
    config = load_config("mvtec")
    config.model.random_teachers = True
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        (config[section] if section else config)[name] = value
    return config


def _problems(**overrides) -> str:
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(_config(**overrides))
    return str(e.value)


@pytest.mark.parametrize("name", MODEL_CONFIGS + ("demo",))
def test_shipped_configs_are_valid(name):
    config = load_config(name)
    config_checks.validate(config, check_files=False)


# The cases and the other ranges: (key, bad value, text the message must hold).
CASES = [
    ("train.epochs", 0, "config.train.epochs=0: must be >= 1"),
    ("train.batch_size", 0, "config.train.batch_size=0: must be >= 1"),
    ("train.batch_size", -8, "config.train.batch_size=-8: must be >= 1"),
    ("train.learning_rate", -0.4, "config.train.learning_rate=-0.4: must be > 0"),
    ("train.learning_rate", 0.0, "config.train.learning_rate=0.0: must be > 0"),
    ("data.image_size", 50, "config.data.image_size=50: must be a positive multiple of 32"),
    ("data.image_size", 0, "config.data.image_size=0: must be a positive multiple of 32"),
    ("maps.fusion", "mul", "config.maps.fusion='mul': not a registered fusion rule; registered: "
                           "['multiply', 'normalized_multiply', 'normalized_sum', 'sum'] (did you mean 'multiply'?)"),
    ("maps.distance", "l2", "config.maps.distance='l2': not a registered distance"),
    ("loss.name", "papr", "config.loss.name='papr': not a registered loss"),
    ("train.momentum", -0.1, "config.train.momentum=-0.1: must be >= 0"),
    ("train.weight_decay", -1e-4, "config.train.weight_decay=-0.0001: must be >= 0"),
    ("eval.batch_size", 0, "config.eval.batch_size=0: must be >= 1"),
    ("data.holdout_fraction", 1.0, "config.data.holdout_fraction=1.0: must be in [0, 1)"),
    ("eval.threshold_percentile", 0.0, "config.eval.threshold_percentile=0.0: must be in (0, 100]"),
    ("eval.threshold_percentile", 101.0, "must be in (0, 100]"),
    ("train.checkpoint_every_epochs", 0, "config.train.checkpoint_every_epochs=0: must be >= 1"),
    ("train.keep_checkpoints", 0, "config.train.keep_checkpoints=0: must be >= 1"),
    ("train.log_every_steps", 0, "config.train.log_every_steps=0: must be >= 1"),
    ("model.dtype", "float16", "config.model.dtype='float16': must be one of ['bf16', 'bfloat16', 'float32']"),
    ("model.attention_mode", "add", "config.model.attention_mode='add': must be one of ['mul', 'residual']"),
    ("model.teacher1", "resnet19", "config.model.teacher1='resnet19': must be one of ['resnet101'"),
    ("model.teacher2", "vgg16", "config.model.teacher2='vgg16': must be one of"),
    ("model.decoder_widths", (256, 128), "config.model.decoder_widths=(256, 128): must be 3 positive integers"),
    ("train.cache_teacher_features", "yes", "config.train.cache_teacher_features='yes': must be one of"),
    ("maps.smoothing_sigma", -1.0, "config.maps.smoothing_sigma=-1.0: must be >= 0"),
    ("eval.pro_max_fpr", 0.0, "config.eval.pro_max_fpr=0.0: must be in (0, 1]"),
    ("seed", -1, "config.seed=-1: must be >= 0"),
    ("mode", "predict", "config.mode='predict': must be one of ['eval', 'train']"),
]


@pytest.mark.parametrize("key,value,expected", CASES, ids=[f"{k}={v}" for k, v, _ in CASES])
def test_each_bad_value_names_its_key(key, value, expected):
    assert expected in _problems(**{key: value})


def test_all_problems_in_one_error_and_fast():
    t0 = time.perf_counter()
    text = _problems(**{"train.epochs": 0, "train.batch_size": -8, "maps.fusion": "mul"})
    assert time.perf_counter() - t0 < 1.0
    assert text.startswith("Invalid config (3 problems)")
    assert "train.epochs" in text and "train.batch_size" in text and "maps.fusion" in text


def test_unknown_keys_and_function_arguments():
    config = _config()
    with config.unlocked():
        config.train.epoch = 5  # a typo a config file can make (the command line cannot)
    config.maps.kwargs = {"student2_wieght": 0.5}
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(config)
    assert "config.train.epoch: not a config key (did you mean config.train.epochs?)" in str(e.value)
    assert "config.maps.kwargs={'student2_wieght': 0.5}" in str(e.value)
    assert "multiply_levels takes []" in str(e.value)
    config = _config()
    config.loss.kwargs = {"distance": "cosine"}
    with pytest.raises(config_checks.ConfigError, match="loss.kwargs.distance='cosine': not a registered distance"):
        config_checks.validate(config)


def test_missing_weight_files_fail_in_train_mode_only(tmp_path):
    config = _config(**{"model.random_teachers": False,
                        "model.teacher1_weights": str(tmp_path / "r18.msgpack"),
                        "model.teacher2_weights": str(tmp_path / "r50.msgpack")})
    with pytest.raises(config_checks.ConfigError, match="teacher1_weights: converted resnet18 weights not found"
                                                        "(.|\n)*teacher2_weights"):
        config_checks.validate(config)
    config.mode = "eval"  # evaluation reads WORKDIR/teachers
    config_checks.validate(config)


def test_a_jobs_batch_must_split_over_its_data_devices(monkeypatch):
    monkeypatch.setattr(config_checks.sharding.jax, "device_count", lambda: 4)
    config_checks.validate(_config(**{"train.batch_size": 6}))  # one device per job: fine
    assert "config.mesh.data=4 must divide train.batch_size=6" in _problems(
        **{"train.batch_size": 6, "mesh.data": "4"})
    assert "config.mesh.model='x': must be 'auto' or a positive number" in _problems(**{"mesh.model": "x"})
    assert "config.train.select_epoch='best'" in _problems(**{"train.select_epoch": "best"})
    assert "config.train.seeds='0,a'" in _problems(**{"train.seeds": "0,a"})


# ----------------------------------------------------------------------------- through main


@pytest.fixture(scope="module")
def two_categories(tmp_path_factory):
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("checks") / "data")
    synthetic.generate(root, seed=0, image_size=32, categories=("fabric", "mesh"))
    return root


SMALL = ["--config.data.image_size=32", "--config.train.batch_size=8", "--config.eval.batch_size=8",
         "--config.train.epochs=1", "--config.model.random_teachers=True", "--config.eval.figures=False"]


def _main(workdir, root, *overrides):
    t0 = time.perf_counter()
    proc = subprocess.run(h.main_cmd("stpm.py", str(workdir), f"--config.data.root={root}", *SMALL, *overrides),
                          cwd=h.REPO, env=h.env(), capture_output=True, text=True, timeout=600)
    return proc, time.perf_counter() - t0


def test_main_refuses_a_bad_config_before_reading_data(two_categories, tmp_path):
    """Issue 18: maps.fusion=mul failed after the whole training; epochs=0 "trained" and reported
    AUROCs of untrained students. Now main exits at once, nothing written to the workdir."""
    work = tmp_path / "bad"
    proc, seconds = _main(work, two_categories, "--config.maps.fusion=mul", "--config.train.epochs=0")
    assert proc.returncode != 0
    assert "config.maps.fusion='mul'" in proc.stderr and "config.train.epochs=0" in proc.stderr
    assert not work.exists() or not os.listdir(work)
    print(f"bad config failed after {seconds:.1f} s (process start included)")


def test_main_refuses_a_corrupt_image_of_the_second_category_before_training(two_categories, tmp_path):
    """Issue 18: a corrupt test image of the second category failed the run after the first had
    trained. Now every category is decoded first: no checkpoint is written."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(two_categories, root)
    bad = root / "mesh" / "test" / "good" / "002.png"
    bad.write_bytes(bad.read_bytes()[:150])
    work = tmp_path / "work"
    proc, seconds = _main(work, root, "--config.data.categories=fabric,mesh")
    assert proc.returncode != 0
    assert f"Corrupt or truncated image file {bad}" in proc.stderr
    assert not (work / "fabric" / "checkpoints").exists() and not (work / "teachers").exists()
    print(f"corrupt image failed after {seconds:.1f} s (process start included)")
