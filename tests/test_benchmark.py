"""benchmarks/: throughput.py (one job, and ``--models 2`` stacked) and gpu_check.py run at a
tiny size (that they run, not how fast), their FLOP counts agree with an analytic count, the
stacked record trains twice the images per step on twice the states, and the PyTorch STFPM
reference computes what configs/stpm.py's training step computes (same weights -> same loss,
update and anomaly map)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from tests import _train_helpers as th

SIZE, BATCH = 32, 2
DEVICES = 2  # simulated CPU devices of the throughput run: two stacked jobs get one each
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))
REQUIRED = ("model", "dtype", "image_size", "batch_size", "train_images_per_s", "infer_images_per_s",
            "flops_per_image", "peak_memory_bytes")
POSITIVE = ("train_images_per_s", "train_cached_images_per_s", "infer_images_per_s",
            "infer_batch1_images_per_s", "teacher_images_per_s", "flops_per_image",
            "train_cached_flops_per_image", "infer_flops_per_image", "peak_memory_bytes",
            "compile_time_s", "epoch_time_s", "epoch_time_cached_s", "pipeline_images_per_s")
MODELS_POSITIVE = ("train_images_per_s_total", "train_images_per_s_per_model", "train_step_s",
                   "speedup_vs_one_model", "train_cached_images_per_s_total", "cached_speedup_vs_one_model",
                   "state_bytes_per_device", "teacher_bytes_per_device", "feature_bytes_per_device",
                   "train_step_xla_temp_bytes", "peak_memory_bytes", "flops_per_image")


def resnet18_layer3_flops(size: int) -> float:
    """Forward FLOPs (2 per multiply-add) of ResNet18's convolutions up to layer3, counting only
    the taps inside the image (XLA's cost analysis leaves out multiplications with padding)."""
    total = 0

    def conv(n: int, k: int, s: int, p: int, cin: int, cout: int) -> int:
        nonlocal total
        out = (n + 2 * p - k) // s + 1
        taps = sum(1 for o in range(out) for j in range(k) if 0 <= o * s - p + j < n)
        total += taps * taps * cin * cout
        return out

    n = conv(size, 7, 2, 3, 3, 64)
    n = (n + 2 - 3) // 2 + 1  # max pool 3x3/2
    for _ in range(4):
        conv(n, 3, 1, 1, 64, 64)
    for cin, cout in ((64, 128), (128, 256)):
        m = conv(n, 3, 2, 1, cin, cout)
        conv(n, 1, 2, 0, cin, cout)
        for _ in range(3):
            conv(m, 3, 1, 1, cout, cout)
        n = m
    return 2.0 * total


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> str:
    """A persistent compilation cache shared by this module's subprocesses."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def throughput_records(tmp_path_factory, jax_cache) -> list[dict]:
    """One job's record, then the record of two stacked jobs (``--models=2``), on 2 devices."""
    out = tmp_path_factory.mktemp("throughput") / "records.json"
    cmd = [sys.executable, os.path.join(th.REPO, "benchmarks", "throughput.py"),
           f"--config={th.REPO}/configs/stpm.py", f"--image_size={SIZE}", f"--batch_size={BATCH}",
           "--steps=2", "--pipeline_images=4", "--models=2", f"--out={out}"]  # --torch: left out for time
    th.run(cmd, th.env(jax_cache, devices=DEVICES), timeout=900)
    with open(out) as f:
        return json.load(f)


def test_throughput_records(throughput_records):
    rec, _ = throughput_records
    assert (rec["model"], rec["dtype"], rec["image_size"], rec["batch_size"]) == ("stpm", "float32", SIZE, BATCH)
    assert rec["num_devices"] == DEVICES
    for key in REQUIRED + POSITIVE:
        assert key in rec, key
        if key in POSITIVE:
            assert isinstance(rec[key], (int, float)) and math.isfinite(rec[key]) and rec[key] > 0, (key, rec[key])
    # One job: one device of its own (the default layout), every step trained its batch.
    assert (rec["models"], rec["mesh_model"], rec["mesh_data"], rec["slots"]) == (1, 1, 1, 1)
    assert rec["images_per_step"] == rec["train_cached_images_per_step"] == BATCH
    # Reusing the teachers' features cannot make a step slower in FLOPs, and the epoch follows.
    assert rec["train_cached_flops_per_image"] < rec["flops_per_image"]
    assert rec["epoch_time_s"] == pytest.approx((250 // BATCH) * BATCH / rec["train_images_per_s"])


def test_models_record(throughput_records, get_config):
    """``--models=2``: two stacked jobs, one per device, each training its whole batch every
    step (read from the slots' step counters): twice one job's images per step."""
    import jax

    from rstpm_jax import train, workdir

    one, two = throughput_records
    assert two["record"] == "models" and (two["model"], two["dtype"]) == ("stpm", "float32")
    for key in MODELS_POSITIVE:
        assert isinstance(two[key], (int, float)) and math.isfinite(two[key]) and two[key] > 0, (key, two[key])
    assert (two["models"], two["mesh_model"], two["mesh_data"], two["slots"]) == (2, 2, 1, 2)
    assert two["images_per_step"] == two["train_cached_images_per_step"] == 2 * BATCH == 2 * one["images_per_step"]
    assert two["train_images_per_s_total"] == pytest.approx(2 * BATCH / two["train_step_s"])
    assert two["train_images_per_s_per_model"] == pytest.approx(two["train_images_per_s_total"] / 2)
    assert two["speedup_vs_one_model"] == pytest.approx(two["train_images_per_s_total"] / one["train_images_per_s"])
    assert two["cached_speedup_vs_one_model"] == pytest.approx(
        two["train_cached_images_per_s_total"] / one["train_cached_images_per_s"])
    # What a device holds: one job's train state (params, momentum, BatchNorm statistics, step
    # counter) each, as the state's shapes say; the teachers replicated.
    config = get_config("stpm")
    model = workdir.create_model(config)
    state, teachers = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), config, model, SIZE))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    assert one["state_bytes_per_device"] == two["state_bytes_per_device"] == nbytes(state)
    assert one["teacher_bytes_per_device"] == two["teacher_bytes_per_device"] == nbytes(teachers)
    assert two["flops_per_image"] == one["flops_per_image"]


