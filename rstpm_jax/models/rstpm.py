"""Two frozen teachers and the trainable students, wired as the config names them.

Teacher variables live apart from the students' (``RSTPM.init`` returns two trees), so
an optimizer never sees the teachers and a checkpoint need not copy them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rstpm_jax.models import resnet
from rstpm_jax.models.students import COMPARED, GatedResNetStudent, ReconstructionStudent

Array = jax.Array
Features = dict[str, dict[str, Array]]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def parse_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}.")
    return DTYPES[name]


class Teachers(nn.Module):
    """Frozen ImageNet ResNets in inference mode; returns ``{"teacher1": {...}, "teacher2": {...}}``."""

    teacher1: str = "resnet18"
    teacher2: str | None = "resnet50"
    teacher1_depth: int = 4
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array) -> Features:
        feats = {"teacher1": resnet.ResNet(self.teacher1, self.teacher1_depth, self.dtype,
                                           self.conv_fn, name="teacher1")(x, train=False)}
        if self.teacher2:
            feats["teacher2"] = resnet.ResNet(self.teacher2, 3, self.dtype, self.conv_fn,
                                              name="teacher2")(x, train=False)
        return jax.tree.map(jax.lax.stop_gradient, feats)


class Students(nn.Module):
    """Student 1 (``student1``) and/or student 2 (``student2``), fed by the teachers' features."""

    teacher1: str = "resnet18"
    teacher2: str | None = "resnet50"
    use_student1: bool = True
    use_student2: bool = True
    attention: bool = True
    attention_mode: str = "mul"
    decoder_widths: tuple[int, ...] = (256, 128, 64)
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, teacher: Features, train: bool) -> Features:
        out = {}
        if self.use_student1:
            out["student1"] = GatedResNetStudent(self.teacher1, self.attention, self.attention_mode,
                                                 self.dtype, self.conv_fn, name="student1")(
                x, teacher["teacher1"], train)
        if self.use_student2:
            t2 = resnet.feature_widths(self.teacher2)
            out["student2"] = ReconstructionStudent(
                (t2["layer3"], t2["layer2"], t2["layer1"]), tuple(self.decoder_widths),
                self.attention, self.attention_mode, self.dtype, self.conv_fn, name="student2")(
                teacher["teacher1"]["layer4"], teacher["teacher2"], train)
        return out


# Which teacher each student is compared with.
TEACHER_OF = {"student1": "teacher1", "student2": "teacher2"}


@dataclasses.dataclass(frozen=True)
class RSTPM:
    """The model: ``teachers`` and ``students`` modules plus helpers to run them."""

    teachers: Teachers
    students: Students

    def init(self, rng: jax.Array, image_shape: tuple[int, int, int, int]) -> tuple[dict, dict]:
        """Random ``(teacher_variables, student_variables)`` for NHWC ``image_shape``."""
        x = jnp.zeros(image_shape, jnp.float32)
        k1, k2 = jax.random.split(rng)
        tvars = self.teachers.init(k1, x)
        tfeats = self.teachers.apply(tvars, x)
        svars = self.students.init(k2, x, tfeats, train=False)
        svars = {k: v for k, v in svars.items() if k in ("params", "batch_stats")}
        return tvars, svars

    def teacher_features(self, teacher_vars: Mapping, x: Array) -> Features:
        return self.teachers.apply(teacher_vars, x)

    def student_features(self, student_vars: Mapping, x: Array, teacher: Features, train: bool,
                         capture_attention: bool = False) -> tuple[Features, dict]:
        """Students' compared features and the updated mutable collections."""
        mutable = ["batch_stats"] if train else []
        if capture_attention:
            mutable.append("intermediates")
        if mutable:
            return self.students.apply(student_vars, x, teacher, train, mutable=mutable)
        return self.students.apply(student_vars, x, teacher, train), {}

    @property
    def student_names(self) -> tuple[str, ...]:
        return tuple(n for n, on in (("student1", self.students.use_student1),
                                     ("student2", self.students.use_student2)) if on)


def feature_pairs(teacher: Features, student: Features) -> dict[str, dict[str, tuple[Array, Array]]]:
    """``{student: {level: (teacher_feature, student_feature)}}`` for every compared level."""
    return {name: {lvl: (teacher[TEACHER_OF[name]][lvl], feats[lvl]) for lvl in COMPARED}
            for name, feats in student.items()}


def build_model(cfg: ml_collections.ConfigDict, conv_fn: Callable | None = None) -> RSTPM:
    """The model that ``cfg`` (the ``model`` section of a config) names."""
    if not (cfg.student1 or cfg.student2):
        raise ValueError("The config enables no student: set model.student1 and/or model.student2.")
    if cfg.student2 and not cfg.teacher2:
        raise ValueError("model.student2=True needs model.teacher2 (e.g. 'resnet50').")
    resnet.build(cfg.teacher1)
    if cfg.student2:
        resnet.build(cfg.teacher2)
    dtype = parse_dtype(cfg.dtype)
    teacher2 = cfg.teacher2 if cfg.student2 else None
    teachers = Teachers(cfg.teacher1, teacher2, 4 if cfg.student2 else 3, dtype, conv_fn)
    students = Students(cfg.teacher1, teacher2, bool(cfg.student1), bool(cfg.student2),
                        bool(cfg.attention), cfg.attention_mode, tuple(cfg.decoder_widths), dtype,
                        conv_fn)
    return RSTPM(teachers, students)
