"""Convert torchvision ResNet state dicts into Flax variables for ``rstpm_jax.models.resnet``.

    python -m pretrained_conversion.convert_torchvision --arch resnet18 --input resnet18.pth \
        --output weights/resnet18.msgpack
    python -m pretrained_conversion.convert_torchvision --arch resnet50 --download \
        --output weights/resnet50.msgpack

The output is ONE ``flax.serialization`` msgpack file holding ``{"params", "batch_stats"}``
(read it with ``rstpm_jax.models.pretrained.load_pretrained``, no torch needed) plus a metadata
record ``<output>.json``. torch/torchvision are imported only inside the functions that need
them, so this module imports without the ``convert`` extra.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from rstpm_jax.models import resnet

INSTALL_HINT = 'pip install -e ".[convert]"'
# Keys that torchvision has and the feature extractor does not use.
IGNORED_SUFFIXES = (".num_batches_tracked",)
IGNORED_PREFIXES = ("fc.",)
# Flax leaf name -> torchvision parameter name, per collection.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MAX_LISTED = 10


class ConversionError(ValueError):
    """A state dict or file that cannot be converted; the message says why and what to do."""


def _import_torch() -> Any:
    try:
        import torch  # noqa: PLC0415 (the optional convert extra)
        import torchvision  # noqa: F401, PLC0415 - the convert extra installs both
    except ImportError as e:
        raise ConversionError(
            f"Converting torchvision weights needs torch and torchvision: {INSTALL_HINT}") from e
    return torch


def _flax_name_to_torch(module: str) -> str:
    """``layer1_0`` -> ``layer1.0``, ``downsample_1`` -> ``downsample.1``; others unchanged."""
    return re.sub(r"^(layer\d|downsample)_(\d+)$", r"\1.\2", module)


def expected_layout(arch: str) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torchvision key -> (Flax path incl. collection, expected torchvision shape) for ``arch``."""

    model = resnet.build(arch)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    layout = {}
    for path, leaf in traverse_util.flatten_dict(dict(shapes)).items():
        collection, *modules, leaf_name = path
        if (collection, leaf_name) not in _LEAF_NAMES:
            raise AssertionError(f"Unexpected Flax variable {'/'.join(path)} in {arch}.")
        key = ".".join([_flax_name_to_torch(m) for m in modules] + [_LEAF_NAMES[collection, leaf_name]])
        shape = tuple(leaf.shape)
        if leaf_name == "kernel":  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        layout[key] = (tuple(path), shape)
    return layout


