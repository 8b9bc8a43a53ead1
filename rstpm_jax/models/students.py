"""Student 1 (gated ResNet, as STPM) and student 2 (reconstruction decoder)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from rstpm_jax.models.attention import AttentionGate
from rstpm_jax.models.resnet import (BasicBlock, batch_norm, conv_fn_kwargs, conv_init,
                                     conv_layer, conv_transpose_layer, stage, stem)

Array = jax.Array
COMPARED = ("layer1", "layer2", "layer3")


class GatedResNetStudent(nn.Module):
    """Student 1: ResNet of the teacher's architecture to ``layer3``, gated after each stage."""

    arch: str = "resnet18"
    attention: bool = True
    attention_mode: str = "mul"
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, teacher: Mapping[str, Array], train: bool) -> dict[str, Array]:
        _, y = stem(x.astype(self.dtype), train, dtype=self.dtype, conv_fn=self.conv_fn)
        out = {}
        for i, level in enumerate(COMPARED):
            y = stage(y, train, self.arch, i, dtype=self.dtype, conv_fn=self.conv_fn)
            if self.attention:
                y = AttentionGate(self.attention_mode, self.dtype, self.conv_fn,
                                  name=f"attention_{level}")(teacher[level], y, train)
            out[level] = y
        return out


class ReconstructionStudent(nn.Module):
    """Student 2: rebuilds teacher 2's ``layer3/2/1`` from teacher 1's ``layer4`` (stop-gradient).

    conv3x3 -> 512, BN, ReLU, one basic block; then per width in ``widths``: 3x3/2
    transposed conv, BN, ReLU, two basic blocks, attention gate; the gated output feeds
    the next stage and, through a 1x1 conv (skipped when the widths already agree),
    is compared with teacher 2 at that resolution.
    """

    target_widths: Sequence[int] = (1024, 512, 256)  # teacher 2's layer3, layer2, layer1
    widths: Sequence[int] = (256, 128, 64)
    attention: bool = True
    attention_mode: str = "mul"
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, deepest: Array, teacher2: Mapping[str, Array], train: bool) -> dict[str, Array]:
        if len(self.widths) != 3:
            raise ValueError(f"model.decoder_widths needs 3 widths (1/16, 1/8, 1/4), got {self.widths}.")
        y = jax.lax.stop_gradient(deepest).astype(self.dtype)
        y = conv_layer(512, 3, dtype=self.dtype, conv_fn=self.conv_fn, name="conv_in")(y)
        y = nn.relu(batch_norm(train, self.dtype, name="bn_in")(y))
        y = BasicBlock(512, dtype=self.dtype, conv_fn=self.conv_fn, name="block_in")(y, train)
        out = {}
        for i, (level, width, target) in enumerate(zip(reversed(COMPARED), self.widths, self.target_widths)):
            y = conv_transpose_layer(width, 3, 2, dtype=self.dtype, conv_fn=self.conv_fn,
                                     name=f"up{i}_deconv")(y)
            y = nn.relu(batch_norm(train, self.dtype, name=f"up{i}_bn")(y))
            for j in range(2):
                y = BasicBlock(width, downsample=False, dtype=self.dtype, conv_fn=self.conv_fn,
                               name=f"up{i}_block{j}")(y, train)
            if self.attention:
                y = AttentionGate(self.attention_mode, self.dtype, self.conv_fn,
                                  name=f"attention_{level}")(teacher2[level], y, train)
            if width != target:
                out[level] = nn.Conv(target, (1, 1), kernel_init=conv_init, dtype=self.dtype,
                                     param_dtype=jnp.float32, name=f"proj_{level}",
                                     **conv_fn_kwargs(self.conv_fn))(y)
            else:
                out[level] = y
        return out
