"""Every config key checked before a run reads data or trains: names in the registries
(after ``config.plugins`` is imported), ranges, types, unknown keys, the teachers' weight files.

``validate(config)`` raises one ValueError listing every problem, each naming the key
(``config.train.epochs=0``) and what to do. Run it right after ``run.initialize``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from rstpm_jax import anomaly_maps, defaults, distances, jobs, losses, sharding
from rstpm_jax.deploy import runtime
from rstpm_jax.models import attention, resnet
from rstpm_jax.models.rstpm import DTYPES

MODES = ("train", "eval")
SELECTIONS = ("last", "best_holdout")
CACHE_MODES = ("auto", "on", "off")
# Free-form sections: keyword arguments of a registered function (checked against its signature).
FREE_FORM = ("loss.kwargs", "maps.kwargs", "maps.distance_kwargs")
WEIGHT_KEYS = {"teacher1": "teacher1_weights", "teacher2": "teacher2_weights"}


class ConfigError(ValueError):
    """An invalid config; the message lists every problem found."""


def missing_weights_message(model_cfg: Any, teacher: str) -> str:
    """What to do when ``model.<teacher>_weights`` names no file (shared with checkpoints)."""
    key, arch = WEIGHT_KEYS[teacher], model_cfg[teacher]
    path = os.path.expanduser(str(model_cfg[key]))
    return (f"config.model.{key}: converted {arch} weights not found at {path!r}. Convert "
            f"torchvision's ImageNet weights with `pip install -e \".[convert]\"` and `python -m "
            f"pretrained_conversion.convert_torchvision --arch {arch} --download --output {path}` "
            f"(or --input STATE_DICT.pth offline), or set --config.model.random_teachers=True for "
            f"a demo.")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if hasattr(d, "to_dict") and callable(d.to_dict):
        d = d.to_dict()
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in FREE_FORM:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


class _Checker:
    def __init__(self, config: ml_collections.ConfigDict):
        self.values = _flat(config)
        self.problems: list[str] = []

    def add(self, key: str, what: str) -> None:
        self.problems.append(f"config.{key}={self.values.get(key)!r}: {what}")

    def number(self, key: str, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
               hint: str = "") -> None:
        if key not in self.values:
            return
        v = self.values[key]
        kind = "an integer" if integer else "a number"
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)):
            self.add(key, f"must be {kind}{hint}.")
            return
        if not math.isfinite(v):
            self.add(key, f"must be a finite number{hint}.")
            return
        low_bad = lo is not None and (v <= lo if lo_open else v < lo)
        high_bad = hi is not None and (v >= hi if hi_open else v > hi)
        if low_bad or high_bad:
            lo_s = "" if lo is None else ("(" if lo_open else "[") + f"{lo:g}"
            hi_s = "" if hi is None else f"{hi:g}" + (")" if hi_open else "]")
            rng = (f"in {lo_s}, {hi_s}" if lo is not None and hi is not None else
                   f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else
                   f"{'<' if hi_open else '<='} {hi:g}")
            self.add(key, f"must be {rng}{hint}.")

    def choice(self, key: str, allowed, hint: str = "") -> None:
        if key in self.values and self.values[key] not in allowed:
            self.add(key, f"must be one of {sorted(allowed)}{hint}.")

    def boolean(self, key: str) -> None:
        if key in self.values and not isinstance(self.values[key], bool):
            self.add(key, "must be True or False.")

    def string(self, key: str, nonempty: bool = False) -> None:
        if key in self.values:
            v = self.values[key]
            if not isinstance(v, str) or (nonempty and not v.strip()):
                self.add(key, "must be a non-empty string." if nonempty else "must be a string.")


def _check_kwargs(c: _Checker, key: str, fn: Callable, n_positional: int, kwargs: dict) -> None:
    """``kwargs`` must be accepted by ``fn`` (after its ``n_positional`` array arguments)."""
    try:
        inspect.signature(fn).bind_partial(*([None] * n_positional), **kwargs)
    except TypeError as e:
        params = [p for p in list(inspect.signature(fn).parameters)[n_positional:]]
        c.problems.append(f"config.{key}={kwargs!r}: {e}; {getattr(fn, '__name__', fn)} takes {params}.")


def _check_map_statistics(c: _Checker, fusion: Callable) -> None:
    """A rule normalising by held-out quantiles: ``0 <= q_low < q_high <= 1``, held-out images."""
    name = c.values.get("maps.fusion")
    kwargs = dict(c.values.get("maps.kwargs") or {})
    if "stats" in kwargs:
        c.problems.append(f"config.maps.kwargs.stats: {name!r} computes its statistics from the held-out "
                          "normal images; they cannot be set in the config.")
    params = inspect.signature(fusion).parameters
    q = {}
    for key in ("q_low", "q_high"):
        v = kwargs.get(key, params[key].default if key in params else None)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            c.problems.append(f"config.maps.kwargs.{key}={v!r}: must be a quantile in [0, 1] (maps.fusion="
                              f"{name!r} normalises each map by its held-out {key} quantile).")
        else:
            q[key] = float(v)
    if len(q) == 2 and not q["q_low"] < q["q_high"]:
        c.problems.append(f"config.maps.kwargs.q_low={q['q_low']!r} must be below maps.kwargs.q_high="
                          f"{q['q_high']!r}: each map m becomes (m - q_low) / (q_high - q_low).")
    if c.values.get("data.holdout_fraction") == 0:
        c.problems.append(f"config.data.holdout_fraction=0: maps.fusion={name!r} needs held-out normal "
                          "images for its per-map statistics.")


def _check_registries(c: _Checker, config: ml_collections.ConfigDict) -> None:
    def named(key: str, registry) -> Callable | None:
        name = c.values.get(key)
        if name in registry:
            return registry.get(name)
        close = [n for n in registry.names() if n.startswith(str(name))] or difflib.get_close_matches(
            str(name), registry.names(), n=1, cutoff=0.5)
        c.add(key, f"not a registered {registry.kind}; registered: {registry.names()}"
              + (f" (did you mean {close[0]!r}?)" if close else "")
              + ". One of your own must be registered in a module config.plugins names.")
        return None

    loss = named("loss.name", losses.LOSSES)
    fusion = named("maps.fusion", anomaly_maps.FUSIONS)
    distance = named("maps.distance", distances.DISTANCES)
    loss_kwargs = dict(c.values.get("loss.kwargs") or {})
    chosen = loss_kwargs.get("distance")
    if chosen is not None and chosen not in distances.DISTANCES:
        c.problems.append(f"config.loss.kwargs.distance={chosen!r}: not a registered distance; "
                          f"registered: {distances.DISTANCES.names()}.")
    if loss is not None:
        _check_kwargs(c, "loss.kwargs", loss, 1, loss_kwargs)
    if fusion is not None:
        _check_kwargs(c, "maps.kwargs", fusion, 1, dict(c.values.get("maps.kwargs") or {}))
        if anomaly_maps.needs_map_statistics(fusion):
            _check_map_statistics(c, fusion)
    if distance is not None:
        _check_kwargs(c, "maps.distance_kwargs", distance, 2, dict(c.values.get("maps.distance_kwargs") or {}))
    if not c.problems:  # the arguments must also be hashable (bound by value)
        try:
            losses.from_config(config.loss, config.maps)
            anomaly_maps.MapSpec.from_config(config.maps)
        except ValueError as e:
            c.problems.append(str(e))


def _check_unknown(c: _Checker) -> None:
    known = set(_flat(defaults.get_config()))
    for key in sorted(set(c.values) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        c.problems.append(f"config.{key}: not a config key" + (f" (did you mean config.{close[0]}?)" if close
                                                              else "") + "; every key is in rstpm_jax/defaults.py.")


def validate(config: ml_collections.ConfigDict, *, check_files: bool | None = None) -> None:
    """Raise ConfigError naming every invalid key of ``config`` and what to do.

    ``check_files`` (default: when ``mode == "train"``): the teachers' weight files must exist
    unless ``model.random_teachers``. Needs ``config.plugins`` imported (``run.initialize``)."""
    c = _Checker(config)
    v = c.values
    _check_unknown(c)
    c.choice("mode", MODES)
    c.string("name", nonempty=True)
    c.string("plugins")
    c.number("seed", integer=True, lo=0)
    # data
    c.string("data.root", nonempty=True)
    c.string("data.categories", nonempty=True)
    c.string("data.tfds_dir")
    c.boolean("data.generate_synthetic")
    size = v.get("data.image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % 32:
        c.add("data.image_size", "must be a positive multiple of 32 (the ResNets downsample 32x), "
              "e.g. 256; set --config.data.image_size=N.")
    c.number("data.holdout_fraction", lo=0, hi=1, hi_open=True,
             hint=" (the share of train/good held out to set the thresholds)")
    # model
    archs = sorted(resnet.ARCHS)
    c.choice("model.teacher1", archs)
    for key in ("model.student1", "model.student2", "model.attention", "model.random_teachers",
                "model.fast_cpu_ops"):
        c.boolean(key)
    if not (v.get("model.student1") or v.get("model.student2")):
        c.problems.append("config.model.student1 and config.model.student2 are both False: enable at least one.")
    if v.get("model.student2"):
        if not v.get("model.teacher2"):
            c.add("model.teacher2", f"model.student2=True needs a second teacher, one of {archs}.")
        else:
            c.choice("model.teacher2", archs)
        widths = v.get("model.decoder_widths")
        if (not isinstance(widths, (list, tuple)) or len(widths) != 3
                or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)):
            c.add("model.decoder_widths", "must be 3 positive integers (student 2's widths at 1/16, 1/8, 1/4).")
    c.choice("model.attention_mode", attention.MODES)
    c.choice("model.dtype", sorted(DTYPES))
    # loss and maps
    _check_registries(c, config)
    c.number("maps.smoothing_sigma", lo=0, hint=" (Gaussian sigma in pixels; 0 = off)")
    # train
    c.number("train.epochs", integer=True, lo=1, hint=" (passes over train/good)")
    c.number("train.batch_size", integer=True, lo=1, hint=" (one job's batch, over its mesh.data devices)")
    c.number("train.learning_rate", lo=0, lo_open=True, hint=" (a negative one would train by gradient ascent)")
    c.number("train.momentum", lo=0)
    c.number("train.weight_decay", lo=0)
    c.number("train.checkpoint_every_epochs", integer=True, lo=1)
    c.number("train.keep_checkpoints", integer=True, lo=1)
    c.number("train.log_every_steps", integer=True, lo=1)
    c.choice("train.cache_teacher_features", CACHE_MODES)
    c.boolean("train.drop_last")
    c.choice("train.select_epoch", SELECTIONS)
    c.number("train.select_every_epochs", integer=True, lo=1)
    try:
        jobs.seeds_of(config)
    except ValueError as e:
        c.problems.append(str(e))
    # mesh
    c.choice("mesh.stack", sharding.STACKS)
    for key in ("mesh.model", "mesh.data"):
        value = v.get(key)
        if value != "auto" and not (str(value).isdigit() and int(value) >= 1):
            c.add(key, "must be 'auto' or a positive number of devices.")
    c.number("train.cache_max_bytes", integer=True, lo=0)
    # eval
    c.number("eval.batch_size", integer=True, lo=1)
    c.number("eval.pro_max_fpr", lo=0, hi=1, lo_open=True)
    c.boolean("eval.figures")
    c.number("eval.threshold_percentile", lo=0, hi=100, lo_open=True)
    c.number("eval.int8_max_drop", lo=0, hi=1)
    c.choice("eval.int8_calibration", tuple(runtime.INT8_CALIBRATIONS))
    c.number("eval.int8_headroom", lo=1, hi=64)
    # distributed
    c.string("distributed.coordinator_address")
    c.number("distributed.num_processes", integer=True, lo=0)
    c.number("distributed.process_id", integer=True, lo=-1)
    # each job's batch must split over its data devices
    b = v.get("train.batch_size")
    if isinstance(b, int) and not isinstance(b, bool) and b >= 1 and not c.problems:
        try:
            sharding.plan_mesh(1, b, v.get("mesh.data", "auto"), v.get("mesh.model", "auto"))
        except ValueError as e:
            c.problems.append(str(e))
    if check_files is None:
        check_files = v.get("mode") == "train"
    if check_files and v.get("model.random_teachers") is False:
        teachers = ["teacher1"] + (["teacher2"] if v.get("model.student2") else [])
        for teacher in teachers:
            path = os.path.expanduser(str(v.get(f"model.{WEIGHT_KEYS[teacher]}")))
            if v.get(f"model.{teacher}") in resnet.ARCHS and not os.path.isfile(path):
                c.problems.append(missing_weights_message(config.model, teacher))
    if c.problems:
        n = len(c.problems)
        raise ConfigError(f"Invalid config ({n} problem{'s' if n > 1 else ''}):\n  - "
                          + "\n  - ".join(c.problems))
