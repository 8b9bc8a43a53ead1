"""The layer constructors the models take as fields, with torchvision's conventions.

Every module of ``models/`` takes ``conv``, ``norm`` (and, where used, ``conv_transpose``
and ``pool``) as fields defaulting to flax's own, so a variant is one ``functools.partial``
or a different class (``build_model`` swaps in ``rstpm_jax.ops.layers`` on CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import normalization as flax_norm

ModuleDef = Any
Array = jax.Array

# torchvision initialisation: kaiming-normal, fan_out, ReLU gain (untruncated normal).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Collection a per-example mask for BatchNorm's batch statistics is read from (variable
# ``valid`` of each BatchNorm module); build it with :func:`batch_norm_masks`.
MASK_COLLECTION = "batch_mask"


def batch_norm_masks(batch_stats: Any, valid: Array) -> dict[str, Any]:
    """The ``batch_mask`` collection giving every BatchNorm of a model (each module holding
    ``mean``/``var`` in ``batch_stats``) the per-example mask ``valid`` (``(B,)``)."""
    def walk(tree):
        if "mean" in tree and "var" in tree and not isinstance(tree["mean"], Mapping):
            return {"valid": valid}
        return {k: walk(v) for k, v in tree.items() if isinstance(v, Mapping)}
    return walk(batch_stats)


def example_mask(module: nn.Module, x: Array, mask: Array | None) -> Array | None:
    """``mask`` (``(B,)``), else the module's ``batch_mask/valid`` variable, else None."""
    if mask is None and module.has_variable(MASK_COLLECTION, "valid"):
        mask = module.get_variable(MASK_COLLECTION, "valid")
    return None if mask is None else jnp.asarray(mask).astype(jnp.float32).reshape(x.shape[0])


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` as torch's: momentum 0.1 in torch (0.9 here), epsilon 1e-5, the
    two-pass variance, and the running variance updated with the unbiased batch variance
    (``n / (n - 1)``). Training statistics skip padded examples (:func:`example_mask`)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_fast_variance: bool = False

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *,
                 mask: Array | None = None) -> Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                             use_running_average)
        axes = tuple(range(x.ndim - 1))
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            rows = example_mask(self, x, mask)
            where = None if rows is None else (rows.reshape((-1,) + (1,) * (x.ndim - 1)) > 0) & \
                jnp.ones(x.shape, bool)
            mean, var = flax_norm._compute_stats(x, axes, dtype=self.dtype, mask=where,
                                                 use_fast_variance=False)
            if not self.is_initializing():
                n = x.size // x.shape[-1] if rows is None else jnp.sum(rows) * (x.size // x.shape[-1] // x.shape[0])
                unbiased = var * (n / jnp.maximum(n - 1.0, 1.0))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return flax_norm._normalize(self, x, mean, var, axes, (x.ndim - 1,), self.dtype, self.param_dtype,
                                    self.epsilon, self.use_bias, self.use_scale, self.bias_init,
                                    self.scale_init, self.force_float32_reductions)
