"""Many models at once: a group of jobs (categories x seeds) stacked over a model x data mesh
trains exactly as each job alone, resumes exactly, and a job that fails stops alone."""

from __future__ import annotations

import json
import os

import pytest

from tests import _train_helpers as h

SMALL = ["--config.data.image_size=32", "--config.train.batch_size=8", "--config.eval.batch_size=8",
         "--config.eval.figures=False", "--config.train.log_every_steps=1",
         "--config.model.random_teachers=True", "--config.train.select_epoch=last"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic categories at 32 px with 16 training images (14 after the holdout: 2 steps
    of 8, the second padded); mesh keeps 6 (5: 1 padded step), so categories differ in size."""
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("fleet_data") / "synthetic")
    synthetic.generate(root, seed=0, image_size=32, num_train=16)
    train_good = os.path.join(root, "mesh", "train", "good")
    for name in sorted(os.listdir(train_good))[6:]:
        os.remove(os.path.join(train_good, name))
    return root


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fleet_jax_cache"))


EQUIVALENCE = h.FLOAT64 + r"""
import json, os, sys
import numpy as np
import ml_collections
from configs import stpm
from rstpm_jax import jobs, train, workdir
from rstpm_jax.data import sources
root, out = sys.argv[1], sys.argv[2]
assert jax.device_count() == 12, jax.devices()
cfg = stpm.get_config()
cfg.data.root, cfg.data.categories, cfg.data.image_size = root, "button,fabric,mesh", 32
cfg.model.random_teachers = True
cfg.train.batch_size, cfg.train.epochs, cfg.train.seeds = 8, 2, "0,1"
cfg.train.select_epoch, cfg.train.checkpoint_every_epochs, cfg.eval.figures = "last", 1, False
source, cats = sources.prepare(cfg, out)
group = jobs.plan(cfg, os.path.join(out, "group"), cats)
assert len(group) == 6
for run_dir, c in jobs.run_dirs(group).items():
    os.makedirs(run_dir, exist_ok=True); workdir.save_config(run_dir, c)
fails = train.train_group(group, source, ml_collections.ConfigDict({"model": "6", "data": "2"}))
assert not any(fails.values()), fails
alone = jobs.plan(cfg, os.path.join(out, "alone"), cats)
for job in alone:  # one by one, one device each
    os.makedirs(job.workdir, exist_ok=True); workdir.save_config(job.workdir, job.config)
    assert not any(train.train_group([job], source, ml_collections.ConfigDict({"model": "1", "data": "1"})).values())
mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
worst = {}
for g, a in zip(group, alone):
    assert (g.category, g.seed) == (a.category, a.seed)
    _, _, pg = workdir.load_trained(g.config, g.workdir, g.category, mesh)
    _, _, pa = workdir.load_trained(a.config, a.workdir, a.category, mesh)
    m0 = workdir.create_model(a.config)
    s0 = workdir.fresh_state(a.config, m0)
    leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
    moved = max(float(np.max(np.abs(y - z))) for y, z in zip(leaves(pa["params"]), leaves(s0.params)))
    err = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(pg["params"]), leaves(pa["params"])))
    stats = max(float(np.max(np.abs(x - y))) for x, y in zip(leaves(pg["batch_stats"]), leaves(pa["batch_stats"])))
    worst[g.name] = {"update_rel": err / moved, "batch_stats_abs": stats, "moved": moved,
                     "dtype": str(jax.tree.leaves(pg["params"])[0].dtype)}
