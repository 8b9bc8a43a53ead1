"""The whole inference function (teachers, students, maps, fusion, score) as one ONNX graph.

    proto = onnx_export.export_trained(config.model, MapSpec.from_config(config.maps),
                                       teacher_vars, student_vars, (H, W), "model.onnx")

The graph maps ``images: float32[batch, H, W, 3]`` (NHWC, normalised; ``batch`` dynamic) to
``map: float32[batch, H, W]`` and ``score: float32[batch]``, with every weight inside the file.
Thresholds, normalisation and preprocessing belong in the JSON sidecar, not in the graph.

The converter is ``jax2onnx`` (0.17.1; it declares ``orbax-checkpoint<0.11.37``, which this
project's ``>=0.12.8`` rules out, so pip cannot resolve both: install it with ``--no-deps``
after the ``export`` extra, which holds what it imports). It traces the function with a
symbolic batch and lowers each primitive. A few of the model's ops do not survive that as
written, so the export builds the model differently (:func:`export_model`: flax's own
layers, with these as the modules' layer fields) and makes its maps with numerically equal
forms (:func:`export_spec`), the function itself being the project's ``make_infer_fn``:

* ``norm``: the project's BatchNorm (``models.layers.BatchNorm``, a plain normalize in eval
  mode) traces as Sub/Mul/Add chains with constant broadcasts; ``flax.linen.BatchNorm``
  (same variables, epsilon) is lowered to ONNX ``BatchNormalization``, which is then folded
  into the convolutions.
* ``pool``: ``lax.reduce_window(max)`` is lowered to a rank-6 ``MaxPool`` (window over all
  four axes) that ONNX Runtime refuses ("Unsupported pooling size"); and jax2onnx's
  ``nn.max_pool`` plugin takes keyword arguments only and silently reads explicit padding
  pairs as ``VALID`` (wrong output size). :func:`max_pool_padded`: an explicit ``-inf`` pad,
  then ``nn.max_pool(padding="VALID")`` by keyword, lowered to NCHW ``MaxPool``;
  :func:`fold_pad_into_max_pool` moves the pad back into MaxPool's ``pads``.
* the maps' bilinear ``jax.image.resize``: jax2onnx's resize plugin needs a static batch.
  :func:`resize_matmul`: two matmuls with fixed interpolation matrices (half-pixel centres,
  no antialias: exactly jax's weights).
* the Gaussian smoothing (``maps.smoothing_sigma > 0``): ``jnp.convolve`` under ``vmap`` with a
  reflect pad converts, but as ~150 nodes of shape arithmetic and a kernel computed at run
  time; :func:`gaussian_smooth_matmul`: a fixed (H, H) band matrix that includes the
  reflection, applied per axis.

* the built-in ``squared_l2`` distance converts as written, but ONNX Runtime then moves every
  feature tensor out of its convolutions' blocked layout (twice, for ``ReduceL2`` and the
  broadcast ``Div``) to normalise it. :func:`squared_l2_channel_sums`:
  the same distance from three channel sums as 1x1 convolutions of ones, which stay in that
  layout (the int8 quantisation keeps them float32: ``quantize.channel_sum_convolutions``).

Other distances and the fusion rule are the registered functions themselves: any rule
written in plain ``jnp`` exports. flax's ``nn.Conv`` and ``nn.ConvTranspose`` convert as they are.
jax2onnx 0.17 leaves stale NHWC shapes in ``value_info`` on tensors it moved to NCHW (ONNX
Runtime then rejects an ``Add`` of the decoder); they are dropped and inferred again. Then
:func:`optimize_graph` (ONNX Runtime's basic level, offline) removes the NHWC<->NCHW
transposes jax2onnx puts around every conv and folds BatchNorm into the convs, so OpenVINO
(which keeps such transposes) gets the same plain NCHW graph a PyTorch export would give.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rstpm_jax import distances
from rstpm_jax.anomaly_maps import MapSpec
from rstpm_jax.inference import make_infer_fn
from rstpm_jax.models.rstpm import RSTPM, build_model
from rstpm_jax.registry import Bound

Array = jax.Array
INPUT_NAME = "images"
OUTPUT_NAMES = ("map", "score")
DEFAULT_OPSET = 17  # ONNX Runtime >= 1.12 and OpenVINO >= 2022.3 read it; BatchNormalization-15


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 ``R`` with ``R @ v`` = ``jax.image.resize(v, (n_out,), "bilinear",
    antialias=False)``: half-pixel centres (torch ``align_corners=False``), edge-clamped."""
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    w = np.maximum(0.0, 1.0 - np.abs(x[:, None] - np.arange(n_in, dtype=np.float64)[None, :]))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def resize_matmul(maps: Array, size: tuple[int, int]) -> Array:
    """``anomaly_maps.resize`` of (B, h, w) maps as ``R_h @ m @ R_w^T`` (two MatMuls in ONNX)."""
    h, w = maps.shape[1:]
    rh, rw = bilinear_matrix(h, int(size[0])), bilinear_matrix(w, int(size[1]))
    return jnp.matmul(jnp.matmul(rh, maps), rw.T)


