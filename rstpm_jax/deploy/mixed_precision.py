"""OpenVINO bfloat16 with the distance kept in float32.

Under the ``bf16`` inference-precision hint OpenVINO's CPU plugin runs every op up to the
graph's last matmuls in bfloat16, the distance included. The distance is the small difference
of the channel sums ``t.t``, ``s.s``, ``t.s`` (``onnx_export.squared_l2_channel_sums``), so
rounding each sum to bfloat16's 8 bits adds an error of its own to that of the bfloat16
features. On the demo's trained models keeping the channel sums and everything after them in
float32 cut the mean map error by about 30%, and a pair of mesh images no longer swapped
(image AUROC 0.844 -> 0.875, float32's); benchmarks/README.md has the figures and the cost.

OpenVINO keeps an op in its own precision when it carries the ``DisablePrecisionConversion``
runtime attribute. Its Python API cannot create that attribute, but its IR reader does:
:func:`keep_float32` writes the model as IR, adds the attribute to those layers and reads it
back.
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from typing import Any

from rstpm_jax.deploy import openvino_core
from rstpm_jax.deploy.quantize import channel_sum_convolutions

# OpenVINO's runtime attribute (rt_info) and its value: no conversion from any type to any type.
ATTRIBUTE = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:dynamic"}
RT_INFO_KEY = "DisablePrecisionConversion_0"  # how the attribute is keyed in a node's rt_info


def distance_scope(model: Any) -> list[str]:
    """Names of the distance's channel-sum convolutions and of every op they feed, to the outputs
    (the map arithmetic, resize, fusion and score): the ops :func:`keep_float32` keeps."""
    sums = set(channel_sum_convolutions(model))
    todo = [op for op in model.get_ordered_ops() if op.get_friendly_name() in sums]
    names: list[str] = []
    seen: set[str] = set()
    while todo:
        op = todo.pop()
        if op.get_friendly_name() in seen:
            continue
        seen.add(op.get_friendly_name())
        names.append(op.get_friendly_name())
        todo.extend(t.get_node() for out in op.outputs() for t in out.get_target_inputs())
    return names


def keep_float32(model: Any, names: list[str]) -> Any:
    """``model`` (an ``openvino.Model``) read back with the ops ``names`` marked to run in float32
    whatever the inference-precision hint. Raises if a name is not a layer of the model."""
    import openvino as ov  # noqa: PLC0415 (the export extra)

    if not names:
        return model
    with tempfile.TemporaryDirectory(prefix="rstpm_ov_") as tmp:
        xml = os.path.join(tmp, "model.xml")
        ov.save_model(model, xml, compress_to_fp16=False)
        tree = ET.parse(xml)
        wanted, marked = set(names), set()
        for layer in tree.getroot().iter("layer"):
            if layer.get("name") in wanted:
                rt = layer.find("rt_info")
                if rt is None:
                    rt = ET.Element("rt_info")
                    layer.insert(0, rt)
                ET.SubElement(rt, "attribute", ATTRIBUTE)
                marked.add(layer.get("name"))
        if marked != wanted:
            raise ValueError(f"no layer named {sorted(wanted - marked)[:5]} in the model's IR.")
        tree.write(xml)
        # The weights read into memory, not mapped: the folder goes next.
        return openvino_core.core().read_model(xml, config={"ENABLE_MMAP": False})


def float32_distance(model: Any) -> tuple[Any, int]:
    """``model`` with its distance (:func:`distance_scope`) kept in float32, and how many ops that
    is (0 for a graph without channel-sum convolutions, e.g. another exporter's)."""
    names = distance_scope(model)
    return keep_float32(model, names), len(names)