def test_flops_match_analytic_count(throughput_records):
    """Teacher + student forward for inference; forward, input and weight gradient on top for
    training. A loop counted once (the CPU weight-gradient op's scan) would fall below."""
    rec = throughput_records[0]
    net = resnet18_layer3_flops(SIZE)
    assert 2.0 * net <= rec["infer_flops_per_image"] <= 2.3 * net
    assert 3.6 * net <= rec["flops_per_image"] <= 4.6 * net
    assert 2.6 * net <= rec["train_cached_flops_per_image"] <= 3.6 * net


def test_gpu_check_runs_on_cpu(tmp_path, jax_cache):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, os.path.join(th.REPO, "benchmarks", "gpu_check.py"), "--configs=stpm",
           "--dtypes=float32", f"--image_size={SIZE}", f"--batch_size={BATCH}", "--steps=2",
           f"--parity_batch_size={BATCH}", "--models=1,2", "--nopipeline", "--notorch", f"--out={out}"]
    th.run(cmd, th.env(jax_cache), timeout=900)
    with open(out) as f:
        report = json.load(f)
    assert report["errors"] == [] and report["skipped"] == []
    assert report["env"]["backend"] == "cpu"
    assert set(report["parts_s"]) == {"env", "throughput stpm float32", "models stpm float32 x2", "parity stpm"}
    (rec,) = report["throughput"]
    assert all(rec[k] is not None and rec[k] > 0 for k in REQUIRED if k not in ("model", "dtype"))
    (two,) = report["models"]  # one device: both jobs stacked on it
    assert (two["models"], two["slots"], two["images_per_step"]) == (2, 2, 2 * BATCH)
    assert two["state_bytes_per_device"] == 2 * rec["state_bytes_per_device"]
    assert "train_cached_images_per_s_total" not in two  # gpu_check times the whole step only by default
    (par,) = report["parity"]
    assert math.isfinite(par["cpu_loss"]) and par["cpu_loss"] > 0
    assert par["default"]["step_applied"]
    # CPU against itself: the comparison machinery must see no difference.
    for key, value in par["default"].items():
        if key.endswith("rel_diff"):
            assert value == 0.0, key


# ----------------------------------------------------------------------------- PyTorch reference

@pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch / torchvision not installed")
def test_torch_reference_matches_jax_stpm(get_config):
    import jax
    import torch

    sys.path.insert(0, os.path.join(th.REPO, "benchmarks"))
    import torch_stfpm

    from pretrained_conversion import convert_torchvision as ct
    from rstpm_jax import fleet, inference, losses, sharding, train, workdir
    from rstpm_jax import state as state_lib
    from rstpm_jax.anomaly_maps import MapSpec
    from rstpm_jax.ops import compile_options  # the options inference runs with

    torch.manual_seed(0)
    ref = torch_stfpm.STFPM()
    full = ref.teacher.state_dict()
    t_vars = ct.convert_state_dict(full, "resnet18")
    s_sd = {**full, **ref.student.state_dict()}  # layer4/fc are not in the student: unused fillers
    s_vars = ct.convert_state_dict({k: v for k, v in s_sd.items() if k in full}, "resnet18")

    config = get_config("stpm")
    model = workdir.create_model(config)
    drop = lambda tree: {k: v for k, v in tree.items() if not k.startswith("layer4")}  # noqa: E731
    teacher_vars = {c: {"teacher1": drop(t_vars[c])} for c in ("params", "batch_stats")}
    params = {"student1": drop(s_vars["params"])}
    stats = {"student1": drop(s_vars["batch_stats"])}
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), (1, 64, 64, 3)))
    assert jax.tree.map(np.shape, (teacher_vars, {"params": params, "batch_stats": stats})) == \
        jax.tree.map(lambda a: a.shape, shapes)
    state = state_lib.TrainState.create(apply_fn=None, params=params, batch_stats=stats,
                                        tx=state_lib.make_optimizer(config.train))

    x = np.random.default_rng(0).standard_normal((BATCH, 3, 64, 64)).astype(np.float32)
    x_nhwc = x.transpose(0, 2, 3, 1)
    # Inference first (both students still hold their initial running statistics).
    t_map, t_score = torch_stfpm.infer(ref, torch.from_numpy(x))
    out = compile_options.jit(inference.make_infer_fn(model, MapSpec.from_config(config.maps), with_levels=False))(
        teacher_vars, {"params": params, "batch_stats": stats}, x_nhwc)
    np.testing.assert_allclose(np.asarray(out["map"]), t_map.numpy(), rtol=2e-3, atol=1e-9)
    np.testing.assert_allclose(np.asarray(out["score"]), t_score.numpy(), rtol=2e-3)

    opt = torch_stfpm.make_optimizer(ref)
    t_loss = float(torch_stfpm.train_step(ref, opt, torch.from_numpy(x)))
    # The training loop's step: one job (slot) on one device.
    layout = fleet.Layout(sharding.make_job_mesh(1, 1), 1, BATCH)
    like = {"image": jax.ShapeDtypeStruct(x_nhwc.shape, np.float32),
            "valid": jax.ShapeDtypeStruct((BATCH,), np.float32)}
    batch = fleet.put_batches({0: {"image": x_nhwc, "valid": np.ones(BATCH, np.float32)}}, like, layout)
    step = train.compile_group_step(model, losses.from_config(config.loss, config.maps), layout.mesh, False, True)
    states, metrics = step(fleet.put_slots(fleet.stack([state]), layout), sharding.replicate(teacher_vars, layout.mesh),
                           batch["image"], batch["valid"], fleet.put_slots(np.ones(1, bool), layout))
    new_state = fleet.host_copy(fleet.take(states, 0, layout))
    assert int(new_state.step) == 1
    assert float(metrics["loss"][0]) == pytest.approx(t_loss, rel=1e-4)
    t_new = ct.convert_state_dict({k: v for k, v in {**full, **ref.student.state_dict()}.items()
                                   if k in full}, "resnet18")["params"]
    for path, new in jax.tree_util.tree_leaves_with_path(new_state.params["student1"]):
        old = _get(params["student1"], path)
        want = _get(t_new, path) - old
        got = np.asarray(new) - old
        assert np.max(np.abs(got - want)) <= 2e-3 * np.max(np.abs(want)) + 1e-7, jax.tree_util.keystr(path)


def _get(tree, path):
    for p in path:
        tree = tree[p.key]
    return np.asarray(tree)
