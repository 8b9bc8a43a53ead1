"""Student 1 (gated ResNet, as STPM) and student 2 (reconstruction decoder)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rstpm_jax.levels import COMPARED
from rstpm_jax.models.attention import AttentionGate
from rstpm_jax.models.layers import BatchNorm, ModuleDef
from rstpm_jax.models.resnet import BasicBlock, stage, stem, torch_conv

Array = jax.Array


class GatedResNetStudent(nn.Module):
    """Student 1: ResNet of the teacher's architecture to ``layer3``, gated after each stage."""

    arch: str = "resnet18"
    attention: bool = True
    attention_mode: str = "mul"
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: Array, teacher: Mapping[str, Array], train: bool) -> dict[str, Array]:
        conv = torch_conv(self.conv, self.dtype)
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        _, y = stem(x.astype(self.dtype), conv=conv, norm=norm, pool=self.pool)
        out = {}
        for i, level in enumerate(COMPARED):
            y = stage(y, self.arch, i, conv=conv, norm=norm)
            if self.attention:
                y = AttentionGate(self.attention_mode, self.dtype, conv=self.conv, norm=self.norm,
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
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    conv_transpose: ModuleDef = nn.ConvTranspose

    @nn.compact
    def __call__(self, deepest: Array, teacher2: Mapping[str, Array], train: bool) -> dict[str, Array]:
        if len(self.widths) != 3:
            raise ValueError(f"model.decoder_widths needs 3 widths (1/16, 1/8, 1/4), got {self.widths}.")
        conv = torch_conv(self.conv, self.dtype)
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        deconv = torch_conv(self.conv_transpose, self.dtype)
        y = jax.lax.stop_gradient(deepest).astype(self.dtype)
        y = nn.relu(norm(name="bn_in")(conv(512, (3, 3), padding=1, name="conv_in")(y)))
        y = BasicBlock(512, conv=conv, norm=norm, name="block_in")(y)
        out = {}
        for i, (level, width, target) in enumerate(zip(reversed(COMPARED), self.widths, self.target_widths)):
            y = deconv(width, (3, 3), strides=(2, 2), padding="SAME", name=f"up{i}_deconv")(y)
            y = nn.relu(norm(name=f"up{i}_bn")(y))
            for j in range(2):
                y = BasicBlock(width, conv=conv, norm=norm, name=f"up{i}_block{j}")(y)
            if self.attention:
                y = AttentionGate(self.attention_mode, self.dtype, conv=self.conv, norm=self.norm,
                                  name=f"attention_{level}")(teacher2[level], y, train)
            if width != target:  # a 1x1 projection (with a bias) to teacher 2's width
                out[level] = conv(target, (1, 1), padding=0, use_bias=True, name=f"proj_{level}")(y)
            else:
                out[level] = y
        return out
