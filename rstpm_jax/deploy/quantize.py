"""Post-training int8 quantisation of an exported ONNX model for OpenVINO (NNCF).

Only the convolutions are quantised (weights per channel, activations per tensor, calibrated
on held-out normal images), except the stems (the convolutions that read the image) and the
distance's channel sums (1x1 convolutions of ones, ``onnx_export.channel_sum_conv``); every
other op stays float32. NNCF's default scope also quantises the residual Adds, the max-pools
and the map ops (distance, resize, fusion), which moved a demo STPM's image AUROC from 0.979
to 0.917 in the prototype; convolutions alone kept it. On the RSTPM demo (random teachers)
quantising the stems too cost up to 0.15 pixel AUROC; keeping them float32 most of that.

The calibrated activation ranges are then widened by ``headroom`` (``eval.int8_headroom``,
default 2): they are measured on normal images, and a defect's activations exceed them by
design. Clipped, they pulled the demo's defect scores down (mean -1.5% to -5.6%) while the
quantisation noise pushed the normal ones up, which is what cost the AUROC; twice the range
costs one bit of resolution and clips nothing up to twice the largest normal activation.

With ``max_drop`` (``eval.int8_max_drop`` > 0), on top of that scope NNCF's accuracy control
(``quantize_with_accuracy_control``) keeps in float32 the quantised convolutions that move
the maps most, until the int8 model's maps of the held-out normal images agree with the
float32 model's (:func:`map_agreement`) within ``max_drop``. Held-out normal images carry
no defect labels, so the metric is agreement with the float32 model, not an AUROC.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rstpm_jax.deploy import openvino_core

# Ops that are never quantised themselves (graph inputs/outputs, constants).
_STRUCTURAL = {"Parameter", "Result", "Constant"}
QUANTISED_OPS = ("Convolution",)
SCOPE = ("convolutions only, except the stems reading the image and the distance's channel sums "
         "(weights per channel, activations per tensor); all other ops float32")
# Ops a stem's input may pass through between the graph input and the convolution.
_PASS_THROUGH = {"Transpose", "Convert", "Reshape"}


def _source(op: Any, index: int, through: set[str] | frozenset[str]) -> Any:
    """The node that feeds ``op``'s input ``index``, past any ops of the types ``through``."""
    src = op.input_value(index).get_node()
    while src.get_type_name() in through:
        src = src.input_value(0).get_node()
    return src


def _convolutions(model: Any) -> list[Any]:
    return [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]


def stem_convolutions(model: Any) -> list[str]:
    """Names of the convolutions whose data input is the graph's input (through layout ops)."""
    return [op.get_friendly_name() for op in _convolutions(model)
            if _source(op, 0, _PASS_THROUGH).get_type_name() == "Parameter"]


def channel_sum_convolutions(model: Any) -> list[str]:
    """Names of the 1x1 convolutions with a constant kernel of ones: the distance's channel sums
    (``onnx_export.channel_sum_conv``). Their inputs are products of features whose small
    differences are the map, far finer than int8 resolves."""
    out = []
    for op in _convolutions(model):
        kernel = _source(op, 1, {"Convert"})
        if (kernel.get_type_name() == "Constant" and tuple(kernel.get_output_shape(0))[2:] == (1, 1)
                and np.all(kernel.get_data() == 1)):
            out.append(op.get_friendly_name())
    return out


def widen_activation_ranges(model: Any, headroom: float) -> int:
    """Scale every activation FakeQuantize's input and output range (not the weights') by
    ``headroom``, in place, around zero; returns how many were widened."""
    import openvino.opset13 as ops  # noqa: PLC0415 (the export extra)

    widened = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize" or op.input_value(0).get_node().get_type_name() == "Constant":
            continue
        for i in (1, 2, 3, 4):  # input low / high, output low / high
            bound = op.input_value(i).get_node().get_data().astype(np.float32)
            op.input(i).replace_source_output(ops.constant(bound * np.float32(headroom)).output(0))
        widened += 1
    return widened


# The float32 reference: without the hint, OpenVINO runs bfloat16 where the CPU has it natively.
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def map_agreement(ref_map: np.ndarray, ref_score: np.ndarray, got_map: np.ndarray, got_score: np.ndarray,
                  scale: float) -> np.ndarray:
    """Per image, ``1 - max(mean |map - ref map|, |score - ref score|) / scale``: 1 where a model
    reproduces the reference (float32) maps and scores; ``scale`` is the spread (standard
    deviation) of the reference maps over the held-out normal images, so 0.99 means errors of
    1% of how much a normal image's map varies."""
    m_err = np.abs(np.asarray(got_map, np.float64) - ref_map).reshape(len(ref_map), -1).mean(axis=1)
    s_err = np.abs(np.asarray(got_score, np.float64) - ref_score).reshape(len(ref_score))
    return 1.0 - np.maximum(m_err, s_err) / max(float(scale), 1e-12)


