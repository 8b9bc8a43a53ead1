"""Deployment artifacts beyond ``jax.export``: ONNX export and ONNX Runtime / OpenVINO runners."""