def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float32 ``G`` with ``G @ v`` = ``anomaly_maps.gaussian_smooth``'s blur along one axis
    (kernel radius ``max(1, int(4 sigma + 0.5))``, ``jnp.pad`` ``reflect`` edges)."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32).astype(np.float64)  # the float32 taps jax uses
    if radius >= n:
        raise ValueError(f"Gaussian radius {radius} needs maps larger than {n} pixels (reflect pad).")
    g = np.zeros((n, n), np.float64)
    for i in range(n):
        for t, kt in zip(range(i - radius, i + radius + 1), k):
            j = -t if t < 0 else (2 * (n - 1) - t if t >= n else t)  # reflect, border not repeated
            g[i, j] += kt
    return g.astype(np.float32)


def gaussian_smooth_matmul(maps: Array, sigma: float) -> Array:
    """``anomaly_maps.gaussian_smooth`` of (B, H, W) maps as ``G_h @ m @ G_w^T``."""
    if sigma <= 0:
        return maps
    gh, gw = gaussian_matrix(maps.shape[1], sigma), gaussian_matrix(maps.shape[2], sigma)
    return jnp.matmul(jnp.matmul(gh, maps), gw.T)


def max_pool_padded(x: Array, window: Sequence[int] = (3, 3), strides: Sequence[int] = (2, 2),
                    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1))) -> Array:
    """``ops.pool.max_pool`` (NHWC, explicit padding with -inf) as a pad + VALID ``nn.max_pool``."""
    pads = ((0, 0), *((int(lo), int(hi)) for lo, hi in padding), (0, 0))
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    return nn.max_pool(xp, window_shape=tuple(int(k) for k in window),
                       strides=tuple(int(s) for s in strides), padding="VALID")


def export_model(model_cfg: Any) -> RSTPM:
    """The model of ``model_cfg`` as the export traces it: flax's own layers in float32 (ONNX
    Runtime's CPU convolutions have no bfloat16: ask OpenVINO for bf16 at load time instead),
    with ``flax.linen.BatchNorm`` as ``norm`` and :func:`max_pool_padded` as ``pool``. Same
    variables as the trained model."""
    cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg))
    cfg.dtype = "float32"
    base = build_model(cfg, fast_cpu_ops=False)
    layers = {"norm": nn.BatchNorm, "pool": max_pool_padded}
    return RSTPM(base.teachers.clone(**layers), base.students.clone(**layers))


CHANNEL_SUM_OUTPUTS = 16  # a multiple of ONNX Runtime's blocked-layout width (8 on AVX2, 16 on AVX-512)


