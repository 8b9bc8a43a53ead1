"""The RSTPM model: shapes for every config, frozen teachers, attention gates, BatchNorm, sizes."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import subprocess
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstpm_jax import losses
from rstpm_jax.models import attention, layers, resnet, rstpm, summary
from tests.conftest import MODEL_CONFIGS, REPO_ROOT, load_config

LEVELS = ("layer1", "layer2", "layer3")
STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
WIDTHS = {"resnet18": {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
          "resnet50": {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}}
# config -> (teacher1, teacher2 or None, students, attention), written from the paper's ablations.
EXPECTED = {
    "mvtec": ("resnet18", "resnet50", ("student1", "student2"), True),
    "stpm": ("resnet18", None, ("student1",), False),
    "stpm_attention": ("resnet18", None, ("student1",), True),
    "rstpm_no_attention": ("resnet18", "resnet50", ("student1", "student2"), False),
    "rstpm_r18_r18": ("resnet18", "resnet18", ("student1", "student2"), True),
    "rstpm_r50_r50": ("resnet50", "resnet50", ("student1", "student2"), True),
}
IMAGE = (2, 64, 96, 3)  # small, non-square: catches H/W mix-ups


def test_expected_table_covers_every_config():
    assert set(EXPECTED) == set(MODEL_CONFIGS)


# --- independent parameter arithmetic (torchvision layout) ----------------------------------

def conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return k * k * cin * cout + (cout if bias else 0)


def bn(c: int) -> int:
    return 2 * c  # scale + bias; running stats are not parameters


def basic(cin: int, w: int, down: bool) -> int:
    return conv(cin, w, 3) + bn(w) + conv(w, w, 3) + bn(w) + (conv(cin, w, 1) + bn(w) if down else 0)


def bottleneck(cin: int, w: int, down: bool) -> int:
    main = conv(cin, w, 1) + bn(w) + conv(w, w, 3) + bn(w) + conv(w, 4 * w, 1) + bn(4 * w)
    return main + (conv(cin, 4 * w, 1) + bn(4 * w) if down else 0)


def torchvision_params(arch: str, depth: int, fc: bool = False) -> int:
    block, expansion, sizes = {"resnet18": (basic, 1, (2, 2, 2, 2)),
                               "resnet50": (bottleneck, 4, (3, 4, 6, 3))}[arch]
    n, cin = conv(3, 64, 7) + bn(64), 64
    for i in range(depth):
        w = 64 * 2 ** i
        for j in range(sizes[i]):
            down = j == 0 and (i > 0 or cin != w * expansion)
            n += block(cin, w, down)
            cin = w * expansion
    return n + (cin * 1000 + 1000 if fc else 0)


def gates(teacher_widths, student_widths) -> int:
    return sum(conv(t, s, 3) + bn(s) + conv(s, 1, 1, bias=True) for t, s in zip(teacher_widths, student_widths))


def decoder(cin: int, widths=(256, 128, 64), targets=(1024, 512, 256)) -> int:
    n = conv(cin, 512, 3) + bn(512) + basic(512, 512, False)
    cin = 512
    for w, t in zip(widths, targets):
        n += conv(cin, w, 3) + bn(w) + 2 * basic(w, w, False) + (conv(w, t, 1, bias=True) if w != t else 0)
        cin = w
    return n


def test_torchvision_reference_counts():
    # Published torchvision totals (with fc): resnet18 11,689,512; resnet50 25,557,032.
    assert torchvision_params("resnet18", 4, fc=True) == 11_689_512
    assert torchvision_params("resnet50", 4, fc=True) == 25_557_032
    assert summary.full_resnet_parameters("resnet18") == 11_176_512
    assert summary.full_resnet_parameters("resnet50") == 23_508_032


def expected_counts(name: str) -> dict[str, int]:
    t1, t2, students, att = EXPECTED[name]
    w1, w2 = WIDTHS[t1], WIDTHS.get(t2, {})
    out = {"teacher1": torchvision_params(t1, 4 if t2 else 3), "teacher2": 0, "student2": 0,
           "student1": torchvision_params(t1, 3), "attention": 0}
    if att:
        out["attention"] += gates([w1[lvl] for lvl in LEVELS], [w1[lvl] for lvl in LEVELS])
    if t2:
        out["teacher2"] = torchvision_params(t2, 3)
        targets = tuple(w2[lvl] for lvl in reversed(LEVELS))
        out["student2"] = decoder(w1["layer4"], (256, 128, 64), targets)
        if att:
            out["attention"] += gates(targets, (256, 128, 64))
    out["trainable"] = out["student1"] + out["student2"] + out["attention"]
    out["frozen"] = out["teacher1"] + out["teacher2"]
    return out


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_count_parameters(name):
    counts = summary.count_parameters(load_config(name))
    assert counts == expected_counts(name)
    assert list(counts) == list(summary.KEYS)


def test_summary_report_and_cli():
    report = summary.parameter_report(load_config("mvtec"))
    assert report["teachers"]["teacher2"] == {"arch": "resnet50", "depth": 3, "full": 23_508_032}
    assert report["teachers"]["teacher1"]["depth"] == 4
    text = summary.format_report(report)
    assert "truncated to layer3" in text and "23,508,032" in text and "11,176,512" in text
    proc = subprocess.run(
        [sys.executable, "-m", "rstpm_jax.models.summary", "--config=configs/stpm_attention.py",
         "--config.model.attention=False", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout) == expected_counts("stpm")


# --- shapes at full size, for free ----------------------------------------------------------

@pytest.fixture(scope="module")
def abstract_model():
    """``name -> (model, abstract teacher vars, abstract student vars)``; variables do not depend on size."""
    cache: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in cache:
            model = rstpm.build_model(load_config(name).model)
            init = functools.partial(model.init, image_shape=(1, 64, 64, 3))
            cache[name] = (model, *jax.eval_shape(init, jax.random.key(0)))
        return cache[name]

    return get


def abstract_forward(model: rstpm.RSTPM, tvars, svars, image_shape: tuple[int, int, int, int]):
    def run(tvars, svars, x):
        teacher = model.teacher_features(tvars, x)
        return teacher, model.student_features(svars, x, teacher, train=False)[0]
    return jax.eval_shape(run, tvars, svars, jax.ShapeDtypeStruct(image_shape, jnp.float32))


def check_features(name: str, teacher: dict, student: dict, image_shape) -> None:
    t1, t2, students, _ = EXPECTED[name]
    b, h, w, _ = image_shape
    assert set(student) == set(students)
    assert set(teacher) == ({"teacher1", "teacher2"} if t2 else {"teacher1"})
    t1_levels = {"stem", *LEVELS, "layer4"} if t2 else {"stem", *LEVELS}
    assert set(teacher["teacher1"]) == t1_levels  # layer4 only when student 2 needs it
    for tname, arch in (("teacher1", t1), ("teacher2", t2)):
        for lvl, feat in teacher.get(tname, {}).items():
            width = 64 if lvl == "stem" else WIDTHS[arch][lvl]
            assert feat.shape == (b, h // STRIDES[lvl], w // STRIDES[lvl], width), (tname, lvl)
    for sname in students:
        arch = t1 if sname == "student1" else t2
        for lvl in LEVELS:
            want = (b, h // STRIDES[lvl], w // STRIDES[lvl], WIDTHS[arch][lvl])
            assert student[sname][lvl].shape == want, (sname, lvl)


@pytest.mark.parametrize("size", [(256, 256), (224, 320)])
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_output_shapes_full_size(abstract_model, name, size):
    image_shape = (2, *size, 3)
    teacher, student = abstract_forward(*abstract_model(name), image_shape)
    check_features(name, teacher, student, image_shape)


def test_bad_configs_and_inputs_are_rejected():
    cfg = load_config("mvtec").model
    with pytest.raises(ValueError, match="no student"):
        rstpm.build_model(_with(cfg, student1=False, student2=False))
    with pytest.raises(ValueError, match="model.teacher2"):
        rstpm.build_model(_with(cfg, teacher2=""))
    with pytest.raises(ValueError, match="resnet"):
        rstpm.build_model(_with(cfg, teacher1="resnet19"))
    with pytest.raises(ValueError, match="model.dtype"):
        rstpm.build_model(_with(cfg, dtype="float8"))
    bogus = rstpm.build_model(_with(load_config("stpm_attention").model, attention_mode="bogus"))
    with pytest.raises(ValueError, match="attention_mode"):
        jax.eval_shape(functools.partial(bogus.init, image_shape=(1, 32, 32, 3)), jax.random.key(0))
    good = rstpm.build_model(load_config("stpm").model)
    with pytest.raises(ValueError, match="divisible by 32"):
        jax.eval_shape(functools.partial(good.init, image_shape=(1, 48, 64, 3)), jax.random.key(0))


def _with(cfg, **changes):
    cfg = cfg.copy_and_resolve_references()
    for k, v in changes.items():
        cfg[k] = v
    return cfg


# --- real forward passes at a small size (one per config, shared) ---------------------------

def numpy_variables(abstract, seed: int):
    """Fill an abstract variable tree with random values: fan-out kaiming kernels, non-trivial BN."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            std = math.sqrt(2.0 / (math.prod(shape[:-2]) * shape[-1]))
            value = rng.standard_normal(shape, dtype=np.float32) * std
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name in ("bias", "mean"):
            value = rng.normal(0.0, 0.1, shape)
        else:
            raise AssertionError(f"unexpected variable {jax.tree_util.keystr(path)}")
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@dataclasses.dataclass
class Run:
    model: rstpm.RSTPM
    tvars: dict
    svars: dict
    x: jax.Array
    teacher: dict
    train_out: dict
    updates: dict
    students_fn: Callable  # (svars, x, teacher) -> (features, updates), train=True


