"""Training: sharded step equivalence, teacher cache, multi-host, resume, demo end to end."""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from tests import _train_helpers as h

# A small full-RSTPM setting shared by the end-to-end runs (one category, 32x32).
SMALL = ["--config.data.image_size=32", "--config.train.batch_size=8", "--config.eval.batch_size=8",
         "--config.eval.figures=False", "--config.train.log_every_steps=1"]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    synthetic.generate(root, seed=0)
    return root


STEP_EQUIVALENCE = r"""
import jax, numpy as np
from jax.sharding import Mesh
from configs import rstpm_r18_r18
from rstpm_jax import losses, sharding, train, workdir
cfg = rstpm_r18_r18.get_config()  # both students, attention; the smaller teacher 2 compiles faster
cfg.data.image_size = 32
model = workdir.create_model(cfg)
state0, teachers0 = train.create_train_state(jax.random.key(0), cfg, model, 32)
images = np.random.RandomState(0).normal(size=(8, 32, 32, 3)).astype(np.float32)
loss_fn = losses.from_config(cfg.loss, cfg.maps)
assert jax.device_count() == 8, jax.devices()
out = {}
for n, cached in ((1, False), (8, False), (8, True)):
    mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
    if True:
        state = sharding.replicate(state0, mesh)
        teachers = sharding.replicate(teachers0, mesh)
        x = sharding.to_global(images, mesh)
        assert len(x.sharding.device_set) == n
        step = train.compile_train_step(model, loss_fn, mesh, cached)
        if cached:
            feats = sharding.to_global(jax.device_get(model.teacher_features(teachers0, images)), mesh)
            new, metrics = step(state, teachers, x, feats)
        else:
            new, metrics = step(state, teachers, x)
        out[(n, cached)] = jax.device_get((new.params, new.batch_stats, metrics["loss"]))
def maxabs(xs, ys):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(xs), jax.tree.leaves(ys)))
ref = out[(1, False)]
# Parameters: the update (new - old) must agree to float-reordering precision, relative to its size.
moved = maxabs(ref[0], state0.params)
assert moved > 1e-4, moved
for key, (params, stats, loss) in out.items():
    update_err = maxabs(params, ref[0]) / moved
    stats_err = maxabs(stats, ref[1]) / max(1.0, max(float(np.max(np.abs(x))) for x in jax.tree.leaves(ref[1])))
    assert update_err < 1e-3, (key, "params", update_err)
    assert stats_err < 2e-5, (key, "batch_stats", stats_err)
    assert abs(float(loss) - float(ref[2])) < 1e-5 * abs(float(ref[2])), (key, "loss", loss, ref[2])
    print(key, update_err, stats_err)
print("OK", moved)
"""


def test_sharded_step_matches_single_device():
    """8 simulated devices == 1 device; cached teacher features == computed in the step."""
    out = h.run_python(STEP_EQUIVALENCE, h.env(devices=8))
    assert "OK" in out


def _final_params(workdir: str, category: str) -> dict:
    import orbax.checkpoint as ocp
    ckpt = os.path.join(workdir, category, "checkpoints")
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(ckpt, str(steps[-1]), "state"))
    return steps[-1], tree


def _category(root: str) -> str:
    return sorted(os.listdir(root))[0]