def channel_sum_conv(x: Array) -> Array:
    """``jnp.sum(x, axis=-1)`` of NHWC ``x`` as a 1x1 convolution with a kernel of ones
    (:data:`CHANNEL_SUM_OUTPUTS` equal outputs, the first kept): ONNX Runtime then sums the
    channels in the blocked layout its convolutions leave the features in, where a
    ``ReduceSum`` would first reorder them."""
    kernel = jnp.ones((1, 1, x.shape[-1], CHANNEL_SUM_OUTPUTS), x.dtype)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y[..., 0]


def squared_l2_channel_sums(teacher: Array, student: Array, eps: float = distances.NORM_EPS) -> Array:
    """``distances.distance_map`` (1/2 ||t^ - s^||^2, t^ = t / max(|t|, eps)) from three channel
    sums (:func:`channel_sum_conv`): 1/2 (t.t / m_t + s.s / m_s) - t.s / (sqrt(m_t) sqrt(m_s)),
    m = max(x.x, eps^2). Equal up to float32 rounding, without dividing and subtracting whole
    feature tensors."""
    t, s = teacher.astype(jnp.float32), student.astype(jnp.float32)
    tt, ss, ts = channel_sum_conv(t * t), channel_sum_conv(s * s), channel_sum_conv(t * s)
    mt, ms = jnp.maximum(tt, eps * eps), jnp.maximum(ss, eps * eps)
    return 0.5 * (tt / mt + ss / ms) - ts / (jnp.sqrt(mt) * jnp.sqrt(ms))


def export_distance(distance: Bound) -> Bound:
    """The form of ``distance`` the export traces: :func:`squared_l2_channel_sums` for the
    built-in ``squared_l2``, any other registered distance as it is."""
    if distance.fn is distances.distance_map and not distance.kwargs:
        return dataclasses.replace(distance, fn=squared_l2_channel_sums)
    return distance


def export_spec(spec: MapSpec) -> MapSpec:
    """``spec`` with the ONNX-convertible resize and smoothing (:func:`resize_matmul`,
    :func:`gaussian_smooth_matmul`) and :func:`export_distance`; the fusion rule unchanged."""
    return dataclasses.replace(spec, resize=resize_matmul, smooth=gaussian_smooth_matmul,
                               distance=export_distance(spec.distance))