def make_run(model: rstpm.RSTPM, abstract_t: dict, abstract_s: dict) -> Run:
    tvars, svars = numpy_variables(abstract_t, 1), numpy_variables(abstract_s, 2)
    x = jnp.asarray(np.random.default_rng(3).normal(size=IMAGE), jnp.float32)
    # Eager, not jitted: op-by-op compiles are shared between configs (same layer shapes).
    teacher = model.teacher_features(tvars, x)
    students_fn = functools.partial(model.student_features, train=True, capture_attention=True)
    train_out, updates = students_fn(svars, x, teacher)
    return Run(model, tvars, svars, x, teacher, train_out, updates, students_fn)


@pytest.fixture(scope="module")
def runs(abstract_model):
    """``name -> Run``: one real forward (batch 2, 64x96, random weights) per config, shared."""
    cache: dict[str, Run] = {}

    def get(name: str) -> Run:
        if name not in cache:
            cache[name] = make_run(*abstract_model(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_forward_pass(runs, name):
    r = runs(name)
    _, t2, students, att = EXPECTED[name]
    check_features(name, r.teacher, r.train_out, IMAGE)
    for tree in (r.teacher, r.train_out):
        for leaf in jax.tree.leaves(tree):
            assert bool(jnp.all(jnp.isfinite(leaf)))
    total, metrics = losses.paper_loss(rstpm.feature_pairs(r.teacher, r.train_out))
    assert np.isfinite(float(total)) and float(total) > 0
    assert set(k for k in metrics if "/" not in k) == {*students, "loss"}
    # Parameter layout: gates iff attention; student 2 projects only when widths differ.
    params = r.svars["params"]
    for sname in students:
        gate_names = {k for k in params[sname] if k.startswith("attention_")}
        assert gate_names == ({f"attention_{lvl}" for lvl in LEVELS} if att else set())
    if t2:
        proj = {k for k in params["student2"] if k.startswith("proj_")}
        assert proj == (set() if t2 == "resnet18" else {f"proj_{lvl}" for lvl in LEVELS})
    # Teachers are built only as deep as they are used.
    assert ("layer4_0" in r.tvars["params"]["teacher1"]) == bool(t2)
    if t2:
        assert "layer4_0" not in r.tvars["params"]["teacher2"]
    # train=True updates every BatchNorm's running statistics.
    assert set(r.updates) == ({"batch_stats", "intermediates"} if att else {"batch_stats"})
    old, new = jax.tree.leaves(r.svars["batch_stats"]), jax.tree.leaves(r.updates["batch_stats"])
    assert len(old) == len(new) > 0
    assert all(not np.allclose(a, b) for a, b in zip(old, new))


@pytest.mark.parametrize("name", [n for n in MODEL_CONFIGS if EXPECTED[n][3]])
def test_attention_maps_are_one_channel_in_unit_interval(runs, name):
    r = runs(name)
    inter = r.updates["intermediates"]
    assert set(inter) == set(EXPECTED[name][2])
    for gates_ in inter.values():
        assert set(gates_) == {f"attention_{lvl}" for lvl in LEVELS}
        for lvl in LEVELS:
            (a,) = gates_[f"attention_{lvl}"]["attention"]
            b, h, w, _ = IMAGE
            assert a.shape == (b, h // STRIDES[lvl], w // STRIDES[lvl], 1)
            # A sigmoid: in (0, 1), up to float32 saturation on these random weights.
            assert bool(jnp.all((a >= 0) & (a <= 1)))
            assert float(jnp.std(a)) > 0  # it varies over positions


def test_student2_widths_follow_teacher2(runs):
    assert [runs("mvtec").train_out["student2"][lvl].shape[-1] for lvl in reversed(LEVELS)] == [1024, 512, 256]
    assert [runs("rstpm_r18_r18").train_out["student2"][lvl].shape[-1] for lvl in reversed(LEVELS)] == [256, 128, 64]
    r50 = runs("rstpm_r50_r50")
    assert r50.teacher["teacher1"]["layer4"].shape[-1] == 2048
    assert r50.svars["params"]["student2"]["conv_in"]["kernel"].shape == (3, 3, 2048, 512)


def paper_objective(r: Run):
    """The training loss as a function of (teacher params, student params, fed/target feature offsets)."""
    def objective(tparams, sparams, feed_delta, target_delta):
        teacher = r.model.teacher_features({"params": tparams, "batch_stats": r.tvars["batch_stats"]}, r.x)
        feed = jax.tree.map(jnp.add, teacher, feed_delta)  # what the students (and gates) receive
        target = jax.tree.map(jnp.add, teacher, target_delta)  # what the loss compares with
        student, _ = r.model.student_features({"params": sparams, "batch_stats": r.svars["batch_stats"]},
                                              r.x, feed, train=True)
        return losses.paper_loss(rstpm.feature_pairs(target, student))[0]
    return objective


def test_teachers_get_exactly_zero_gradient(runs):
    r = runs("stpm_attention")  # the Teachers module is shared by every config; this one is cheap
    zeros = jax.tree.map(jnp.zeros_like, r.teacher)
    g_teacher = jax.grad(paper_objective(r))(r.tvars["params"], r.svars["params"], zeros, zeros)
    assert len(jax.tree.leaves(g_teacher)) > 0
    assert all(not bool(jnp.any(g)) for g in jax.tree.leaves(g_teacher))


def test_students_pass_no_gradient_into_teacher_features(runs):
    r = runs("rstpm_r18_r18")  # both students, with gates
    zeros = jax.tree.map(jnp.zeros_like, r.teacher)
    g_feed, g_target = jax.grad(paper_objective(r), argnums=(2, 3))(
        r.tvars["params"], r.svars["params"], zeros, zeros)
    assert all(not bool(jnp.any(g)) for g in jax.tree.leaves(g_feed))
    # Control: the same loss does depend on the teacher features, as targets.
    for tname, lvl in (("teacher1", "layer1"), ("teacher1", "layer3"), ("teacher2", "layer2")):
        assert bool(jnp.any(g_target[tname][lvl])), (tname, lvl)
    # ...and the students do read the features they are fed (forward): through the gates and,
    # for student 2, teacher 1's layer4.
    for tname, lvl, sname, out_lvl in (("teacher1", "layer2", "student1", "layer2"),
                                       ("teacher2", "layer1", "student2", "layer1"),
                                       ("teacher1", "layer4", "student2", "layer3")):
        feed = {k: dict(v) for k, v in r.teacher.items()}
        feed[tname][lvl] = feed[tname][lvl] * 1.5 + 0.3
        out, _ = r.students_fn(r.svars, r.x, feed)
        assert not np.allclose(out[sname][out_lvl], r.train_out[sname][out_lvl]), (tname, lvl)


def test_batchnorm_modes(runs):
    r = runs("stpm_attention")
    model, x = r.model, r.x
    # A batch whose first image is the same and whose second is not (same shapes: no recompiles).
    x2 = x.at[1].set(jnp.asarray(np.random.default_rng(6).normal(size=x.shape[1:]) * 2.0, x.dtype))
    t2 = model.teacher_features(r.tvars, x2)
    # Teachers are always in inference mode: an image's features do not depend on the batch,
    # and their running statistics never move.
    np.testing.assert_allclose(t2["teacher1"]["layer3"][0], r.teacher["teacher1"]["layer3"][0],
                               rtol=1e-5, atol=1e-5)
    _, tstate = model.teachers.apply(r.tvars, x, mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves(r.tvars["batch_stats"]), jax.tree.leaves(tstate["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Students, train=False: running statistics are used and left alone.
    eval1, state = model.students.apply(r.svars, x, r.teacher, False, mutable=["batch_stats"])
    for a, b in zip(jax.tree.leaves(r.svars["batch_stats"]), jax.tree.leaves(state["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eval2, _ = model.student_features(r.svars, x2, t2, train=False)
    np.testing.assert_allclose(eval2["student1"]["layer3"][0], eval1["student1"]["layer3"][0],
                               rtol=1e-5, atol=1e-5)
    # train=True: batch statistics are used (so the rest of the batch matters) and the running
    # ones move.
    train2, upd = model.student_features(r.svars, x2, t2, train=True)
    assert set(upd) == {"batch_stats"}
    assert not np.allclose(train2["student1"]["layer3"][0], r.train_out["student1"]["layer3"][0],
                           atol=1e-3)
    # Momentum 0.9 (torch's 0.1) on the stem's BatchNorm: new = 0.9 old + 0.1 batch statistic.
    y = jax.lax.conv_general_dilated(x, r.svars["params"]["student1"]["conv1"]["kernel"], (2, 2),
                                     ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    old, new = r.svars["batch_stats"]["student1"]["bn1"], r.updates["batch_stats"]["student1"]["bn1"]
    np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * jnp.mean(y, axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    # (Flax keeps the biased batch variance; torch's running_var uses the unbiased one.)
    np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * jnp.var(y, axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)


# --- the gate on its own, and the real initialiser ------------------------------------------

def test_attention_gate_rule_and_stop_gradient():
    rng = np.random.default_rng(5)
    teacher = jnp.asarray(rng.normal(size=(2, 8, 12, 16)), jnp.float32)
    student = jnp.asarray(rng.normal(size=(2, 8, 12, 8)), jnp.float32)
    gates_ = {mode: attention.AttentionGate(mode) for mode in attention.MODES}
    variables = jax.jit(gates_["mul"].init, static_argnums=3)(jax.random.key(0), teacher, student, False)
    assert variables["params"]["conv"]["kernel"].shape == (3, 3, 16, 8)
    assert variables["params"]["proj"]["kernel"].shape == (1, 1, 8, 1)
    for mode, gate in gates_.items():
        out, inter = jax.jit(lambda v, t, g=gate: g.apply(v, t, student, False, mutable=["intermediates"]))(
            variables, teacher)
        (a,) = inter["intermediates"]["attention"]
        assert a.shape == (2, 8, 12, 1) and bool(jnp.all((a > 0) & (a < 1)))
        want = student * a if mode == "mul" else student + student * a
        np.testing.assert_allclose(out, want, rtol=1e-6, err_msg=mode)

    def energy(v, t):
        return jnp.sum(gates_["mul"].apply(v, t, student, False) ** 2)

    e0, (g_params, g_teacher) = jax.jit(jax.value_and_grad(energy, argnums=(0, 1)))(variables, teacher)
    assert not bool(jnp.any(g_teacher))  # stop-gradient on the teacher input...
    assert float(energy(variables, teacher * 2.0 + 1.0)) != pytest.approx(float(e0))  # ...which is read
    assert all(bool(jnp.any(leaf)) for leaf in jax.tree.leaves(g_params["params"]))  # the gate learns
    with pytest.raises(ValueError, match="one size"):
        gates_["mul"].apply(variables, teacher[:, :4], student, False)


def test_initialisers_follow_torchvision():
    """Kaiming-normal (fan_out, ReLU gain) convolutions; BatchNorm scale 1, bias 0, stats 0 / 1."""
    block = resnet.BasicBlock(256, conv=resnet.torch_conv(nn.Conv, jnp.float32),
                              norm=functools.partial(layers.BatchNorm, use_running_average=True))
    variables = block.init(jax.random.key(0), jnp.zeros((1, 4, 4, 256)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        name = path[-1].key
        if name in ("scale", "var"):
            np.testing.assert_array_equal(leaf, 1.0)
        elif name in ("bias", "mean"):
            np.testing.assert_array_equal(leaf, 0.0)
    kernel = np.asarray(variables["params"]["conv2"]["kernel"])  # 3x3, 256 -> 256
    np.testing.assert_allclose(kernel.std(), math.sqrt(2.0 / (9 * 256)), rtol=0.02)
    assert abs(kernel.mean()) < 1e-3


def test_attention_gate_starts_unsaturated():
    """The sigmoid's logit conv uses torch's default (fan-in) init, so gates start near 0.5, not at 0/1."""
    rng = np.random.default_rng(7)
    teacher = jnp.asarray(rng.normal(size=(2, 8, 8, 256)), jnp.float32)
    student = jnp.ones((2, 8, 8, 256), jnp.float32)
    gate = attention.AttentionGate("mul")
    variables = gate.init(jax.random.key(1), teacher, student, False)
    _, inter = gate.apply(variables, teacher, student, False, mutable=["intermediates"])
    (a,) = inter["intermediates"]["attention"]
    inside = float(jnp.mean((a > 0.05) & (a < 0.95)))
    assert inside > 0.9, inside
