"""Two frozen teachers and the trainable students, wired as the config names them.

Teacher variables live apart from the students' (``RSTPM.init`` returns two trees), so
an optimizer never sees the teachers and a checkpoint need not copy them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rstpm_jax.levels import COMPARED
from rstpm_jax.models import resnet
from rstpm_jax.models.layers import BatchNorm, ModuleDef
from rstpm_jax.models.students import GatedResNetStudent, ReconstructionStudent

Array = jax.Array
Features = dict[str, dict[str, Array]]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}
# Which teacher each student is compared with.
TEACHER_OF = {"student1": "teacher1", "student2": "teacher2"}


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
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: Array) -> Features:
        layers = dict(dtype=self.dtype, conv=self.conv, norm=self.norm, pool=self.pool)
        feats = {"teacher1": resnet.ResNet(self.teacher1, self.teacher1_depth, **layers,
                                           name="teacher1")(x, train=False)}
        if self.teacher2:
            feats["teacher2"] = resnet.ResNet(self.teacher2, 3, **layers, name="teacher2")(x, train=False)
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
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    conv_transpose: ModuleDef = nn.ConvTranspose
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: Array, teacher: Features, train: bool) -> Features:
        gates = dict(attention=self.attention, attention_mode=self.attention_mode, dtype=self.dtype,
                     conv=self.conv, norm=self.norm)
        out = {}
        if self.use_student1:
            out["student1"] = GatedResNetStudent(self.teacher1, **gates, pool=self.pool,
                                                 name="student1")(x, teacher["teacher1"], train)
        if self.use_student2:
            t2 = resnet.feature_widths(self.teacher2)
            out["student2"] = ReconstructionStudent(
                target_widths=(t2["layer3"], t2["layer2"], t2["layer1"]),
                widths=tuple(self.decoder_widths), **gates, conv_transpose=self.conv_transpose,
                name="student2")(teacher["teacher1"]["layer4"], teacher["teacher2"], train)
        return out


@dataclasses.dataclass(frozen=True)
class RSTPM:
    """The model: ``teachers`` and ``students`` modules plus helpers to run them."""

    teachers: Teachers
    students: Students

    def init(self, rng: jax.Array, image_shape: tuple[int, int, int, int]) -> tuple[dict, dict]:
        """Random ``(teacher_variables, student_variables)`` for NHWC ``image_shape``."""
        return self.init_teachers(rng, image_shape), self.init_students(rng, image_shape)

    def init_teachers(self, rng: jax.Array, image_shape: tuple[int, int, int, int]) -> dict:
        """``init``'s random teacher variables alone."""
        k1, _ = jax.random.split(rng)
        return self.teachers.init(k1, jnp.zeros(image_shape, jnp.float32))

    def init_students(self, rng: jax.Array, image_shape: tuple[int, int, int, int]) -> dict:
        """``init``'s student variables alone (``params``, ``batch_stats``).

        Their values depend on the teachers' feature shapes only, so the teachers are neither
        initialised nor run: zeros of those shapes stand in for their features."""
        k1, k2 = jax.random.split(rng)
        x = jnp.zeros(image_shape, jnp.float32)
        shapes = jax.eval_shape(lambda: self.teachers.apply(self.teachers.init(k1, x), x))
        tfeats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        svars = self.students.init(k2, x, tfeats, train=False)
        return {k: v for k, v in svars.items() if k in ("params", "batch_stats")}

    def teacher_features(self, teacher_vars: Mapping, x: Array) -> Features:
        return self.teachers.apply(teacher_vars, x)

    def student_features(self, student_vars: Mapping, x: Array, teacher: Features, train: bool,
                         capture_attention: bool = False) -> tuple[Features, dict]:
        """Students' compared features and the updated mutable collections (``batch_stats`` when
        training; ``intermediates`` with the attention maps when ``capture_attention``)."""
        mutable = ["batch_stats"] if train else []
        if capture_attention:
            mutable.append("intermediates")
        if mutable:
            return self.students.apply(student_vars, x, teacher, train, mutable=mutable)
        return self.students.apply(student_vars, x, teacher, train), {}

    @property
    def has_attention(self) -> bool:
        return bool(self.students.attention)


def feature_pairs(teacher: Features, student: Features) -> dict[str, dict[str, tuple[Array, Array]]]:
    """``{student: {level: (teacher_feature, student_feature)}}`` for every compared level."""
    return {name: {lvl: (teacher[TEACHER_OF[name]][lvl], feats[lvl]) for lvl in COMPARED}
            for name, feats in student.items()}


def attention_maps(intermediates: Mapping) -> dict[str, dict[str, Array]]:
    """``{student: {level: (B, h, w)}}`` from the ``intermediates`` a gated forward pass sowed."""
    out = {}
    for student, modules in intermediates.items():
        for name, sown in modules.items():
            if name.startswith("attention_"):
                out.setdefault(student, {})[name[len("attention_"):]] = sown["attention"][0][..., 0]
    return out


def build_model(cfg: ml_collections.ConfigDict, *, fast_cpu_ops: bool | None = None) -> RSTPM:
    """The model that ``cfg`` (the ``model`` section of a config) names.

    On a CPU backend, with ``model.fast_cpu_ops`` (default) or ``fast_cpu_ops=True``, the
    layers are ``rstpm_jax.ops.layers``' (same variables and numbers, faster gradients on
    XLA:CPU); otherwise flax's own.
    """
    if not (cfg.student1 or cfg.student2):
        raise ValueError("The config enables no student: set model.student1 and/or model.student2.")
    if cfg.student2 and not cfg.teacher2:
        raise ValueError("model.student2=True needs model.teacher2 (e.g. 'resnet50').")
    resnet.arch_spec(cfg.teacher1)
    if cfg.student2:
        resnet.arch_spec(cfg.teacher2)
    dtype = parse_dtype(cfg.dtype)
    fast = bool(cfg.get("fast_cpu_ops", True)) if fast_cpu_ops is None else fast_cpu_ops
    layers: dict[str, Any] = {}
    if fast and jax.default_backend() == "cpu":
        from rstpm_jax.ops.layers import CPU_LAYERS  # noqa: PLC0415
        layers = dict(CPU_LAYERS)
    teacher2 = cfg.teacher2 if cfg.student2 else None
    teachers = Teachers(cfg.teacher1, teacher2, 4 if cfg.student2 else 3, dtype,
                        **{k: v for k, v in layers.items() if k != "conv_transpose"})
    students = Students(cfg.teacher1, teacher2, use_student1=bool(cfg.student1),
                        use_student2=bool(cfg.student2), attention=bool(cfg.attention),
                        attention_mode=cfg.attention_mode, decoder_widths=tuple(cfg.decoder_widths),
                        dtype=dtype, **layers)
    return RSTPM(teachers, students)
