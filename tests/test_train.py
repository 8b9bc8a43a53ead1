"""Training steps: the group step is the same on any mesh; two processes (hosts) agree."""

from __future__ import annotations

import os
import re
import socket
import subprocess

from tests import _train_helpers as h

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

def run(model_axis, data_axis, jobs, cached):
    slots = len(jobs)  # slot s trains job jobs[s]'s batch
    layout = fleet.Layout(sharding.make_job_mesh(model_axis, data_axis), slots, 8)
    step = train.compile_group_step(model, loss_fn, layout.mesh, cached, True)
    states = fleet.put_slots(fleet.stack([state0] * slots), layout)
    host = {s: {"image": images[jobs[s]][lo:hi], "valid": valid[jobs[s]][lo:hi],
                "feats": jax.tree.map(lambda f: f[lo:hi], feats[jobs[s]])}
            for s, (lo, hi) in layout.local_rows().items()}
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
alone = [run(1, 1, [0], False), run(1, 1, [1], False)]  # each job alone on one device
# 2x4: both jobs stacked, each batch split over 4 devices, the features computed in the step.
out = {"1x8 cached": run(1, 8, [0], True), "2x4": run(2, 4, [0, 1], False)}
moved = maxabs(slot(alone[0][0], 0), state0.params)
assert moved > 1e-4, moved
for key, got in out.items():
    for i in range(2 if key.startswith("2x") else 1):
        ref = alone[i]
        update_err = maxabs(slot(got[0], i), slot(ref[0], 0)) / moved
        stats_err = maxabs(slot(got[1], i), slot(ref[1], 0))
        loss_err = abs(float(got[2][i]) - float(ref[2][0]))
        assert update_err < 1e-10, (key, i, "params", update_err)
        assert stats_err < 1e-12, (key, i, "batch_stats", stats_err)
        assert loss_err < 1e-12 * abs(float(ref[2][0])), (key, i, "loss", loss_err)
        print(key, i, update_err, stats_err)
print("OK", moved)
"""


def test_group_step_is_the_same_on_any_mesh():
    """One train step in float64: a job alone on 1 device == its batch split over 8 devices
    (teacher features cached) == stacked with another job on a 2 x 4 mesh (features computed in
    the step), whose padded batch (5 of 8 valid) equals that job trained alone. In float32 the
    summation orders round differently and a near-zero ReLU input can flip (_train_helpers)."""
    out = h.run_python(STEP_EQUIVALENCE, h.env(devices=8), timeout=900)
    assert "OK" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree(synthetic_root, tmp_path):
    """Two processes on localhost (gloo), one epoch: both end with the same parameters."""
    cat = sorted(os.listdir(synthetic_root))[0]
    port = _free_port()
    env = h.env()
    procs = []
    for i in range(2):
        cmd = h.main_cmd("stpm.py", str(tmp_path / "mh"), f"--config.data.root={synthetic_root}",
                         f"--config.data.categories={cat}", "--config.train.epochs=1",
                         "--config.model.random_teachers=True", *h.SMALL_RUN,
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
