"""Training: sharded step equivalence, teacher cache, multi-host, resume, demo end to end."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
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


STEP_EQUIVALENCE = h.FLOAT64 + r"""
import numpy as np
from configs import rstpm_r18_r18
from rstpm_jax import fleet, losses, sharding, train, workdir
cfg = rstpm_r18_r18.get_config()  # both students, attention; the smaller teacher 2 compiles faster
cfg.data.image_size = 32
model = workdir.create_model(cfg)
state0, teachers0 = train.create_train_state(jax.random.key(0), cfg, model, 32)
state0, teachers0 = jax.device_get((state0, teachers0))
rng = np.random.RandomState(0)
images = rng.normal(size=(2, 8, 32, 32, 3))
valid = np.ones((2, 8)); valid[1, 5:] = 0  # the second job's batch: 5 images and 3 padding rows
feats = [jax.device_get(model.teacher_features(teachers0, x)) for x in images]
loss_fn = losses.from_config(cfg.loss, cfg.maps)
assert jax.device_count() == 8, jax.devices()
like = {"image": jax.ShapeDtypeStruct((8, 32, 32, 3), np.float64), "valid": jax.ShapeDtypeStruct((8,), np.float64)}
like["feats"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), feats[0])

def run(model_axis, data_axis, slots, cached):
    layout = fleet.Layout(sharding.make_job_mesh(model_axis, data_axis), slots, 8)
    step = train.compile_group_step(model, loss_fn, layout.mesh, cached, True)
    states = fleet.put_slots(fleet.stack([state0] * slots), layout)
    host = {s: {"image": images[s][lo:hi], "valid": valid[s][lo:hi],
                "feats": jax.tree.map(lambda f: f[lo:hi], feats[s])} for s, (lo, hi) in layout.local_rows().items()}
    arrays = fleet.put_batches(host, like, layout)
    args = [states, sharding.replicate(teachers0, layout.mesh), arrays["image"], arrays["valid"],
            fleet.put_slots(np.ones(slots, bool), layout)] + ([arrays["feats"]] if cached else [])
    hlo = step.lower(*args).as_text()
    assert "f32" not in hlo and "f64" in hlo, "the step must run in float64 throughout"
    new, metrics = step(*args)
    return jax.device_get((new.params, new.batch_stats, metrics["loss"]))

def maxabs(xs, ys):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(xs), jax.tree.leaves(ys)))

slot = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
alone = [run(1, 1, 1, False), None]  # job 0 alone on one device
out = {"1x8": run(1, 8, 1, False), "1x8 cached": run(1, 8, 1, True), "2x4": run(2, 4, 2, False),
       "2x1": run(2, 1, 2, False)}
moved = maxabs(slot(alone[0][0], 0), state0.params)
assert moved > 1e-4, moved
for key, got in out.items():
    for i in range(2 if key.startswith("2x") else 1):
        ref = alone[0] if i == 0 else out["2x1"]
        update_err = maxabs(slot(got[0], i), slot(ref[0], 0 if i == 0 else 1)) / moved
        stats_err = maxabs(slot(got[1], i), slot(ref[1], 0 if i == 0 else 1))
        loss_err = abs(float(got[2][i]) - float(ref[2][0 if i == 0 else 1]))
        assert update_err < 1e-10, (key, i, "params", update_err)
        assert stats_err < 1e-12, (key, i, "batch_stats", stats_err)
        assert loss_err < 1e-12 * abs(float(ref[2][0 if i == 0 else 1])), (key, i, "loss", loss_err)
        print(key, i, update_err, stats_err)
print("OK", moved)
"""


def test_group_step_is_the_same_on_any_mesh():
    """One train step in float64: a job alone on 1 device == its batch split over 8 devices
    (teacher features computed or cached) == stacked with another job on a 2 x 4 and a 2 x 1
    mesh, whose padded batch (5 of 8 valid) also agrees between the meshes. In float32 the
    summation orders round differently and a near-zero ReLU input can flip (_train_helpers)."""
    out = h.run_python(STEP_EQUIVALENCE, h.env(devices=8), timeout=900)
    assert "OK" in out


def _final_params(workdir: str, category: str, folder: str = "checkpoints") -> tuple[int, dict]:
    import orbax.checkpoint as ocp
    ckpt = os.path.join(workdir, category, folder)
    steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
    with ocp.StandardCheckpointer() as c:
        tree = c.restore(os.path.join(ckpt, str(steps[-1]), "state"))
    return steps[-1], tree


def _category(root: str) -> str:
    return sorted(os.listdir(root))[0]


GROUP = ["--config.data.categories=button,mesh", "--config.train.epochs=3",
         "--config.train.checkpoint_every_epochs=1", "--config.model.random_teachers=True",
         "--config.train.select_epoch=best_holdout", *SMALL]


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
def clean_group(group_data, jax_cache, tmp_path_factory):
    """An uninterrupted 3-epoch run of a group of two jobs (the reference of the next tests)."""
    full = str(tmp_path_factory.mktemp("clean_group") / "full")
    h.run(h.main_cmd("stpm.py", full, f"--config.data.root={group_data}", *GROUP), h.env(jax_cache))
    return full


def test_group_killed_and_rerun_ends_like_an_uninterrupted_one(group_data, clean_group, jax_cache, tmp_path):
    """SIGKILL once the first checkpoint is on disk, rerun: every job ends with the same
    parameters, the same held-out curve and the same selected (best held-out) epoch; the
    partial epoch's metrics.jsonl lines are cut back."""
    env = h.env(jax_cache)
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


def test_a_job_that_turns_non_finite_stops_alone(group_data, clean_group, jax_cache, tmp_path):
    """NaN images for one job at one step (a test-only hook): that job stops (reported in its
    results.json and in results.md, the run exits non-zero), the other's results equal a clean
    run's; a diverging continuation keeps the last good checkpoint."""
    env = h.env(jax_cache)
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
                          cwd=h.REPO, env=h.env(jax_cache), capture_output=True, text=True)
    assert proc.returncode != 0 and "NaN/inf" in proc.stderr and "epoch 3" in proc.stderr, proc.stderr[-3000:]
    e3, p3 = _final_params(full, "button")
    assert e3 == 3 and all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(p3))

    # Evaluation alone on the saved checkpoints reproduces the metrics.
    before = json.load(open(os.path.join(clean_group, "button", "results.json")))
    h.run(h.main_cmd("stpm.py", clean_group, f"--config.data.root={group_data}", *GROUP, "--config.mode=eval"),
          h.env(jax_cache))
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
    proc = subprocess.run(base + ["--config.train.batch_size=6", "--config.mesh.data=4"], cwd=h.REPO,
                          env=h.env(jax_cache, devices=4), capture_output=True, text=True)
    assert proc.returncode != 0 and "mesh.data=4 must divide train.batch_size=6" in proc.stderr
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
