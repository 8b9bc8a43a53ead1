"""ONNX export (rstpm_jax.deploy.onnx_export): the export-time forms equal the model's own ops,
and the exported graph run by ONNX Runtime and OpenVINO gives JAX's maps and scores.

The JAX reference is the model as ``predict`` runs it (``build_model``: the project's CPU
convolution, pool and BatchNorm layers, ``jax.image.resize``), not the export-time forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from rstpm_jax import anomaly_maps
from rstpm_jax.deploy import onnx_export as ox
from rstpm_jax.ops import pool


@pytest.mark.parametrize("n_in,n_out", [(8, 32), (16, 64), (7, 20), (32, 8), (5, 5)])
def test_bilinear_matrix_is_jax_resize(n_in, n_out):
    maps = np.random.default_rng(0).standard_normal((2, n_in, n_in + 3)).astype(np.float32)
    want = jax.image.resize(maps, (2, n_out, n_out + 1), "bilinear", antialias=False)
    got = ox.resize_matmul(jnp.asarray(maps), (n_out, n_out + 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 rounding


@pytest.mark.parametrize("sigma", [0.5, 1.0, 4.0])
def test_gaussian_matrix_is_gaussian_smooth(sigma):
    maps = np.random.default_rng(1).uniform(0, 1, (2, 40, 36)).astype(np.float32)
    np.testing.assert_allclose(ox.gaussian_smooth_matmul(jnp.asarray(maps), sigma),
                               anomaly_maps.gaussian_smooth(jnp.asarray(maps), sigma), rtol=1e-5, atol=1e-6)


def test_max_pool_padded_is_pool_max_pool():
    x = np.random.default_rng(2).standard_normal((2, 16, 12, 5)).astype(np.float32)
    np.testing.assert_array_equal(ox.max_pool_padded(jnp.asarray(x)), pool.max_pool(jnp.asarray(x)))


def test_squared_l2_channel_sums_is_the_distance():
    """Including positions where a feature vector is zero (ReLU) and near-equal pairs (small d)."""
    from rstpm_jax import distances

    rng = np.random.default_rng(4)
    t = np.maximum(rng.standard_normal((2, 6, 5, 64)), 0).astype(np.float32)
    s = np.maximum(rng.standard_normal(t.shape), 0).astype(np.float32)
    t[0, 0, 0] = 0
    s[0, 0, 1] = 0
    t[1, 2, 2] = s[1, 2, 2] = 0
    near = (t * (1 + 0.01 * rng.standard_normal(t.shape))).astype(np.float32)
    for a, b in ((t, s), (t, near), (s, s)):
        got = ox.squared_l2_channel_sums(jnp.asarray(a), jnp.asarray(b))
        np.testing.assert_allclose(got, distances.distance_map(a, b), rtol=0, atol=3e-7)
    spec = anomaly_maps.MapSpec.from_config(ml_collections.ConfigDict(
        {"distance": "squared_l2", "fusion": "multiply", "smoothing_sigma": 0.0}))
    exported = ox.export_spec(spec).distance
    assert exported.fn is ox.squared_l2_channel_sums and exported.name == "squared_l2"


def test_fold_pad_into_max_pool_keeps_values():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    neg = numpy_helper.from_array(np.array(-np.inf, np.float32), "neg")
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads", "neg"], ["p"]),
         helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3, 3], strides=[2, 2])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [pads, neg])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = -np.abs(np.random.default_rng(3).standard_normal((1, 2, 8, 8))).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(  # noqa: E731
        None, {"x": x})[0]
    before = run(model)
    assert ox.fold_pad_into_max_pool(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MaxPool"]
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(run(model), before)


def _perturbed(tree, rng):
    """Variables with non-trivial BatchNorm statistics (so a wrong fold would show)."""
    def f(path, v):
        key, v = jax.tree_util.keystr(path), np.asarray(v)
        if "'mean'" in key or "'bias'" in key:
            return (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        if "'var'" in key or "'scale'" in key:
            return rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        return v
    return jax.tree_util.tree_map_with_path(f, jax.device_get(tree))


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def test_export_model_has_the_trained_models_variables(get_config):
    import flax.linen as nn

    from rstpm_jax.models.rstpm import build_model

    cfg = get_config("rstpm_r18_r18").model
    cfg.dtype = "bfloat16"
    exported, trained = ox.export_model(cfg), build_model(cfg)
    assert exported.students.norm is nn.BatchNorm and exported.teachers.pool is ox.max_pool_padded
    assert exported.students.dtype == jnp.float32  # ONNX Runtime's CPU convs have no bfloat16
    shapes = lambda m: jax.tree_util.tree_map(jnp.shape, jax.eval_shape(  # noqa: E731
        lambda k: m.init(k, (1, 32, 32, 3)), jax.random.key(0)))
    assert shapes(exported) == shapes(trained)


def _geometric_mean(maps, eps=1e-12):
    """A fusion rule in plain jnp (not one of the package's): exp(mean log) over every map."""
    flat = [m for levels in maps.values() for m in levels.values()]
    return jnp.exp(sum(jnp.log(m + eps) for m in flat) / len(flat))


@pytest.mark.parametrize("name,fusion,sigma", [("rstpm_r18_r18", "test_geometric_mean", 2.0)])
def test_onnx_round_trip_equals_jax(tmp_path, get_config, name, fusion, sigma):
    """Both students, gates, transposed convs, smoothing and a user-registered fusion rule."""
    pytest.importorskip("jax2onnx")
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rstpm_jax.anomaly_maps import FUSIONS, MapSpec, register_fusion
    from rstpm_jax.deploy import runtime
    from rstpm_jax.inference import make_infer_fn
    from rstpm_jax.models.rstpm import build_model

    if fusion not in FUSIONS:
        register_fusion(fusion)(_geometric_mean)
    size = 32
    config = get_config(name)
    config.model.random_teachers = True
    config.maps.fusion = fusion
    config.maps.smoothing_sigma = sigma
    rng = np.random.default_rng(0)
    model = build_model(config.model)  # the project's own CPU layers: the reference
    tv, sv = jax.jit(lambda k: model.init(k, (1, size, size, 3)))(jax.random.key(0))
    tv, sv = _perturbed(tv, rng), _perturbed(sv, rng)
    spec = MapSpec.from_config(config.maps)
    path = str(tmp_path / "model.onnx")
    ox.export_trained(config.model, spec, tv, sv, (size, size), path)

    graph = onnx.load(path)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert [(v.name, dims(v)) for v in graph.graph.input] == [("images", ["batch", size, size, 3])]
    assert [(v.name, dims(v)) for v in graph.graph.output] == [
        ("map", ["batch", size, size]), ("score", ["batch"])]
    assert {n.domain for n in graph.graph.node} == {""}  # standard ONNX operators only
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops and "Pad" not in ops  # folded into Conv / MaxPool
    assert "ConvTranspose" in ops and "Log" in ops and "Exp" in ops  # the decoder; the user's rule
    assert "ReduceL2" not in ops and "ReduceSumSquare" not in ops  # the distance as channel-sum convs
    producer = {o: n for n in graph.graph.node for o in n.output}
    for conv in (n for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose")):
        src = producer.get(conv.input[0])  # NCHW from the input's transpose on: none in between
        assert src is None or src.op_type != "Transpose" or src.input[0] == "images"

    infer = jax.jit(make_infer_fn(model, spec, with_levels=False))
    x = rng.standard_normal((3, size, size, 3)).astype(np.float32)
    want = jax.device_get(infer(tv, sv, x))
    runners = {"onnxruntime": runtime.OnnxRuntimeModel(path, {})}
    if runtime.installed("openvino"):
        runners["openvino"] = runtime.OpenVINOModel(path, "f32", {})
    for backend, run in runners.items():
        for batch in (x, x[:1]):  # dynamic batch
            got = run(batch)
            ref = {k: want[k][:len(batch)] for k in ("map", "score")}
            assert got["map"].shape == ref["map"].shape and got["score"].shape == ref["score"].shape
            assert _rel(got["map"], ref["map"]) < 1e-4, backend
            assert _rel(got["score"], ref["score"]) < 1e-4, backend


def test_openvino_bf16_keeps_the_distance_in_float32(tmp_path, get_config):
    """Under the bf16 hint the channel sums and every op after them run in float32 (marked with
    OpenVINO's DisablePrecisionConversion through an IR round trip); the features' convolutions
    stay bfloat16, and ``float32_distance=False`` leaves the distance to bfloat16."""
    pytest.importorskip("jax2onnx")
    pytest.importorskip("openvino")
    from rstpm_jax.anomaly_maps import MapSpec
    from rstpm_jax.deploy import mixed_precision, openvino_core, quantize, runtime
    from rstpm_jax.models.rstpm import build_model

    size = 32
    config = get_config("stpm")
    config.model.random_teachers = True
    model = build_model(config.model)
    tv, sv = jax.device_get(jax.jit(lambda k: model.init(k, (1, size, size, 3)))(jax.random.key(0)))
    path = str(tmp_path / "model.onnx")
    ox.export_trained(config.model, MapSpec.from_config(config.maps), tv, sv, (size, size), path)

    graph = openvino_core.core().read_model(path)
    sums = set(quantize.channel_sum_convolutions(graph))
    scope = set(mixed_precision.distance_scope(graph))
    assert len(sums) == 9 and sums < scope
    convs = {op.get_friendly_name() for op in graph.get_ordered_ops() if op.get_type_name() == "Convolution"}
    assert scope & convs == sums  # no feature convolution in float32
    producers = {r.input_value(0).get_node().get_friendly_name() for r in graph.get_results()}
    assert producers <= scope  # ... to the outputs

    marked = mixed_precision.keep_float32(graph, sorted(scope))
    keyed = {op.get_friendly_name() for op in marked.get_ordered_ops()
             if mixed_precision.RT_INFO_KEY in op.get_rt_info()}
    assert keyed == scope
    with pytest.raises(ValueError, match="no layer named"):
        mixed_precision.keep_float32(graph, ["not_a_layer"])

    x = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    ref = runtime.OpenVINOModel(path, "f32", {})(x)
    precisions = {}
    for keep in (True, False):
        m = runtime.OpenVINOModel(path, "bf16", {}, float32_distance=keep)
        assert m.float32_ops == (len(scope) if keep else 0)
        got = m(x)
        assert _rel(got["map"], ref["map"]) < 0.1 and _rel(got["score"], ref["score"]) < 0.1
        infos = [op.get_rt_info() for op in m.compiled.get_runtime_model().get_ordered_ops()]
        precisions[keep] = {rt["runtimePrecision"].astype(str) for rt in infos
                            if set(rt["originalLayersNames"].astype(str).split(",")) & sums}
    if not runtime.bf16_capable():
        pytest.skip("no native bfloat16 on this CPU: OpenVINO runs the bf16 hint in float32")
    assert precisions == {True: {"f32"}, False: {"bf16"}}
