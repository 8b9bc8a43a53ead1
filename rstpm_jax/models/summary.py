"""Parameter counts of each part of the model a config names, at no compute cost.

    python -m rstpm_jax.models.summary --config configs/mvtec.py [--config.model.attention=False] [--json]

Counts are trainable *parameters* only (``params``); BatchNorm running statistics
(``batch_stats``) are reported apart. Attention gates (the ``attention_*`` submodules of
the students) are counted on their own, so ``student1 + student2 + attention ==
trainable``. A teacher used only to ``layer3`` (teacher 2 always; teacher 1 when there is
no student 2) is built truncated: its count is the truncated one, and the full
ResNet's count (to ``layer4``, without ``fc``) is reported beside it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from rstpm_jax.models import resnet, rstpm

KEYS = ("teacher1", "teacher2", "student1", "student2", "attention", "trainable", "frozen")


def _size(tree: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _model_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.model if "model" in config else config


def _abstract_variables(config: ml_collections.ConfigDict) -> tuple[rstpm.RSTPM, dict, dict]:
    cfg = _model_section(config)
    model = rstpm.build_model(cfg)
    # Parameter shapes do not depend on the image size; any multiple of 32 will do.
    init = functools.partial(model.init, image_shape=(1, 64, 64, 3))
    tvars, svars = jax.eval_shape(init, jax.random.key(0))
    return model, tvars, svars


def _split_student(params: Mapping[str, Any]) -> tuple[int, int]:
    """(non-attention, attention) parameter counts of one student's tree."""
    gate = sum(_size(v) for k, v in params.items() if k.startswith("attention_"))
    return _size(params) - gate, gate


def count_parameters(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Parameter counts: teacher1, teacher2, student1, student2, attention, trainable, frozen.

    ``config`` is a full config (with a ``model`` section) or the ``model`` section alone.
    Absent parts count 0; teachers are counted as built (possibly truncated to ``layer3``).
    """
    _, tvars, svars = _abstract_variables(config)
    return _counts(tvars, svars)


def _counts(tvars: Mapping[str, Any], svars: Mapping[str, Any]) -> dict[str, int]:
    tparams, sparams = tvars["params"], svars["params"]
    counts = {name: _size(tparams.get(name, {})) for name in ("teacher1", "teacher2")}
    counts["attention"] = 0
    for name in ("student1", "student2"):
        own, gate = _split_student(sparams.get(name, {}))
        counts[name] = own
        counts["attention"] += gate
    counts["trainable"] = _size(sparams)
    counts["frozen"] = _size(tparams)
    return {k: counts[k] for k in KEYS}


def full_resnet_parameters(arch: str, depth: int = 4) -> int:
    """Parameters of a torchvision-layout ResNet to ``layer{depth}`` (no ``fc``)."""
    net = resnet.build(arch, depth=depth)
    variables = jax.eval_shape(net.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    return _size(variables["params"])


def parameter_report(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``count_parameters`` plus batch-stat sizes and each teacher's depth and full count."""
    cfg = _model_section(config)
    model, tvars, svars = _abstract_variables(config)
    report: dict[str, Any] = {"counts": _counts(tvars, svars)}
    teachers = {}
    for name, arch, depth in (("teacher1", model.teachers.teacher1, model.teachers.teacher1_depth),
                              ("teacher2", model.teachers.teacher2, 3)):
        if arch:
            teachers[name] = {"arch": arch, "depth": depth,
                              "full": full_resnet_parameters(arch, 4)}
    report["teachers"] = teachers
    report["batch_stats"] = {"teachers": _size(tvars.get("batch_stats", {})),
                             "students": _size(svars.get("batch_stats", {}))}
    report["attention_mode"] = cfg.attention_mode if cfg.attention else None
    return report


def format_report(report: Mapping[str, Any]) -> str:
    counts, teachers = report["counts"], report["teachers"]
    lines = [f"{'part':<12}{'parameters':>14}  note"]
    for key in KEYS:
        note = ""
        if key in teachers:
            t = teachers[key]
            note = f"{t['arch']}"
            if t["depth"] < 4:
                note += (f", truncated to layer{t['depth']} (full ResNet to layer4 without fc: "
                         f"{t['full']:,})")
        elif key == "attention" and report["attention_mode"]:
            note = f"gates inside the students, mode {report['attention_mode']!r}"
        elif key in ("student1", "student2") and counts[key] == 0:
            note = "absent"
        elif key == "trainable":
            note = "student1 + student2 + attention"
        elif key == "frozen":
            note = "teacher1 + teacher2"
        lines.append(f"{key:<12}{counts[key]:>14,}  {note}".rstrip())
    stats = report["batch_stats"]
    lines.append(f"BatchNorm running statistics (not counted above): teachers {stats['teachers']:,}, "
                 f"students {stats['students']:,}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"Unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if config is None:
        raise SystemExit("Pass --config=configs/<name>.py (e.g. configs/mvtec.py).")
    if flags.FLAGS.json:
        print(json.dumps(count_parameters(config)))
    else:
        print(format_report(parameter_report(config)))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_bool("json", False, "Print one JSON object of parameter counts.")
    app.run(main)
