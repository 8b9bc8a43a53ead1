"""Subprocess helpers for the training tests (each run gets fresh XLA flags / process state)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small setting for end-to-end runs through main (32x32, batch 8, no figures).
SMALL_RUN = ["--config.data.image_size=32", "--config.train.batch_size=8", "--config.eval.batch_size=8",
             "--config.eval.figures=False", "--config.train.log_every_steps=1"]
SESSION_CACHE = "RSTPM_TEST_JAX_CACHE"  # env var: the session's compilation cache directory

# A script prelude that runs the library in float64 (before it is imported: every float32 it
# names is then float64). In float32, two summation orders (1 vs 8 devices, stacked vs alone)
# round differently, a few of the ~1e5 ReLU inputs (or max-pool near-ties) per step land
# within that rounding of zero and flip, and the gradient moves by up to ~1e-2 of the update;
# training then amplifies any difference ~10x per step. In float64 nothing flips and a real
# difference (a gradient or statistic wrong under sharding or stacking) shows.
FLOAT64 = (
    "import jax\n"
    "jax.config.update('jax_enable_x64', True)\n"
    "import jax.numpy as jnp\n"
    "jnp.float32 = jnp.float64\n"
)


def env(cache_dir: str | None = None, devices: int | None = None) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    e["JAX_PLATFORMS"] = "cpu"
    e["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if devices:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    else:
        e.pop("XLA_FLAGS", None)
    # One persistent compilation cache for every subprocess of the test session (conftest sets
    # it): runs of the same model, shapes and mesh in different test files compile once.
    cache_dir = os.environ.get(SESSION_CACHE) or cache_dir
    if cache_dir:
        e["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return e


def main_cmd(config: str, workdir: str, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rstpm_jax.main", f"--config={REPO}/configs/{config}",
            f"--workdir={workdir}", *overrides]


def run(cmd: list[str], env_: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env_, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def run_python(code: str, env_: dict[str, str], timeout: float = 600) -> str:
    return run([sys.executable, "-c", code], env_, timeout).stdout
