"""The models' BatchNorm (``models.layers``: flax's, with torch's running variance and a
per-example mask) and its CPU twin (``ops.layers``, ``ops.batch_norm``: closed-form gradient):
the same numbers, and torch's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstpm_jax.models import layers as model_layers
from rstpm_jax.ops.batch_norm import batch_norm_train, channel_sum
from rstpm_jax.ops.layers import BatchNorm


def _flax(train: bool, dtype=jnp.float32) -> nn.BatchNorm:
    """The models' default norm: flax's own BatchNorm with torch's settings."""
    bn = model_layers.BatchNorm(use_running_average=not train, dtype=dtype)
    assert (bn.momentum, bn.epsilon, bn.use_fast_variance) == (0.9, 1e-5, False)
    return bn


def _variables(rng, c):
    return {"params": {"scale": jnp.asarray(rng.normal(size=c), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=c), jnp.float32)},
            "batch_stats": {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
                            "var": jnp.asarray(rng.uniform(0.5, 2, size=c), jnp.float32)}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_variables_outputs_updates_and_gradients_as_flax(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3, 2, size=(4, 5, 6, 7)), dtype)  # off-centre: tests the two passes
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours, ref = BatchNorm(use_running_average=False, dtype=dtype), _flax(True, dtype)
    v_ours, v_ref = ours.init(jax.random.key(0), x), ref.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), v_ours) == jax.tree.map(lambda a: (a.shape, a.dtype), v_ref)
    v = _variables(rng, 7)

    def run(module):
        def loss(params, x):
            y, new = module.apply({"params": params, "batch_stats": v["batch_stats"]}, x,
                                  mutable=["batch_stats"])
            return jnp.sum(jnp.sin(y.astype(jnp.float32)) * g), (y, new)
        (_, aux), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(v["params"], x)
        return aux, grads

    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(run(ours)), jax.tree.leaves(run(ref))):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())
    y_eval = BatchNorm(use_running_average=True, dtype=dtype).apply(v, x)
    np.testing.assert_array_equal(np.asarray(y_eval, np.float32),
                                  np.asarray(_flax(False, dtype).apply(v, x), np.float32))


def test_gradient_through_the_statistics_matches_autodiff():
    """The returned mean/var carry their own (exact) gradient, as the plain formula would."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(1, 3, size=(3, 4, 5, 6)), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=6), jnp.float32) for _ in range(2))
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (6,), (6,))]

    def plain(x, scale, bias, eps=1e-5):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias, mean, var

    def loss(fn):
        return lambda *a: sum(jnp.vdot(jnp.tanh(o), wi) for o, wi in zip(fn(*a), w))

    got = jax.grad(loss(lambda *a: batch_norm_train(*a, 1e-5)), (0, 1, 2))(x, scale, bias)
    want = jax.grad(loss(plain), (0, 1, 2))(x, scale, bias)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 64, 64, 16), (3, 5, 7, 6), (2, 9, 64)])
def test_channel_sum_is_as_accurate_as_a_reduction(shape):
    """Sums over all axes but the last (a ones-vector product on CPU) against float64,
    at least as close as XLA's own float32 reduction; shapes with odd row counts too."""
    x = jnp.asarray(np.random.default_rng(2).normal(1, 1, size=shape), jnp.float32)
    want = np.asarray(x, np.float64).reshape(-1, shape[-1]).sum(0)
    got = jax.jit(channel_sum)(x)
    assert got.shape == (shape[-1],) and got.dtype == jnp.float32
    ref_err = np.abs(np.asarray(jax.jit(lambda v: v.sum(tuple(range(v.ndim - 1))))(x)) - want).max()
    assert np.abs(np.asarray(got) - want).max() <= max(2 * ref_err, 1e-6 * np.abs(want).max())


