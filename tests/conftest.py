"""Shared pytest fixtures (keep them small and generic; add, don't rewrite)."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

import ml_collections
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `configs` is a top-level package of the repository
    sys.path.insert(0, REPO_ROOT)

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
