"""Shared pytest fixtures (keep them small and generic; add, don't rewrite)."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

import ml_collections
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `configs` is a top-level package of the repository
    sys.path.insert(0, REPO_ROOT)

# One persistent compilation cache for the session's subprocesses (tests/_train_helpers.env),
# made by the first process (pytest-xdist's workers inherit it) and removed by it at the end.
_OWN_CACHE = None
if "RSTPM_TEST_JAX_CACHE" not in os.environ:
    _OWN_CACHE = os.environ["RSTPM_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="rstpm_jax_cache_")


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


# The model configs of the paper's ablations (configs/<name>.py).
MODEL_CONFIGS = ("mvtec", "stpm", "stpm_attention", "rstpm_no_attention", "rstpm_r18_r18",
                 "rstpm_r50_r50")


def load_config(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s ``get_config()``."""
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.fixture(scope="session")
def get_config() -> Callable[[str], ml_collections.ConfigDict]:
    """A loader of ``configs/<name>.py`` configs (a fresh ConfigDict per call)."""
    return load_config


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> str:
    """The synthetic categories (``rstpm_jax.data.synthetic``, default size), shared read-only."""
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("data") / "synthetic")
    synthetic.generate(root, seed=0)
    return root
