"""Post-training int8 quantisation of an exported ONNX model for OpenVINO (NNCF).

Only the convolutions are quantised (weights per channel, activations per tensor, calibrated
on held-out normal images), except the stems (the convolutions that read the image); every
other op stays float32. NNCF's default scope also quantises the residual Adds, the max-pools
and the map ops (distance, resize, fusion), which moved a demo STPM's image AUROC from 0.979
to 0.917 in the prototype; convolutions alone kept it. On the RSTPM demo (random teachers)
quantising the stems too cost up to 0.15 pixel AUROC; keeping them float32 most of that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Ops that are never quantised themselves (graph inputs/outputs, constants).
_STRUCTURAL = {"Parameter", "Result", "Constant"}
QUANTISED_OPS = ("Convolution",)
SCOPE = ("convolutions only, except the stems reading the image (weights per channel, activations per "
         "tensor); all other ops float32")
# Ops a stem's input may pass through between the graph input and the convolution.
_PASS_THROUGH = {"Transpose", "Convert", "Reshape"}


def stem_convolutions(model: Any) -> list[str]:
    """Names of the convolutions whose data input is the graph's input (through layout ops)."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convolution":
            continue
        src = op.input_value(0).get_node()
        while src.get_type_name() in _PASS_THROUGH:
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Parameter":
            out.append(op.get_friendly_name())
    return out


def openvino_int8(onnx_path: str, calibration: np.ndarray, out_xml: str, subset_size: int = 300) -> dict[str, Any]:
    """NNCF int8 quantisation of ``onnx_path`` (convolutions only) calibrated on ``calibration``
    (normalised float32 ``[n, H, W, 3]``), written as OpenVINO IR ``out_xml`` (+ ``.bin``).
    Returns what the sidecar records about it."""
    import nncf  # noqa: PLC0415 (the export extra)
    import openvino as ov  # noqa: PLC0415

    calibration = np.asarray(calibration, np.float32)
    if len(calibration) == 0:
        raise ValueError("int8 quantisation needs calibration images (held-out normal images): the "
                         "category has none (data.holdout_fraction=0?).")
    model = ov.Core().read_model(onnx_path)
    others = sorted({op.get_type_name() for op in model.get_ordered_ops()} - _STRUCTURAL - set(QUANTISED_OPS))
    stems = stem_convolutions(model)
    data = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    n = min(len(calibration), int(subset_size))
    quantized = nncf.quantize(model, data, subset_size=n,
                              ignored_scope=nncf.IgnoredScope(names=stems, types=others, validate=False))
    ov.save_model(quantized, out_xml)
    return {"tool": f"nncf {nncf.__version__}", "scope": SCOPE, "calibration_examples": n,
            "float_stems": len(stems),
            "quantised_ops": int(sum(1 for op in quantized.get_ordered_ops()
                                     if op.get_type_name() == "FakeQuantize"))}
