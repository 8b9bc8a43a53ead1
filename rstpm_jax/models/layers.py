"""The layer constructors the models take as fields, with torchvision's conventions.

Every module of ``models/`` takes ``conv``, ``norm`` (and, where used, ``conv_transpose``
and ``pool``) as fields defaulting to flax's own, so a variant is one ``functools.partial``
or a different class (``build_model`` swaps in ``rstpm_jax.ops.layers`` on CPU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

ModuleDef = Any

# torchvision initialisation: kaiming-normal, fan_out, ReLU gain (untruncated normal).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` with torch's defaults: momentum 0.1 in torch (0.9 here),
    epsilon 1e-5 and the two-pass variance (no E[x^2] - E[x]^2 cancellation)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_fast_variance: bool = False
