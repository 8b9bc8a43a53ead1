"""The feature levels the students are compared at, and the per-level sum over students.

Plain Python (works on NumPy and JAX arrays alike), so metrics, maps and figures share it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# ResNet stages a student is compared at, shallow to deep, with their scale.
COMPARED: tuple[str, ...] = ("layer1", "layer2", "layer3")
FRACTIONS: dict[str, str] = {"layer1": "1/4", "layer2": "1/8", "layer3": "1/16"}
# Key under which per-level results of the students' maps added together are reported.
SUM = "sum"


def sum_over_students(maps: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{student: {level: map}}`` -> ``{level: sum of the students' maps}`` (same-resolution
    maps of every student added; the order of levels is their first appearance)."""
    out: dict[str, Any] = {}
    for levels in maps.values():
        for level, m in levels.items():
            out[level] = out[level] + m if level in out else m
    return out
