"""The paper's ablations as edits of a config (so a sweep keeps the user's data/train keys)."""

from collections.abc import Callable

import ml_collections


def rstpm(c: ml_collections.ConfigDict) -> None:
    """Full RSTPM (the paper's method): nothing to change."""
    c.name = "rstpm"


def stpm(c: ml_collections.ConfigDict) -> None:
    """Original STPM: student 1 only, no attention."""
    c.name = "stpm"
    c.model.student2 = False
    c.model.attention = False


def stpm_attention(c: ml_collections.ConfigDict) -> None:
    c.name = "stpm_attention"
    c.model.student2 = False
    c.model.attention = True


def rstpm_no_attention(c: ml_collections.ConfigDict) -> None:
    """Paper Table 5."""
    c.name = "rstpm_no_attention"
    c.model.attention = False


def rstpm_r18_r18(c: ml_collections.ConfigDict) -> None:
    """Paper Table 4: ResNet18 for both teachers."""
    c.name = "rstpm_r18_r18"
    c.model.teacher1 = "resnet18"
    c.model.teacher2 = "resnet18"
    c.model.teacher2_weights = c.model.teacher1_weights


def rstpm_r50_r50(c: ml_collections.ConfigDict) -> None:
    """Paper Table 4: ResNet50 for both teachers (student 1 is then a ResNet50)."""
    c.name = "rstpm_r50_r50"
    c.model.teacher1 = "resnet50"
    c.model.teacher2 = "resnet50"
    c.model.teacher1_weights = c.model.teacher2_weights


ABLATIONS: dict[str, Callable[[ml_collections.ConfigDict], None]] = {
      f.__name__: f for f in (stpm, stpm_attention, rstpm_no_attention, rstpm_r18_r18, rstpm_r50_r50, rstpm)
}
