"""Spatial attention gate from teacher features (paper section 3.3, Figure 4)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rstpm_jax.models.layers import BatchNorm, ModuleDef
from rstpm_jax.models.resnet import torch_conv

Array = jax.Array
MODES = ("mul", "residual")
# The logit conv feeding the sigmoid keeps torch's default Conv2d init (fan-in, uniform) and
# its bias: kaiming fan_out with fan_out=1 would start most gates saturated at 0 or 1.
LOGIT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class Logit(nn.Module):
    """The gate's 1x1 conv to one channel (variables ``kernel`` (1, 1, C, 1) and ``bias``, as
    ``nn.Conv``'s) as a contraction over channels: stacked over jobs it is a batched matrix
    product, where a one-feature grouped convolution fails XLA's SPMD partitioner."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: Array) -> Array:
        kernel = self.param("kernel", LOGIT_INIT, (1, 1, h.shape[-1], 1), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (1,), jnp.float32)
        return jnp.einsum("bhwc,co->bhwo", h.astype(self.dtype), kernel[0, 0].astype(self.dtype)) + \
            bias.astype(self.dtype)


class AttentionGate(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv1x1 (one channel) -> sigmoid on stop-gradient teacher features.

    ``mul`` returns ``s * a``, ``residual`` returns ``s + s * a``. The one-channel map is
    also sown into the ``intermediates`` collection as ``attention``.
    """

    mode: str = "mul"
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm

    @nn.compact
    def __call__(self, teacher: Array, student: Array, train: bool) -> Array:
        if self.mode not in MODES:
            raise ValueError(f"model.attention_mode must be one of {MODES}, got {self.mode!r}.")
        if teacher.shape[:3] != student.shape[:3]:
            raise ValueError(
                f"Attention gate needs teacher and student maps of one size: {teacher.shape} vs {student.shape}.")
        t = jax.lax.stop_gradient(teacher).astype(self.dtype)
        h = torch_conv(self.conv, self.dtype)(student.shape[-1], (3, 3), padding=1, name="conv")(t)
        h = nn.relu(self.norm(use_running_average=not train, dtype=self.dtype, name="bn")(h))
        a = nn.sigmoid(Logit(self.dtype, name="proj")(h))
        self.sow("intermediates", "attention", a)
        gated = student * a
        return gated if self.mode == "mul" else student + gated
