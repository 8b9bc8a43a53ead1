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
        # flax's own nn.Conv: a one-channel 1x1 conv with a bias gains nothing from ``conv``.
        a = nn.Conv(1, (1, 1), kernel_init=LOGIT_INIT, dtype=self.dtype, param_dtype=jnp.float32,
                    name="proj")(h)
        a = nn.sigmoid(a)
        self.sow("intermediates", "attention", a)
        gated = student * a
        return gated if self.mode == "mul" else student + gated