def guess_arch(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]] | None = None) -> str | None:
    """The torchvision ResNet a set of state-dict keys looks like, or None."""
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for key in keys:
        m = re.match(r"^layer([1-4])\.(\d+)\.(\w+)", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
            bottleneck |= m.group(3) == "conv3"
    sizes = tuple(len(blocks.get(i, ())) for i in range(1, 5))
    kind = "bottleneck" if bottleneck else "basic"
    for name, spec in resnet.ARCHS.items():
        if spec == (kind, sizes):
            wide = shapes is not None and shapes.get("layer1.0.conv1.weight", (64,))[0] == 128
            return f"wide_{name}_2" if wide and kind == "bottleneck" else name
    return None


def _listing(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _to_numpy(key: str, value: Any) -> np.ndarray:
    """A tensor or array as float32 numpy; torch is used only if the value is a tensor."""
    if hasattr(value, "detach"):  # torch.Tensor without importing torch
        if not value.is_floating_point():
            raise ConversionError(f"State-dict entry {key!r} has dtype {value.dtype}; expected floats.")
        value = value.detach().cpu().float().numpy()
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ConversionError(f"State-dict entry {key!r} has dtype {arr.dtype}; expected floats.")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ConversionError(f"State-dict entry {key!r} holds NaN or inf values; the source is corrupt.")
    return arr


def convert_state_dict(state_dict: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """A torchvision ResNet state dict -> ``{"params": ..., "batch_stats": ...}`` (numpy float32).

    Raises ConversionError naming the other architecture, missing/unexpected keys or wrong shapes.
    """

    if not isinstance(state_dict, Mapping):
        raise ConversionError("Expected a state dict (a mapping of names to tensors), got "
                              f"{type(state_dict).__name__}.")
    nontensor = [k for k, v in state_dict.items() if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if nontensor or not all(isinstance(k, str) for k in state_dict):
        raise ConversionError(
            f"Not a plain state dict: entries {_listing([str(k) for k in nontensor])} are not tensors. "
            "If this is a training checkpoint, save `model.state_dict()` instead.")
    layout = expected_layout(arch)
    keys = [k for k in state_dict if not (k.startswith(IGNORED_PREFIXES) or k.endswith(IGNORED_SUFFIXES))]
    shapes = {k: tuple(state_dict[k].shape) for k in keys}
    looks_like = guess_arch(keys, shapes)
    if looks_like is not None and looks_like != arch:
        raise ConversionError(
            f"The state dict looks like torchvision {looks_like}, not {arch}; pass --arch {looks_like} "
            f"(supported: {sorted(resnet.ARCHS)}) or the {arch} weights.")
    missing = sorted(set(layout) - set(keys))
    unexpected = sorted(set(keys) - set(layout))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        hint = (" (keys carry a 'module.' prefix from DataParallel: save `model.module.state_dict()`)"
                if all(k.startswith("module.") for k in keys) else "")
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}{hint}")
    wrong = [f"{k}: expected {layout[k][1]}, got {shapes[k]}"
             for k in sorted(set(layout) & set(keys)) if shapes[k] != layout[k][1]]
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): " + "; ".join(wrong[:_MAX_LISTED])
                        + (f"; ... ({len(wrong) - _MAX_LISTED} more)" if len(wrong) > _MAX_LISTED else ""))
    if problems:
        raise ConversionError(f"State dict does not match torchvision {arch}: " + ". ".join(problems) + ".")
    flat = {}
    for key, (path, _) in layout.items():
        arr = _to_numpy(key, state_dict[key])
        flat[path] = arr.transpose(2, 3, 1, 0) if path[-1] == "kernel" else arr  # OIHW -> HWIO
    return traverse_util.unflatten_dict(flat)


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip format; the legacy pickle format


def _check_torch_file(path: str) -> None:
    """Clear errors for files that cannot be torch files: empty, text, other formats."""
    with open(path, "rb") as f:
        head = f.read(512)
    fix = "Save one with `torch.save(model.state_dict(), path)` or use --download."
    if not head:
        raise ConversionError(f"{path} is empty (0 bytes): an interrupted download or copy? {fix}")
    if head.startswith(_TORCH_MAGIC) or head[257:262] == b"ustar":  # zip, pickle, very old tar format
        return
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        raise ConversionError(f"{path} is a text file, not a torch state dict (it starts with "
                              f"{text[:60]!r}; an HTML error page or a Git LFS pointer?). {fix}")
    if head[:1] == b"\x82" and (b"params" in head or b"batch_stats" in head):
        raise ConversionError(f"{path} is not a torch file but already converted Flax weights (msgpack "
                              "{params, batch_stats}): use it directly as config.model.teacher1_weights / "
                              "teacher2_weights.")
    raise ConversionError(f"{path} is not a torch file (it starts with bytes {head[:8]!r}, not a "
                          f"zip or pickle header). {fix}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a torch state-dict file safely (``weights_only=True``); clear errors for bad files."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"Input state dict not found: {path}. Pass a torchvision .pth file or use --download.")
    _check_torch_file(path)
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        first = (str(e).splitlines() or [""])[0][:200]
        raise ConversionError(
            f"{path} is not a readable torch state-dict file ({type(e).__name__}: {first}). "
            "Save one with `torch.save(model.state_dict(), path)` or use --download.") from e
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict; "
                              "save `model.state_dict()`.")
    return dict(obj)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def convert_file(input: str | os.PathLike, output: str | os.PathLike, arch: str,  # noqa: A002
                 *, source_url: str | None = None) -> dict[str, Any]:
    """Convert the state dict at ``input`` into ``output`` (msgpack) + ``output.json``; returns the metadata."""

    resnet.build(arch)  # unknown arch -> ValueError before reading anything
    input, output = os.fspath(input), os.fspath(output)
    if os.path.isdir(output):
        raise ConversionError(f"--output {output} is a folder; give the file to write, e.g. "
                              f"{os.path.join(output, arch + '.msgpack')} (its metadata goes beside it as .json).")
    variables = convert_state_dict(load_state_dict_file(input), arch)
    _atomic_write(output, serialization.msgpack_serialize(variables))
    try:
        import torch  # noqa: PLC0415 (the optional convert extra)
        import torchvision  # noqa: PLC0415 (the optional convert extra)
        versions = {"torch_version": torch.__version__, "torchvision_version": torchvision.__version__}
    except ImportError:
        versions = {"torch_version": None, "torchvision_version": None}
    meta = {
        "arch": arch,
        "format": "flax.serialization.msgpack {params, batch_stats}",
        "source_file": os.path.abspath(input),
        "source_url": source_url,
        "source_sha256": _sha256(input),
        "output_sha256": _sha256(output),
        **versions,
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    _atomic_write(output + ".json", (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def download(arch: str, weights: str = "IMAGENET1K_V1") -> tuple[str, str]:
    """Fetch torchvision's ``weights`` for ``arch`` into torch's hub cache; returns (file, url)."""
    torch = _import_torch()
    import torchvision  # noqa: PLC0415 (the optional convert extra)

    try:
        enum = torchvision.models.get_model_weights(arch)[weights]
    except (KeyError, ValueError) as e:
        raise ConversionError(f"torchvision has no {weights!r} weights for {arch}.") from e
    try:
        enum.get_state_dict(progress=True, check_hash=True)
    except OSError as e:  # urllib.error.URLError is an OSError
        raise ConversionError(
            f"Could not download {enum.url} ({e}); are you offline? Fetch that file on a machine "
            "with internet and pass it with --input.") from e
    except RuntimeError as e:  # e.g. hash mismatch of a partial download
        raise ConversionError(f"Downloading {enum.url} failed: {e}") from e
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
    if not os.path.isfile(path):
        raise ConversionError(f"torchvision downloaded {enum.url} but {path} is missing; pass it with --input.")
    return path, enum.url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrained_conversion.convert_torchvision",
        description="Convert torchvision ResNet weights to rstpm-jax Flax variables (msgpack).")
    parser.add_argument("--arch", required=True, choices=sorted(resnet.ARCHS))
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="torchvision state dict (.pth), e.g. torch.save(model.state_dict())")
    src.add_argument("--download", action="store_true", help="fetch torchvision's ImageNet weights")
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="torchvision weights name for --download")
    parser.add_argument("--output", required=True, help="output .msgpack; metadata goes to OUTPUT.json")
    args = parser.parse_args(argv)
    try:
        url = None
        source = args.input
        if args.download:
            source, url = download(args.arch, args.weights)
        meta = convert_file(source, args.output, args.arch, source_url=url)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {args.output} ({args.arch}, sha256 {meta['output_sha256'][:12]}) and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
