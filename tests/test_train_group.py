"""A group of two jobs of different sizes: killed and rerun it ends as an uninterrupted run;
a job that turns non-finite stops alone; the last partial batch is trained."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests import _train_helpers as h


def _final_params(workdir: str, category: str, folder: str = "checkpoints") -> tuple[int, dict]:
    import orbax.checkpoint as ocp
    ckpt = os.path.join(workdir, category, folder)
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(ckpt, str(steps[-1]), "state"))
    return steps[-1], tree


GROUP = ["--config.data.categories=button,mesh", "--config.train.epochs=3",
         "--config.train.checkpoint_every_epochs=1", "--config.model.random_teachers=True",
         "--config.train.select_epoch=best_holdout", *h.SMALL_RUN]


@pytest.fixture(scope="module")
def group_data(tmp_path_factory):
    """Two categories of different sizes (mesh: 20 training images, button: 32)."""
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("group_data") / "synthetic")
    synthetic.generate(root, seed=0, image_size=64, categories=("button", "mesh"))
    good = os.path.join(root, "mesh", "train", "good")
    for name in sorted(os.listdir(good))[20:]:
        os.remove(os.path.join(good, name))
    return root


@pytest.fixture(scope="module")
def clean_group(group_data, tmp_path_factory):
    """An uninterrupted 3-epoch run of a group of two jobs (the reference of the next tests)."""
    full = str(tmp_path_factory.mktemp("clean_group") / "full")
    h.run(h.main_cmd("stpm.py", full, f"--config.data.root={group_data}", *GROUP), h.env())
    return full


def test_group_killed_and_rerun_ends_like_an_uninterrupted_one(group_data, clean_group, tmp_path):
    """SIGKILL once the first checkpoint is on disk, rerun: every job ends with the same
    parameters, the same held-out curve and the same selected (best held-out) epoch; the
    partial epoch's metrics.jsonl lines are cut back."""
    env = h.env()
    killed = str(tmp_path / "killed")
    cmd = h.main_cmd("stpm.py", killed, f"--config.data.root={group_data}", *GROUP)
    proc = subprocess.Popen(cmd, cwd=h.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    firsts = [os.path.join(killed, c, "checkpoints", "1", "state") for c in ("button", "mesh")]
    deadline = time.time() + 400
    while not any(os.path.isdir(f) for f in firsts) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for c in ("button", "mesh"):
        done = [s for s in os.listdir(os.path.join(killed, c, "checkpoints")) if s.isdigit()] \
            if os.path.isdir(os.path.join(killed, c, "checkpoints")) else []
        assert "3" not in done, "the run finished before it could be killed; the test proves nothing"
    h.run(cmd, env)
    import jax
    for c in ("button", "mesh"):
        for folder in ("checkpoints", "best"):
            e1, p1 = _final_params(clean_group, c, folder)
            e2, p2 = _final_params(killed, c, folder)
            assert e1 == e2, (c, folder, e1, e2)
            for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
        r1 = json.load(open(os.path.join(clean_group, c, "results.json")))
        r2 = json.load(open(os.path.join(killed, c, "results.json")))
        curve = r1["selection"]["holdout_curve"]
        assert [e for e, _ in curve] == [1, 2, 3]
        assert r1["selection"]["epoch"] == min(curve, key=lambda x: x[1])[0]  # the lowest held-out map
        assert r1["selection"]["source"] == "best"
        assert r2["selection"]["epoch"] == r1["selection"]["epoch"]
        np.testing.assert_allclose([v for _, v in r2["selection"]["holdout_curve"]], [v for _, v in curve],
                                   rtol=1e-5)
        steps = [json.loads(x)["step"] for x in open(os.path.join(killed, c, "metrics.jsonl"))]
        assert steps == sorted(set(steps)), "metrics.jsonl repeats steps after the resume"


def test_a_job_that_turns_non_finite_stops_alone(group_data, clean_group, tmp_path):
    """NaN images for one job at one step (a test-only hook): that job stops (reported in its
    results.json and in results.md, the run exits non-zero), the other's results equal a clean
    run's; a diverging continuation keeps the last good checkpoint."""
    env = h.env()
    env["RSTPM_TEST_INJECT_NAN"] = "1:3"  # slot 1 (mesh), group step 3 (epoch 1)
    broken = str(tmp_path / "broken")
    proc = subprocess.run(h.main_cmd("stpm.py", broken, f"--config.data.root={group_data}", *GROUP),
                          cwd=h.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "1 of 2 job(s) failed (mesh)" in proc.stderr, proc.stderr[-3000:]
    mesh = json.load(open(os.path.join(broken, "mesh", "results.json")))
    assert mesh["status"] == "failed" and "NaN/inf" in mesh["error"]
    assert "mesh FAILED" in open(os.path.join(broken, "results.md")).read()
    import jax
    e1, p1 = _final_params(clean_group, "button")
    e2, p2 = _final_params(broken, "button")
    assert e1 == e2 == 3
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ok1 = json.load(open(os.path.join(clean_group, "button", "results.json")))
    ok2 = json.load(open(os.path.join(broken, "button", "results.json")))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert ok2[key] == ok1[key], key

    # A diverging continuation (epoch 4 at an absurd learning rate): both jobs stop with a
    # clear error, the last good checkpoint (epoch 3) stays the latest.
    full = str(tmp_path / "continued")
    shutil.copytree(clean_group, full)
    proc = subprocess.run(h.main_cmd("stpm.py", full, f"--config.data.root={group_data}", *GROUP,
                                     "--config.train.epochs=4", "--config.train.learning_rate=1e30"),
                          cwd=h.REPO, env=h.env(), capture_output=True, text=True)
    assert proc.returncode != 0 and "NaN/inf" in proc.stderr and "epoch 3" in proc.stderr, proc.stderr[-3000:]
    e3, p3 = _final_params(full, "button")
    assert e3 == 3 and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p3))

    # Evaluation alone on the saved checkpoints reproduces the metrics.
    before = json.load(open(os.path.join(clean_group, "button", "results.json")))
    h.run(h.main_cmd("stpm.py", clean_group, f"--config.data.root={group_data}", *GROUP, "--config.mode=eval"),
          h.env())
    after = json.load(open(os.path.join(clean_group, "button", "results.json")))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert after[key] == pytest.approx(before[key], abs=1e-6)
    lines = [json.loads(x) for x in open(os.path.join(clean_group, "button", "metrics.jsonl"))]
    assert lines[-1]["loss"] < 0.9 * lines[0]["loss"], (lines[0]["loss"], lines[-1]["loss"])


def test_drop_last_false_trains_every_image(group_data, clean_group):
    """train.drop_last=False (the reference): ceil(n / batch) steps per epoch, the last padded."""
    for c, n in (("button", 29), ("mesh", 18)):  # after the 10% holdout
        steps = [json.loads(x)["step"] for x in open(os.path.join(clean_group, c, "metrics.jsonl"))]
        assert max(steps) == 3 * -(-n // 8), (c, steps)