def openvino_int8(onnx_path: str, calibration: np.ndarray, out_xml: str, subset_size: int = 300,
                  max_drop: float = 0.0, headroom: float = 2.0) -> dict[str, Any]:
    """NNCF int8 quantisation of ``onnx_path`` (convolutions only) calibrated on ``calibration``
    (normalised float32 ``[n, H, W, 3]``: held-out normal images); with ``max_drop`` > 0, accuracy
    control: the convolutions that cost most :func:`map_agreement` on the same images are
    reverted to float32 until it drops by at most ``max_drop``. The activation ranges are then
    widened by ``headroom`` (:func:`widen_activation_ranges`). Written as OpenVINO IR ``out_xml``
    (+ ``.bin``). Returns what the sidecar records about it."""
    import nncf  # noqa: PLC0415 (the export extra)
    import openvino as ov  # noqa: PLC0415

    if headroom < 1:
        raise ValueError(f"int8 headroom {headroom} (eval.int8_headroom) must be >= 1: a narrower range "
                         "than the calibration images' clips normal activations.")
    calibration = np.asarray(calibration, np.float32)
    if len(calibration) == 0:
        raise ValueError("int8 quantisation needs calibration images (held-out normal images): the "
                         "category has none (data.holdout_fraction=0?).")
    model = openvino_core.core().read_model(onnx_path)
    others = sorted({op.get_type_name() for op in model.get_ordered_ops()} - _STRUCTURAL - set(QUANTISED_OPS))
    stems = stem_convolutions(model)
    sums = channel_sum_convolutions(model)
    items = [(i, calibration[i:i + 1]) for i in range(len(calibration))]
    data = nncf.Dataset(items, lambda item: item[1])
    n = min(len(calibration), int(subset_size))
    reference = _outputs(openvino_core.core().compile_model(model, "CPU", F32), items)
    scale = float(np.std(reference["map"]))

    def validate(compiled: Any, batch: Any) -> tuple[float, list[float]]:
        batch = list(batch)
        got = _outputs(compiled, batch)
        idx = [i for i, _ in batch]
        per = map_agreement(reference["map"][idx], reference["score"][idx], got["map"], got["score"], scale)
        return float(np.mean(per)), [float(v) for v in per]

    scope = nncf.IgnoredScope(names=stems + sums, types=others, validate=False)
    if max_drop:
        quantized = nncf.quantize_with_accuracy_control(model, data, data, validate, max_drop=float(max_drop),
                                                        subset_size=n, ignored_scope=scope)
    else:
        quantized = nncf.quantize(model, data, subset_size=n, ignored_scope=scope)
    widened = widen_activation_ranges(quantized, headroom) if headroom != 1 else 0
    ov.save_model(quantized, out_xml)
    int8_agreement, _ = validate(openvino_core.core().compile_model(quantized, "CPU", F32), items)
    convs = len(_convolutions(model))
    return {"tool": f"nncf {nncf.__version__}" + (" (quantize_with_accuracy_control)" if max_drop else ""),
            "scope": SCOPE, "calibration_examples": n, "float_stems": len(stems),
            "float_channel_sums": len(sums), "convolutions": convs,
            "map_agreement": round(int8_agreement, 6),  # with the float32 model, held-out images
            "accuracy_control": {"max_drop": float(max_drop)} if max_drop else None,
            "activation_headroom": float(headroom), "widened_activation_ranges": widened,
            "quantised_ops": int(sum(1 for op in quantized.get_ordered_ops()
                                     if op.get_type_name() == "FakeQuantize"))}


def _outputs(compiled: Any, items: list) -> dict[str, np.ndarray]:
    """``{"map": [n, H, W], "score": [n]}`` of a compiled OpenVINO model on ``(index, image)`` items."""
    outs = {o.get_any_name(): o for o in compiled.outputs}
    request = compiled.create_infer_request()
    maps, scores = [], []
    for _, x in items:
        res = request.infer({compiled.inputs[0]: np.asarray(x, np.float32)})
        maps.append(np.array(res[outs["map"]], np.float64))
        scores.append(np.array(res[outs["score"]], np.float64).reshape(-1))
    return {"map": np.concatenate(maps), "score": np.concatenate(scores)}
