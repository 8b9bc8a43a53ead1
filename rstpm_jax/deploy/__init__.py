"""Deployment beyond ``jax.export``: the ONNX export (``onnx_export``), NNCF int8 for OpenVINO
(``quantize``), the jax / ONNX Runtime / OpenVINO runners of exported artifacts (``runtime``)
and the building of a trained category's artifacts and sidecars (``artifact``)."""
