"""``rstpm_jax.ops.compile_options``: the CPU compiler options take effect and yield to XLA_FLAGS."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rstpm_jax.ops import compile_options


def test_cpu_compiler_options(monkeypatch):
    """On CPU the library compiles without YNNPACK fusions (same numbers); XLA_FLAGS wins."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    if jax.default_backend() != "cpu":
        assert compile_options.compiler_options() is None
        return
    assert compile_options.compiler_options() == compile_options.CPU_OPTIONS
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)

    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y).sum(axis=(1, 2))

    ours = compile_options.jit(f).lower(x, w).compile()
    default = jax.jit(f).lower(x, w).compile()
    assert "__ynn_fusion" not in ours.as_text()
    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(default(x, w)), rtol=1e-5, atol=1e-4)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert compile_options.compiler_options() is None


def test_eigen_convolutions_follows_options_and_flags(monkeypatch):
    """The conv op picks its weight gradient by this: Eigen convs unless XLA_FLAGS turns
    YNNPACK fusions back on."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    cpu = jax.default_backend() == "cpu"
    assert compile_options.eigen_convolutions() is cpu
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert compile_options.eigen_convolutions() is cpu
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=INDIVIDUAL_DOT,ELTWISE")
    assert compile_options.eigen_convolutions() is False