def test_resume_after_kill_matches_uninterrupted(dataset, jax_cache, tmp_path):
    cat = _category(dataset)
    args = [f"--config.data.root={dataset}", f"--config.data.categories={cat}", "--config.train.epochs=3",
            "--config.train.checkpoint_every_epochs=1", *SMALL]
    env = h.env(jax_cache)
    full = str(tmp_path / "full")
    h.run(h.main_cmd("stpm.py", full, *args, "--config.model.random_teachers=True"), env)

    # The same run, killed (SIGKILL) once the epoch-1 checkpoint is on disk, then rerun.
    killed = str(tmp_path / "killed")
    cmd = h.main_cmd("stpm.py", killed, *args, "--config.model.random_teachers=True")
    proc = subprocess.Popen(cmd, cwd=h.REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = os.path.join(killed, cat, "checkpoints", "1", "state")
    deadline = time.time() + 300
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [s for s in os.listdir(os.path.join(killed, cat, "checkpoints")) if s.isdigit()]
    assert "3" not in done, "the run finished before it could be killed; the test proves nothing"
    h.run(cmd, env)

    e1, p1 = _final_params(full, cat)
    e2, p2 = _final_params(killed, cat)
    assert e1 == e2 == 3
    import jax
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)

    # A diverging continuation (epoch 4 at an absurd learning rate) stops with a clear error
    # and leaves the last good checkpoint (epoch 3) as the latest.
    proc = subprocess.run(h.main_cmd("stpm.py", full, *args, "--config.model.random_teachers=True",
                                     "--config.train.epochs=4", "--config.train.learning_rate=1e30"),
                          cwd=h.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "NaN/inf" in proc.stderr, proc.stderr[-3000:]
    assert "epoch 3" in proc.stderr
    e3, p3 = _final_params(full, cat)
    assert e3 == 3 and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p3))

    # Evaluation alone on the saved checkpoint (no training) reproduces the metrics.
    before = json.load(open(os.path.join(full, cat, "results.json")))
    h.run(h.main_cmd("stpm.py", full, *args, "--config.model.random_teachers=True", "--config.mode=eval"), env)
    after = json.load(open(os.path.join(full, cat, "results.json")))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert after[key] == pytest.approx(before[key], abs=1e-6)

    # The loss falls over training (synthetic data), and results were written.
    lines = [json.loads(x) for x in open(os.path.join(full, cat, "metrics.jsonl"))]
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"], (lines[0]["loss"], lines[-1]["loss"])
    res = json.load(open(os.path.join(full, cat, "results.json")))
    for key in ("image_auroc", "pixel_auroc", "num_test_images", "config"):
        assert key in res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree(dataset, jax_cache, tmp_path):
    """Two processes on localhost (gloo), one epoch: both end with the same parameters."""
    cat = _category(dataset)
    port = _free_port()
    env = h.env(jax_cache)
    procs = []
    for i in range(2):
        cmd = h.main_cmd("stpm.py", str(tmp_path / "mh"), f"--config.data.root={dataset}",
                         f"--config.data.categories={cat}", "--config.train.epochs=1",
                         "--config.model.random_teachers=True", *SMALL,
                         f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                         "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
        procs.append(subprocess.Popen(cmd, cwd=h.REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    prints = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-6000:]
        found = re.findall(r"process (\d) of 2: parameter fingerprint ([0-9a-f]{16})", err)
        assert len(found) == 1, err[-3000:]
        prints.append(found[0])
    assert {p[0] for p in prints} == {"0", "1"}
    assert prints[0][1] == prints[1][1], prints
    assert os.path.isfile(tmp_path / "mh" / cat / "results.json")


def test_demo_config_end_to_end(jax_cache, tmp_path):
    """configs/demo.py as shipped (generates its data), at a smaller size and fewer epochs."""
    work = str(tmp_path / "demo")
    h.run(h.main_cmd("demo.py", work, "--config.data.image_size=32", "--config.train.epochs=1",
                     "--config.data.categories=all"), h.env(jax_cache))
    assert os.path.isdir(os.path.join(work, "synthetic"))
    results = glob.glob(os.path.join(work, "*", "results.json"))
    assert len(results) >= 2
    assert os.path.isfile(os.path.join(work, "results.md"))


def test_bad_config_errors(dataset, jax_cache, tmp_path):
    env = h.env(jax_cache)
    base = h.main_cmd("stpm.py", str(tmp_path / "bad"), f"--config.data.root={dataset}",
                      "--config.model.random_teachers=True", *SMALL)
    proc = subprocess.run(base + ["--config.data.categories=nope"], cwd=h.REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "nope" in proc.stderr
    proc = subprocess.run(base + ["--config.train.no_such_key=1"], cwd=h.REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    proc = subprocess.run(base + ["--config.train.batch_size=6"], cwd=h.REPO,
                          env=h.env(jax_cache, devices=4), capture_output=True, text=True)
    assert proc.returncode != 0 and "train.batch_size" in proc.stderr
    proc = subprocess.run(h.main_cmd("stpm.py", str(tmp_path / "bad2"), f"--config.data.root={dataset}",
                                     "--config.model.teacher1_weights=/nonexistent/r18.msgpack", *SMALL),
                          cwd=h.REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "convert_torchvision" in proc.stderr


def test_ablation_sweep_writes_one_table(dataset, jax_cache, tmp_path):
    """rstpm_jax.sweep runs several ablation configs and writes the comparison table."""
    cat = _category(dataset)
    work = tmp_path / "sweep"
    h.run([h.sys.executable, "-m", "rstpm_jax.sweep", f"--config={h.REPO}/configs/mvtec.py",
           f"--workdir={work}", "--models=stpm,stpm_attention", f"--config.data.root={dataset}",
           f"--config.data.categories={cat}", "--config.train.epochs=1",
           "--config.model.random_teachers=True", *SMALL], h.env(jax_cache))
    table = (work / "ablation.md").read_text()
    assert "stpm" in table and "stpm_attention" in table and cat in table
    assert (work / "ablation.csv").is_file()
    for model in ("stpm", "stpm_attention"):
        res = json.load(open(work / model / cat / "results.json"))
        assert res["model"] == model and res["config"]["name"] == model
