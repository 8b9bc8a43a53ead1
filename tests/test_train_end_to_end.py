"""Runs through ``main`` and ``sweep``: the demo config as shipped, bad configs, the ablation table."""

from __future__ import annotations

import glob
import json
import os
import subprocess

from tests import _train_helpers as h


def test_demo_config_end_to_end(tmp_path):
    """configs/demo.py as shipped (generates its data), at a smaller size and fewer epochs."""
    work = str(tmp_path / "demo")
    h.run(h.main_cmd("demo.py", work, "--config.data.image_size=32", "--config.train.epochs=1",
                     "--config.data.categories=all"), h.env())
    assert os.path.isdir(os.path.join(work, "synthetic"))
    results = glob.glob(os.path.join(work, "*", "results.json"))
    assert len(results) >= 2
    assert os.path.isfile(os.path.join(work, "results.md"))


def test_bad_config_errors(synthetic_root, tmp_path):
    env = h.env()
    base = h.main_cmd("stpm.py", str(tmp_path / "bad"), f"--config.data.root={synthetic_root}",
                      "--config.model.random_teachers=True", *h.SMALL_RUN)
    proc = subprocess.run(base + ["--config.data.categories=nope"], cwd=h.REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "nope" in proc.stderr
    proc = subprocess.run(base + ["--config.train.no_such_key=1"], cwd=h.REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    proc = subprocess.run(base + ["--config.train.batch_size=6", "--config.mesh.data=4"], cwd=h.REPO,
                          env=h.env(devices=4), capture_output=True, text=True)
    assert proc.returncode != 0 and "mesh.data=4 must divide train.batch_size=6" in proc.stderr
    proc = subprocess.run(h.main_cmd("stpm.py", str(tmp_path / "bad2"), f"--config.data.root={synthetic_root}",
                                     "--config.model.teacher1_weights=/nonexistent/r18.msgpack", *h.SMALL_RUN),
                          cwd=h.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "convert_torchvision" in proc.stderr


def test_ablation_sweep_writes_one_table(synthetic_root, tmp_path):
    """rstpm_jax.sweep runs several ablation configs and writes the comparison table."""
    cat = sorted(os.listdir(synthetic_root))[0]
    work = tmp_path / "sweep"
    h.run([h.sys.executable, "-m", "rstpm_jax.sweep", f"--config={h.REPO}/configs/mvtec.py",
           f"--workdir={work}", "--models=stpm,stpm_attention", f"--config.data.root={synthetic_root}",
           f"--config.data.categories={cat}", "--config.train.epochs=1",
           "--config.model.random_teachers=True", *h.SMALL_RUN], h.env())
    table = (work / "ablation.md").read_text()
    assert "stpm" in table and "stpm_attention" in table and cat in table
    assert (work / "ablation.csv").is_file()
    for model in ("stpm", "stpm_attention"):
        res = json.load(open(work / model / cat / "results.json"))
        assert res["model"] == model and res["config"]["name"] == model
