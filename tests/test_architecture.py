"""The package's shape: imports run one way (no cycle, even through imports inside functions),
model code free of CPU plumbing, and the CPU layers interchangeable with flax's own."""

from __future__ import annotations

import ast
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO_ROOT, load_config

PACKAGE = os.path.join(REPO_ROOT, "rstpm_jax")

# Layers, lowest first: a module may import only from its own layer or lower ones.
LAYERS = [
    {"levels", "registry", "defaults", "ablations", "paper_results", "guards", "data.mvtec", "data.preprocess",
     "ops.compile_options", "ops.conv", "ops.pool", "ops.batch_norm", "jobs", "data.tiling",
     "deploy.openvino_core", "deploy.runtime", "deploy.quantize", "deploy.mixed_precision"},
    {"distances", "losses", "anomaly_maps", "metrics", "sharding", "figures", "reports",
     "models.layers", "models.resnet", "models.pretrained", "models.attention", "models.students",
     "models.rstpm", "ops.layers", "data.synthetic", "data.tfds_mvtec", "data.input_pipeline", "data.sources",
     "config_checks"},
    {"checkpoints", "state", "teacher_cache", "metric_log", "inference", "workdir", "fleet",
     "deploy.onnx_export", "deploy.artifact"},
    {"train", "evaluate"},
    {"artifacts", "run"},
    {"main", "sweep", "predict", "export", "models.summary"},
]


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
    if rel == "__init__":
        return ""  # the package itself
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    """``module -> rstpm_jax modules it imports`` from every import statement, at any depth."""
    modules = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                modules[_module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rstpm_jax"):
                base = node.module[len("rstpm_jax."):] if node.module != "rstpm_jax" else ""
                for alias in node.names:
                    full = f"{base}.{alias.name}".lstrip(".")
                    deps.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name[len("rstpm_jax."):] for a in node.names if a.name.startswith("rstpm_jax.")}
        graph[name] = {d for d in deps if d in modules and d not in (name, "")}
    return graph


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_imports_run_one_way():
    rank = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    graph = import_graph()
    packages = {m for m in graph if m in ("data", "models", "ops", "deploy")}
    unplaced = sorted(set(graph) - set(rank) - packages - {""})
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"
    upward = [(m, d) for m, deps in graph.items() if m in rank for d in deps
              if d in rank and rank[d] > rank[m]]
    assert not upward, f"imports from a higher layer: {upward}"


def test_model_code_has_no_cpu_plumbing():
    models = os.path.join(PACKAGE, "models")
    for f in sorted(os.listdir(models)):
        if f.endswith(".py"):
            assert "conv_fn" not in open(os.path.join(models, f)).read(), f
    # build_model (models.rstpm) alone picks the CPU layers.
    graph = import_graph()
    for module, deps in graph.items():
        if module.startswith("models.") and module != "models.rstpm":
            assert not [d for d in deps if d.startswith("ops")], (module, deps)
    assert "ops.layers" in graph["models.rstpm"]


def _student_grads(model, tvars, svars, x):
    def loss(params):
        teacher = model.teacher_features(tvars, x)
        feats, _ = model.student_features({"params": params, "batch_stats": svars["batch_stats"]},
                                          x, teacher, train=True)
        return sum(jnp.mean(jnp.square(v)) for s in feats.values() for v in s.values())
    return jax.jit(jax.grad(loss))(svars["params"])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU layers are used on CPU only")
def test_cpu_layers_have_flax_layers_variables_and_numbers():
    from rstpm_jax.models.rstpm import build_model
    from rstpm_jax.ops import layers as cpu_layers

    cfg = load_config("rstpm_r18_r18").model  # both students, gates, a transposed conv
    fast, plain = build_model(cfg), build_model(cfg, fast_cpu_ops=False)
    assert fast.students.conv is cpu_layers.Conv and fast.students.norm is cpu_layers.BatchNorm
    assert plain.students.conv is nn.Conv and plain.students.conv_transpose is nn.ConvTranspose
    off = cfg.copy_and_resolve_references()
    off.fast_cpu_ops = False
    assert build_model(off).students.conv is nn.Conv
    shape = (2, 64, 64, 3)
    tv_f, sv_f = fast.init(jax.random.key(0), shape)
    tv_p, sv_p = plain.init(jax.random.key(0), shape)
    for a, b in zip(jax.tree_util.tree_leaves_with_path((tv_f, sv_f)),
                    jax.tree_util.tree_leaves_with_path((tv_p, sv_p))):
        assert a[0] == b[0], (a[0], b[0])  # same variable names
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))  # same initial values
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
    outs = []
    for model in (fast, plain):
        teacher = model.teacher_features(tv_f, x)
        outs.append(model.student_features(sv_f, x, teacher, train=False)[0])
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    g_f, g_p = _student_grads(fast, tv_f, sv_f, x), _student_grads(plain, tv_f, sv_f, x)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_f), jax.tree.leaves(g_p)):
        scale = float(np.max(np.abs(np.asarray(b)))) + 1e-12
        assert float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) <= 1e-4 * scale, jax.tree_util.keystr(path)