def optimize_graph(model: Any) -> Any:
    """ONNX Runtime's basic (hardware-independent, ONNX-ops-only) graph rewrites, offline.

    jax2onnx keeps the model's NHWC layout and wraps every ``Conv`` in NHWC<->NCHW
    ``Transpose`` pairs, with a ``BatchNormalization`` after it. ONNX Runtime cancels those
    itself at load time, OpenVINO does not (a third of its float32 time went to ``Transpose``).
    Run once here, the basic level cancels the transposes, folds each BatchNormalization into
    its conv and folds constants; then the ``-inf`` pads before the max-pools become MaxPool's
    own ``pads`` (:func:`fold_pad_into_max_pool`). Needs ``onnxruntime``.
    """
    import tempfile  # noqa: PLC0415

    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save_model(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        so.log_severity_level = 3
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
        out = onnx.load_model(dst)
    fold_pad_into_max_pool(out)
    needed = {i for n in out.graph.node for i in n.input} | {o.name for o in out.graph.output}
    unused = [t for t in out.graph.initializer if t.name not in needed]
    for t in unused:
        out.graph.initializer.remove(t)
    used = {n.domain for n in out.graph.node}
    keep = [o for o in out.opset_import if o.domain in used or o.domain in ("", "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def fold_pad_into_max_pool(model: Any) -> int:
    """In place: ``Pad(x, spatial pads, -inf) -> MaxPool`` (NCHW) as one ``MaxPool`` with those
    ``pads`` (MaxPool ignores its padding, as a ``-inf`` pad does). Returns how many were folded."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    removed = []
    for pad in g.node:
        if pad.op_type != "Pad" or len(pad.input) < 3 or pad.input[1] not in consts:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in pad.attribute}
        mode = attrs.get("mode", b"constant")
        value = consts.get(pad.input[2])
        pads = consts[pad.input[1]].astype(np.int64).ravel()
        if (mode not in (b"constant", "constant") or value is None or not np.all(np.isneginf(value))
                or len(pad.input) > 3 and pad.input[3] or len(pads) % 2):
            continue
        rank = len(pads) // 2
        if rank < 3 or np.any(pads[[0, 1, rank, rank + 1]]) or np.any(pads < 0):
            continue
        users = consumers.get(pad.output[0], [])
        if pad.output[0] in graph_outputs or not users:
            continue
        ok = True
        for mp in users:
            a = {x.name: onnx.helper.get_attribute_value(x) for x in mp.attribute}
            if (mp.op_type != "MaxPool" or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID")
                    or any(a.get("pads", [0]))
                    or a.get("ceil_mode", 0) or len(mp.output) > 1):
                ok = False
        if not ok:
            continue
        spatial = [int(v) for v in pads[2:rank]] + [int(v) for v in pads[rank + 2:]]
        for mp in users:
            keep_attrs = [x for x in mp.attribute if x.name not in ("pads", "auto_pad")]
            del mp.attribute[:]
            mp.attribute.extend(keep_attrs + [onnx.helper.make_attribute("pads", spatial)])
            mp.input[0] = pad.input[0]
        removed.append(pad)
    for pad in removed:
        g.node.remove(pad)
    return len(removed)


def export_onnx(fn: Callable[[Array], dict[str, Any]], image_size: tuple[int, int], path: str | None = None,
                opset: int = DEFAULT_OPSET, model_name: str = "rstpm", optimize: bool = True) -> Any:
    """Convert ``fn(images) -> {"map", "score", ...}`` (weights closed over) to one ONNX graph.

    Input ``images: float32[batch, H, W, 3]``, outputs ``map: float32[batch, H, W]`` and
    ``score: float32[batch]`` (other entries of ``fn``'s dict are dropped). With ``optimize``,
    then :func:`optimize_graph` (plain NCHW convs with folded BatchNorm). Written to ``path``
    (weights inside the file) when given; returns the ``onnx.ModelProto``.
    """
    import jax2onnx  # noqa: PLC0415
    import onnx  # noqa: PLC0415

    h, w = (int(v) for v in image_size)

    def graph_fn(images: Array) -> tuple[Array, Array]:
        out = fn(images)
        return out["map"].astype(jnp.float32), out["score"].astype(jnp.float32)

    model = jax2onnx.to_onnx(graph_fn, [("batch", h, w, 3)], model_name=model_name,
                             opset=opset, input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES))
    # jax2onnx 0.17 leaves stale NHWC shapes in value_info on tensors it moved to NCHW (ONNX
    # Runtime warns "Error merging shape info"); drop them and let ONNX infer them again.
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    if optimize:
        model = optimize_graph(model)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        onnx.save_model(model, path, save_as_external_data=False)
    return model


def export_trained(model_cfg: Any, spec: MapSpec, teacher_vars: Any, student_vars: Any,
                   image_size: tuple[int, int], path: str | None = None, opset: int = DEFAULT_OPSET,
                   optimize: bool = True, stats: Any = None) -> Any:
    """:func:`export_onnx` of ``make_infer_fn`` over :func:`export_model` and
    :func:`export_spec`, the variables (the trained model's) and the fusion rule's held-out
    map statistics (``anomaly_maps.stats_arrays``, if it needs them) closed over as constants."""
    teacher_vars, student_vars = jax.device_get((teacher_vars, student_vars))
    infer = make_infer_fn(export_model(model_cfg), export_spec(spec), with_levels=False)
    return export_onnx(lambda images: infer(teacher_vars, student_vars, images, stats), image_size, path,
                       opset, optimize=optimize)
