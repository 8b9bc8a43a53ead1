"""torchvision -> Flax conversion: numerical parity with torchvision and clear errors for bad input."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from pretrained_conversion import convert_torchvision as ct  # noqa: E402
from rstpm_jax.models import pretrained, resnet  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEVELS = ("layer1", "layer2", "layer3", "layer4")
SIZES = ((64, 64), (96, 128))


def _randomised_torchvision(arch: str, seed: int) -> torch.nn.Module:
    """A torchvision ResNet with random weights, random BN affine and random (but sane) running stats."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: running stats = this batch's statistics
        model.train()
        model(torch.randn(8, 3, 64, 64))
        for bn in bns:  # move the stats away from the data so eval-mode BN is non-trivial
            bn.running_mean.add_(0.3 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0))
            bn.momentum = 0.1
    return model.eval()


def _torch_features(model: torch.nn.Module, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
    feats = {}
    hooks = [getattr(model, lvl).register_forward_hook(
        lambda _m, _i, out, lvl=lvl: feats.__setitem__(lvl, out.detach().numpy().transpose(0, 2, 3, 1)))
        for lvl in LEVELS]
    try:
        with torch.no_grad():
            model(torch.from_numpy(x_nchw))
    finally:
        for h in hooks:
            h.remove()
    return feats


@functools.cache
def _jitted_apply(arch, dtype):
    return jax.jit(resnet.ResNet(arch, dtype=dtype).apply)


def _flax_features(arch, variables, x_nchw, dtype=jnp.float32):
    with jax.default_matmul_precision("highest"):
        out = _jitted_apply(arch, dtype)(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
    return {lvl: np.asarray(out[lvl], np.float32) for lvl in LEVELS}


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pretrained_conversion.convert_torchvision", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Per arch: torch model, state-dict path, converted path, loaded variables. resnet18 goes through the CLI."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("conversion")
    out = {}
    for seed, arch in enumerate(("resnet18", "resnet50")):
        model = _randomised_torchvision(arch, seed)
        src, dst = str(root / f"{arch}.pth"), str(root / f"{arch}.msgpack")
        torch.save(model.state_dict(), src)
        if arch == "resnet18":
            proc = _cli("--arch", arch, "--input", src, "--output", dst)
            assert proc.returncode == 0, proc.stderr
        else:
            ct.convert_file(src, dst, arch)
        out[arch] = {"model": model, "src": src, "dst": dst,
                     "variables": pretrained.load_pretrained(dst, arch=arch)}
    return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_parity_with_torchvision(converted, arch, size):
    c = converted[arch]
    x = np.random.default_rng(1).standard_normal((2, 3, *size)).astype(np.float32)
    ref = _torch_features(c["model"], x)
    got = _flax_features(arch, c["variables"], x)
    widths = resnet.feature_widths(arch)
    for i, lvl in enumerate(LEVELS):
        scale = 4 * 2**i
        assert got[lvl].shape == (2, size[0] // scale, size[1] // scale, widths[lvl])
        assert got[lvl].shape == ref[lvl].shape
        assert np.max(np.abs(ref[lvl])) > 1e-3 and ref[lvl].std() > 1e-4  # non-degenerate reference
        assert _rel_err(got[lvl], ref[lvl]) < 1e-4, (arch, size, lvl, _rel_err(got[lvl], ref[lvl]))


def test_running_stats_are_converted(converted):
    """Control: the same weights with fresh BN statistics do NOT match, so parity depends on them."""
    c = converted["resnet18"]
    x = np.random.default_rng(2).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref = _torch_features(c["model"], x)
    fresh = jax.tree_util.tree_map_with_path(  # what init gives: mean 0, var 1
        lambda p, v: jnp.ones_like(v) if p[-1].key == "var" else jnp.zeros_like(v), c["variables"]["batch_stats"])
    wrong = {"params": c["variables"]["params"], "batch_stats": fresh}
    assert _rel_err(_flax_features("resnet18", wrong, x)["layer1"], ref["layer1"]) > 1e-2


def test_bfloat16_close_to_float32(converted):
    c = converted["resnet18"]
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    f32 = _flax_features("resnet18", c["variables"], x)
    bf16 = _flax_features("resnet18", c["variables"], x, dtype=jnp.bfloat16)
    for lvl in LEVELS:
        assert np.all(np.isfinite(bf16[lvl]))
        assert _rel_err(bf16[lvl], f32[lvl]) < 0.1, (lvl, _rel_err(bf16[lvl], f32[lvl]))


def test_metadata_record(converted):
    c = converted["resnet18"]
    meta = pretrained.read_metadata(c["dst"])
    assert meta["arch"] == "resnet18"
    assert meta["source_file"] == os.path.abspath(c["src"])
    for key, path in (("source_sha256", c["src"]), ("output_sha256", c["dst"])):
        with open(path, "rb") as f:
            assert meta[key] == hashlib.sha256(f.read()).hexdigest()
    assert meta["torchvision_version"] == torchvision.__version__
    assert meta["converted_at"]


def test_numpy_state_dict_matches_tensor_state_dict(converted):
    sd = converted["resnet18"]["model"].state_dict()
    a = ct.convert_state_dict(sd, "resnet18")
    b = ct.convert_state_dict({k: v.numpy() for k, v in sd.items()}, "resnet18")
    jax.tree.map(np.testing.assert_array_equal, a, b)
    kernel = sd["layer2.0.downsample.0.weight"].numpy()
    np.testing.assert_array_equal(a["params"]["layer2_0"]["downsample_0"]["kernel"], kernel.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(a["batch_stats"]["bn1"]["var"], sd["bn1.running_var"].numpy())


# --- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def r18_state(converted):
    return dict(converted["resnet18"]["model"].state_dict())


def test_other_arch_is_named(converted, tmp_path, capsys):
    sd = converted["resnet50"]["model"].state_dict()
    with pytest.raises(ct.ConversionError, match="looks like torchvision resnet50, not resnet18"):
        ct.convert_state_dict(sd, "resnet18")
    out = tmp_path / "x.msgpack"  # the CLI's entry point, in process: exit code 1, message on stderr
    assert ct.main(["--arch", "resnet50", "--input", converted["resnet18"]["src"], "--output", str(out)]) == 1
    assert "error: The state dict looks like torchvision resnet18, not resnet50" in capsys.readouterr().err
    assert not out.exists()


def test_missing_key(r18_state):
    del r18_state["layer3.1.bn2.running_var"]
    with pytest.raises(ct.ConversionError, match=r"1 missing key\(s\): layer3\.1\.bn2\.running_var"):
        ct.convert_state_dict(r18_state, "resnet18")


def test_unexpected_keys_are_listed(r18_state):
    for i in range(12):
        r18_state[f"extra.{i:02d}.weight"] = torch.zeros(3)
    with pytest.raises(ct.ConversionError, match=r"12 unexpected key\(s\): extra\.00\.weight.*\(2 more\)") as e:
        ct.convert_state_dict(r18_state, "resnet18")
    assert "extra.09.weight" in str(e.value) and "extra.10.weight" not in str(e.value)


def test_ignored_keys_are_accepted(r18_state):
    assert "fc.weight" in r18_state and any(k.endswith("num_batches_tracked") for k in r18_state)
    ct.convert_state_dict(r18_state, "resnet18")


def test_wrong_shape(r18_state):
    r18_state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(ct.ConversionError,
                       match=r"layer2\.0\.conv2\.weight: expected \(128, 128, 3, 3\), got \(128, 128, 1, 1\)"):
        ct.convert_state_dict(r18_state, "resnet18")


def test_non_tensor_entries(r18_state):
    with pytest.raises(ct.ConversionError, match="epoch.*model.state_dict"):
        ct.convert_state_dict({"epoch": 3, "state_dict": r18_state}, "resnet18")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.pth")
    with pytest.raises(ct.ConversionError, match=f"not found: {path}"):
        ct.convert_file(path, str(tmp_path / "out.msgpack"), "resnet18")
    assert not os.path.exists(tmp_path / "out.msgpack")


def test_corrupt_torch_file(converted, tmp_path):
    with open(converted["resnet18"]["src"], "rb") as f:
        data = f.read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ct.ConversionError, match=f"{path} is not a readable torch state-dict file"):
        ct.convert_file(path, tmp_path / "out.msgpack", "resnet18")
    assert not os.path.exists(tmp_path / "out.msgpack")


@pytest.mark.parametrize("kind", ["text", "npy", "msgpack"])
def test_non_torch_file(converted, tmp_path, kind):
    path = tmp_path / f"weights.{kind}"
    if kind == "text":
        path.write_text("conv1.weight: 0.1 0.2\n")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:  # an already converted file passed as input
        path.write_bytes(open(converted["resnet18"]["dst"], "rb").read())
    expected = {"text": "is a text file, not a torch state dict .*conv1.weight",
                "npy": r"is not a torch file \(it starts with bytes b'\\x93NUMPY",
                "msgpack": "already converted Flax weights .*teacher1_weights"}[kind]
    with pytest.raises(ct.ConversionError, match=expected):
        ct.convert_file(path, tmp_path / "out.msgpack", "resnet18")


def test_empty_text_and_folder_output_are_clear_errors(converted, tmp_path):
    """Issue 18: a zero-byte .pth was an IndexError, a text file "KeyError: 101", --output a
    folder a raw IsADirectoryError."""
    empty, text = tmp_path / "empty.pth", tmp_path / "page.pth"
    empty.write_bytes(b"")
    text.write_text("<html><body>404 Not Found</body></html>\n")
    for path, message in ((empty, "is empty \\(0 bytes\\)"), (text, "is a text file.*404 Not Found")):
        proc = _cli("--arch", "resnet18", "--input", str(path), "--output", str(tmp_path / "o.msgpack"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert re.search(message, proc.stderr), proc.stderr
    folder = tmp_path / "weights"
    folder.mkdir()
    proc = _cli("--arch", "resnet18", "--input", converted["resnet18"]["src"], "--output", str(folder))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--output {folder} is a folder" in proc.stderr and f"{folder}/resnet18.msgpack" in proc.stderr


def test_weights_of_another_arch_as_a_teacher_say_what_the_file_holds(converted, tmp_path):
    """resnet50 weights as teacher1 (resnet18): the message names resnet50, from the sidecar or,
    without one, from the layer structure."""
    import ml_collections

    from rstpm_jax import checkpoints
    from rstpm_jax.models.rstpm import build_model

    cfg = ml_collections.ConfigDict({"teacher1": "resnet18", "teacher2": "resnet50", "student1": True,
                                     "student2": False, "attention": False, "attention_mode": "mul",
                                     "decoder_widths": (256, 128, 64), "dtype": "float32",
                                     "random_teachers": False, "fast_cpu_ops": False,
                                     "teacher1_weights": converted["resnet50"]["dst"],
                                     "teacher2_weights": ""})
    random_vars, _ = build_model(cfg).init(jax.random.key(0), (1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"config.model.teacher1='resnet18'.*holds resnet50 weights "
                                         r"\(per its sidecar .*resnet50.msgpack.json\)"):
        checkpoints.teacher_variables(cfg, random_vars)
    bare = tmp_path / "r50_no_sidecar.msgpack"
    bare.write_bytes(open(converted["resnet50"]["dst"], "rb").read())
    cfg.teacher1_weights = str(bare)
    with pytest.raises(ValueError, match=r"holds resnet50 weights \(by its layer structure"):
        checkpoints.teacher_variables(cfg, random_vars)


def test_corrupt_msgpack(converted, tmp_path):
    data = open(converted["resnet18"]["dst"], "rb").read()
    for name, payload in (("truncated", data[: len(data) // 3]), ("garbage", b"\xc1not msgpack")):
        path = tmp_path / f"{name}.msgpack"
        path.write_bytes(payload)
        with pytest.raises(ValueError, match=f"{path} is not a readable converted weight file"):
            pretrained.load_pretrained(path)


def test_load_pretrained_checks_arch(converted, tmp_path):
    dst = converted["resnet18"]["dst"]
    with pytest.raises(ValueError, match="holds resnet18 weights"):
        pretrained.load_pretrained(dst, arch="resnet50")
    bare = tmp_path / "no_metadata.msgpack"  # without the .json record the tree itself is checked
    bare.write_bytes(open(dst, "rb").read())
    with pytest.raises(ValueError,
                       match=r"does not hold resnet50 weights: .*missing variable.*layer1_0/bn3.*wrong shape"):
        pretrained.load_pretrained(bare, arch="resnet50")
    with pytest.raises(FileNotFoundError, match="convert_torchvision"):
        pretrained.load_pretrained(tmp_path / "absent.msgpack")


def test_download_offline_error(monkeypatch, tmp_path):
    def offline(self, *a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(ct.ConversionError, match=r"Could not download https://.*resnet18.*--input"):
        ct.download("resnet18")


def test_without_torch(converted, tmp_path):
    """Import and loading work with torch unavailable; converting then says how to install it."""
    code = f"""
import sys
sys.modules["torch"] = None; sys.modules["torchvision"] = None
from pretrained_conversion import convert_torchvision as ct
from rstpm_jax.models import pretrained
v = pretrained.load_pretrained({converted['resnet18']['dst']!r}, arch="resnet18")
assert v["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
try:
    ct.convert_file({converted['resnet18']['src']!r}, {str(tmp_path / 'o.msgpack')!r}, "resnet18")
except ct.ConversionError as e:
    print("ERR", e)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install -e ".[convert]"' in proc.stdout