print("RESULT", json.dumps(worst))
"""


def test_a_group_on_a_model_x_data_mesh_trains_as_each_job_alone(data, jax_cache, tmp_path):
    """3 categories x 2 seeds on 12 devices (model 6 x data 2), 2 epochs, equal the same 6 jobs
    trained one by one on one device each: categories of different sizes (mesh has fewer
    images: fewer steps, a padded last batch), each seed its own order and initialisation."""
    out = h.run([h.sys.executable, "-c", EQUIVALENCE, data, str(tmp_path)], h.env(jax_cache, devices=12),
                timeout=1200).stdout
    result = json.loads(out.split("RESULT", 1)[1])
    print(result)
    assert set(result) == {f"seed_{s}/{c}" for s in (0, 1) for c in ("button", "fabric", "mesh")}
    for name, r in result.items():
        assert r["moved"] > 1e-4 and r["dtype"] == "float64", (name, r)
        assert r["update_rel"] < 1e-5, (name, r)
        assert r["batch_stats_abs"] < 1e-5, (name, r)


def test_jobs_at_once_follows_device_memory():
    from rstpm_jax import train
    gb = 2**30
    assert train.jobs_at_once(15, 1 * gb, 8, 80 * gb) == 15  # all fit
    assert train.jobs_at_once(15, 10 * gb, 1, 16 * gb) == 1  # never fewer than one
    assert train.jobs_at_once(15, 2 * gb, 2, 10 * gb) == 8  # 4 per device x 2 devices


def test_a_group_too_big_for_memory_trains_in_chunks(data, tmp_path, monkeypatch, caplog):
    """When the jobs' estimated memory exceeds the devices', they train a chunk at a time
    (logged), and every job still trains."""
    import logging as std_logging

    from configs import stpm
    from rstpm_jax import jobs, train, workdir
    from rstpm_jax.data import sources

    cfg = stpm.get_config()
    cfg.data.root, cfg.data.categories, cfg.data.image_size = data, "button,mesh", 32
    cfg.model.random_teachers, cfg.train.batch_size, cfg.train.epochs = True, 8, 1
    cfg.train.select_epoch, cfg.eval.figures = "last", False
    source, cats = sources.prepare(cfg, str(tmp_path))
    planned = jobs.plan(cfg, str(tmp_path), cats)
    workdir.save_config(str(tmp_path), cfg)
    per_job = train.job_device_bytes(workdir.create_model(cfg), cfg)
    monkeypatch.setattr(train, "device_memory_bytes", lambda: int(per_job * 1.5))  # one job fits
    with caplog.at_level(std_logging.WARNING):
        failures = train.train_group(planned, source, cfg.mesh)
    assert failures == {"button": None, "mesh": None}
    assert "training them in 2 chunks" in caplog.text
    for c in ("button", "mesh"):
        assert os.listdir(os.path.join(str(tmp_path), c, "checkpoints"))


BITWISE = r"""
import json, sys
import jax
import numpy as np
sys.path.insert(0, sys.argv[1] + "/benchmarks")
from throughput import Bench
from configs import stpm
from rstpm_jax import fleet, sharding, train
size, batch, n, steps = 32, 8, 3, 3
b = Bench.create(stpm.get_config(), image_size=size, batch_size=batch, dtype="float32")
rng = np.random.default_rng(2)
xs = rng.standard_normal((steps, n, batch, size, size, 3)).astype(np.float32)
like = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32),
        "valid": jax.ShapeDtypeStruct((batch,), np.float32)}
def go(mesh):
    lay = fleet.make_layout(n, batch, mesh)
    step = train.compile_group_step(b.model, b.loss_fn, lay.mesh, False, True)
    stk = jax.tree.map(lambda a: np.stack([a] * lay.slots), b.state)
    states, metrics = fleet.put_slots(stk, lay), []
    for t in range(steps):
        valid = np.ones(batch, np.float32)
        valid[-2:] = 0 if t == 1 else 1  # a padded (partial) batch too
        host = {s: {"image": xs[t, s][lo:hi], "valid": valid[lo:hi]} for s, (lo, hi) in lay.local_rows().items()
                if s < n}
        arr = fleet.put_batches(host, like, lay)
        active = np.arange(lay.slots) < n
        if t == 2:
            active[1] = False  # a waiting job too
        states, m = step(states, sharding.replicate(b.teachers, lay.mesh), arr["image"], arr["valid"],
                         fleet.put_slots(active, lay))
        metrics.append(jax.device_get(m))
    out = jax.device_get((states.params, states.batch_stats, states.opt_state, metrics))
    return [np.asarray(x)[:n] for x in jax.tree.leaves(out)]  # the jobs' slots, not the padding
one = go({"model": "1", "data": "1"})
# 3 x 1: one job per device; 2 x 1: 2 slots per device (one padding), each device's slots in turn.
equal, max_abs = {}, 0.0
for name, mesh in (("3x1", {"model": "3", "data": "1"}), ("2x1", {"model": "2", "data": "1"})):
    got = go(mesh)
    equal[name] = sum(bool(np.array_equal(x, y)) for x, y in zip(one, got))
    max_abs = max(max_abs, max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(one, got)))
print("RESULT", json.dumps({"leaves": len(one), "equal": equal, "max_abs": max_abs}))
"""


def test_one_job_per_device_is_bitwise_the_jobs_stacked_on_one(jax_cache):
    """float32, 3 jobs, 3 steps (one padded batch, one step a job waits): one job per device on
    a 3 x 1 mesh, and 2 slots per device on a 2 x 1 mesh (one padding slot), give bitwise the
    states and metrics of the 3 jobs stacked on one device. (A job's batch split over ``data``
    devices sums in another order, so only ``data=1`` layouts can be bitwise.) This is what
    makes a pod run of one job per chip reproduce a one-device run exactly."""
    out = h.run([h.sys.executable, "-c", BITWISE, h.REPO], h.env(jax_cache, devices=3), timeout=600).stdout
    result = json.loads(out.split("RESULT", 1)[1])
    assert result["equal"] == {"3x1": result["leaves"], "2x1": result["leaves"]}, result
