"""XLA compiler options for the library's jitted functions, chosen by platform.

On CPU, XLA (jax 0.10) hands convolutions to YNNPACK fusions, which leave about a quarter of
the cores idle for ResNet convolutions (process CPU time ~1.55x wall time on 2 cores);
XLA's own Eigen convolutions keep them busy (~1.95x). With YNNPACK fusions off, STPM
inference at 256x256, batch 32, ran 20-30% faster on this project's 2-core machine and the
train step ~15% faster (``benchmarks/throughput.py``). Every jitted function of the library
uses them. A value the user sets for the same option in ``XLA_FLAGS`` wins: the option is
then not passed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import jax

_YNN_FUSION = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS: dict[str, Any] = {_YNN_FUSION: ""}


def compiler_options() -> dict[str, Any] | None:
    """The options for ``jax.jit(..., compiler_options=...)`` on this process' default backend."""
    if jax.default_backend() != "cpu":
        return None
    options = {k: v for k, v in CPU_OPTIONS.items() if _user_flag(k) is None}
    return options or None


def jit(fun: Callable, **kwargs: Any) -> Any:
    """``jax.jit`` with :func:`compiler_options`."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


def eigen_convolutions() -> bool:
    """Whether the library's jitted functions run XLA:CPU's Eigen convolutions (YNNPACK
    fusions off, by :data:`CPU_OPTIONS` or by the user's ``XLA_FLAGS``)."""
    if jax.default_backend() != "cpu":
        return False
    user = _user_flag(_YNN_FUSION)
    return (CPU_OPTIONS[_YNN_FUSION] if user is None else user) == ""


def _user_flag(key: str) -> str | None:
    """The last value ``XLA_FLAGS`` gives ``--key`` (``""`` for a bare ``--key``), or ``None``."""
    found = re.findall(rf"--{key}(?:=(\S*))?(?!\w)", os.environ.get("XLA_FLAGS", ""))
    return found[-1].strip("\"'") if found else None