def _masked_plain(x, scale, bias, mask, eps=1e-5):
    """Masked batch norm by the formula (autodiff reference): statistics over valid rows."""
    w = mask.reshape(-1, 1, 1, 1)
    n = jnp.sum(mask) * (x.size // x.shape[0] // x.shape[-1])
    mean = jnp.sum(x * w, (0, 1, 2)) / n
    var = jnp.sum(jnp.square(x - mean) * w, (0, 1, 2)) / n
    return (x - mean) * (jax.lax.rsqrt(var + eps) * scale) + bias, mean, var


@pytest.mark.parametrize("shape, valid", [((6, 4, 5, 7), 4), ((5, 3, 3, 4), 1), ((4, 8, 8, 16), 4)])
def test_masked_closed_form_gradient_matches_autodiff(shape, valid):
    """With a mask the statistics are over the valid rows; the closed-form backward equals
    autodiff of the masked formula for cotangents on every row (padded ones too) and on the
    returned statistics. All valid == no mask."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(2, 3, size=shape), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=shape[-1]), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(shape[0]) < valid, jnp.float32)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in (shape, shape[-1:], shape[-1:])]

    def loss(fn):
        return lambda *a: sum(jnp.vdot(jnp.tanh(o), wi) for o, wi in zip(fn(*a), w))

    ours = lambda x, s, b: batch_norm_train(x, s, b, 1e-5, mask)  # noqa: E731
    plain = lambda x, s, b: _masked_plain(x, s, b, mask)  # noqa: E731
    for a, b in zip(jax.jit(ours)(x, scale, bias), plain(x, scale, bias)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # The statistics are those of the valid rows alone.
    _, mean, var = ours(x, scale, bias)
    xv = np.asarray(x, np.float64)[:valid].reshape(-1, shape[-1])
    np.testing.assert_allclose(np.asarray(mean), xv.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(var), xv.var(0), rtol=1e-5, atol=1e-5)
    got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(x, scale, bias)
    want = jax.grad(loss(plain), (0, 1, 2))(x, scale, bias)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    full = jnp.ones(shape[0], jnp.float32)
    for a, b in zip(jax.grad(loss(lambda *t: batch_norm_train(*t, 1e-5, full)), (0, 1, 2))(x, scale, bias),
                    jax.grad(loss(lambda *t: batch_norm_train(*t, 1e-5)), (0, 1, 2))(x, scale, bias)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("module_cls", [BatchNorm, model_layers.BatchNorm], ids=["cpu_ops", "flax"])
def test_running_stats_and_outputs_match_torch_with_and_without_padding(module_cls):
    """Train-mode BatchNorm == torch.nn.BatchNorm2d (momentum 0.1, eps 1e-5, unbiased running
    variance); a padded batch (mask, given directly or through the ``batch_mask``
    collection) == torch on the unpadded batch."""
    torch = pytest.importorskip("torch")
    from rstpm_jax.models.layers import batch_norm_masks

    rng = np.random.default_rng(5)
    x = rng.normal(1, 2, size=(6, 5, 4, 8)).astype(np.float32)
    v = _variables(rng, 8)
    module = module_cls(use_running_average=False)
    for valid in (6, 4):
        tbn = torch.nn.BatchNorm2d(8).double().train()
        with torch.no_grad():
            tbn.weight.copy_(torch.from_numpy(np.array(v["params"]["scale"])))
            tbn.bias.copy_(torch.from_numpy(np.array(v["params"]["bias"])))
            tbn.running_mean.copy_(torch.from_numpy(np.array(v["batch_stats"]["mean"])))
            tbn.running_var.copy_(torch.from_numpy(np.array(v["batch_stats"]["var"])))
            y_t = tbn(torch.from_numpy(x[:valid].transpose(0, 3, 1, 2)).double()).numpy().transpose(0, 2, 3, 1)
        mask = jnp.asarray(np.arange(6) < valid, jnp.float32)
        via_arg = module.apply(v, jnp.asarray(x), mask=mask if valid < 6 else None, mutable=["batch_stats"])
        via_collection = module.apply({**v, "batch_mask": batch_norm_masks(v["batch_stats"], mask)},
                                      jnp.asarray(x), mutable=["batch_stats"])
        for y, new in (via_arg, via_collection):
            np.testing.assert_allclose(np.asarray(y)[:valid], y_t, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(np.asarray(new["batch_stats"]["mean"]), tbn.running_mean.numpy(),
                                       rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(np.asarray(new["batch_stats"]["var"]), tbn.running_var.numpy(),
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 64, 64, 16), (3, 5, 7, 6), (5, 9, 64)])
def test_weighted_channel_sum_matches_numpy(shape):
    """Per-example weights (a mask) in the ones-vector product, odd per-example row counts too."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(1, 1, size=shape), jnp.float32)
    wts = rng.integers(0, 2, size=shape[0]).astype(np.float32)
    want = (np.asarray(x, np.float64) * wts.reshape((-1,) + (1,) * (len(shape) - 1))).reshape(-1, shape[-1]).sum(0)
    got = jax.jit(channel_sum)(x, jnp.asarray(wts))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
