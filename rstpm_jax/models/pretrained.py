"""Converted torchvision weights: loading, checking against the architecture, truncating."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from rstpm_jax.models import resnet


def expected_shapes(arch: str) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of ``ResNet(arch)`` as ShapeDtypeStructs (no compute)."""
    model = resnet.build(arch)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _check_variables(variables: dict[str, Any], arch: str, path: str) -> None:
    want = {"/".join(k): tuple(v.shape)
            for k, v in traverse_util.flatten_dict(dict(expected_shapes(arch))).items()}
    got = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}
    problems = []
    for label, keys in (("missing", sorted(set(want) - set(got))), ("unexpected", sorted(set(got) - set(want)))):
        if keys:
            problems.append(f"{len(keys)} {label} variable(s): {', '.join(keys[:10])}"
                            + (" ..." if len(keys) > 10 else ""))
    wrong = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {'; '.join(wrong[:10])}" + (" ..." if len(wrong) > 10 else ""))
    if problems:
        raise ValueError(f"{path} does not hold {arch} weights: {'. '.join(problems)}. "
                         f"Reconvert it with --arch {arch}.")


def load_pretrained(path: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """Load converted torchvision weights (``params`` + ``batch_stats``); no torch needed.

    With ``arch`` the tree is checked against ``ResNet(arch)`` (names and shapes), and against
    the arch in the metadata record ``<path>.json`` when there is one.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Converted teacher weights not found: {path}. Convert torchvision weights with "
            "`python -m pretrained_conversion.convert_torchvision --arch resnet18 --download "
            f"--output {path}` (needs the 'convert' extra and internet), or pass a state dict "
            "with --input.")
    if arch is not None:
        resnet.arch_spec(arch)
        meta = read_metadata(path)
        if meta and meta.get("arch") not in (None, arch):
            raise ValueError(f"{path} holds {meta['arch']} weights (per {path}.json), but {arch} was asked for.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        variables = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable converted weight file (msgpack: {e}); "
                         "reconvert it with pretrained_conversion.convert_torchvision.") from e
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"{path} does not hold 'params' and 'batch_stats'; reconvert it.")
    for key, leaf in traverse_util.flatten_dict(variables).items():
        if not (isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)):
            raise ValueError(f"{path}: variable {'/'.join(key)} is not a float array; reconvert it.")
    if arch is not None:
        _check_variables(variables, arch, path)
    return jax.tree.map(jnp.asarray, variables)


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata record written beside converted weights (``<path>.json``), if any."""
    meta = os.fspath(path) + ".json"
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Weight metadata {meta} is unreadable ({e}); reconvert or delete it.") from e
    if not isinstance(record, dict):
        raise ValueError(f"Weight metadata {meta} is not a JSON object; reconvert or delete it.")
    return record


def guess_arch(variables: dict[str, Any]) -> str | None:
    """The ResNet a converted tree looks like (blocks per stage, bottleneck or basic), or None."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for name, block in (variables.get("params") or {}).items():
        if name.startswith("layer") and "_" in name:
            stage = int(name[len("layer"):name.index("_")])
            blocks[stage] = blocks.get(stage, 0) + 1
            bottleneck |= "conv3" in block
    sizes = tuple(blocks.get(i, 0) for i in range(1, 5))
    kind = "bottleneck" if bottleneck else "basic"
    return next((a for a, spec in resnet.ARCHS.items() if spec == (kind, sizes)), None)


def describe(path: str | os.PathLike, variables: dict[str, Any] | None = None) -> str | None:
    """What a converted weight file holds: "resnet50 (per its sidecar X.json)", or from the tree."""
    try:
        meta = read_metadata(path)
    except ValueError:
        meta = None
    if meta and meta.get("arch"):
        return f"{meta['arch']} weights (per its sidecar {os.fspath(path)}.json)"
    arch = guess_arch(variables) if variables is not None else None
    return f"{arch} weights (by its layer structure; no sidecar)" if arch else None


def truncate_variables(variables: dict[str, Any], depth: int) -> dict[str, Any]:
    """Drop stages deeper than ``depth`` (e.g. ``layer4`` of a teacher used to ``layer3``)."""
    drop = {f"layer{i}_" for i in range(depth + 1, 5)}
    return {
        col: {k: v for k, v in tree.items() if not any(k.startswith(d) for d in drop)}
        for col, tree in variables.items()
    }
