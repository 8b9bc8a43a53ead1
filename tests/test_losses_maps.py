"""Paper eq. 1-4 and the anomaly maps against independent numpy / scipy / torch references."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import scipy.ndimage

from rstpm_jax import anomaly_maps as am
from rstpm_jax import distances, losses
from rstpm_jax.levels import sum_over_students

RNG = np.random.default_rng(0)
LEVEL_SHAPES = {"layer1": (16, 24), "layer2": (8, 12), "layer3": (4, 6)}  # a 64x96 image


def random_pairs(widths: dict[str, tuple[int, int, int]], batch: int = 2) -> dict:
    """{student: {level: (teacher, student)}} of random NHWC float32 features."""
    pairs = {}
    for student, chans in widths.items():
        pairs[student] = {}
        for (level, (h, w)), c in zip(LEVEL_SHAPES.items(), chans):
            t = RNG.normal(size=(batch, h, w, c)).astype(np.float32)
            s = RNG.normal(size=(batch, h, w, c)).astype(np.float32)
            pairs[student][level] = (t, s)
    return pairs


# --- numpy references ----------------------------------------------------------------------

def np_distance(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Eq. 1-3 at every position: 1/2 || t/|t| - s/|s| ||^2, (B, H, W), float64."""
    t = t.astype(np.float64)
    s = s.astype(np.float64)
    t_hat = t / np.linalg.norm(t, axis=-1, keepdims=True)
    s_hat = s / np.linalg.norm(s, axis=-1, keepdims=True)
    return 0.5 * np.sum((t_hat - s_hat) ** 2, axis=-1)


def np_paper_loss(pairs: dict) -> tuple[float, dict[str, float]]:
    """Eq. 4 per image and level (mean over positions), summed over levels, averaged over images."""
    total, parts = 0.0, {}
    for student, levels in pairs.items():
        batch = next(iter(levels.values()))[0].shape[0]
        per_image = np.zeros(batch)
        for level, (t, s) in levels.items():
            h, w = t.shape[1:3]
            level_k = np.array([np_distance(t[k:k + 1], s[k:k + 1]).sum() / (h * w) for k in range(batch)])
            parts[f"{student}/{level}"] = level_k.mean()
            per_image += level_k
        parts[student] = per_image.mean()
        total += parts[student]
    return total, parts


def np_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with half-pixel centres and edge clamping (torch align_corners=False)."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = src - i0
        return i0, i1, 1.0 - w1, w1

    r0, r1, rw0, rw1 = axis(maps.shape[1], size[0])
    c0, c1, cw0, cw1 = axis(maps.shape[2], size[1])
    rows = maps[:, r0, :] * rw0[None, :, None] + maps[:, r1, :] * rw1[None, :, None]
    return rows[:, :, c0] * cw0[None, None, :] + rows[:, :, c1] * cw1[None, None, :]


# --- loss ----------------------------------------------------------------------------------

def test_paper_loss_matches_numpy_eq_1_to_4():
    pairs = random_pairs({"student1": (8, 16, 32), "student2": (32, 16, 8)})
    total, metrics = jax.jit(losses.LOSSES.get("paper"))(pairs)
    ref_total, ref_parts = np_paper_loss(pairs)
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), ref_total, rtol=1e-5, atol=1e-5)
    for key, value in ref_parts.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
    # Random unit vectors in >= 8 dims are nearly orthogonal: each level's loss is near 1/2 * 2.
    assert 0.5 * 3 * 2 < ref_total < 1.5 * 3 * 2


def test_distance_map_matches_numpy():
    t = RNG.normal(size=(3, 5, 7, 11)).astype(np.float32)
    s = RNG.normal(size=(3, 5, 7, 11)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(losses.distance_map(t, s)), np_distance(t, s), atol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.level_loss(t, s)), np_distance(t, s).mean(axis=(1, 2)),
                               atol=1e-5)


def test_loss_and_maps_vanish_for_positively_scaled_students():
    pairs = random_pairs({"student1": (8, 16, 32), "student2": (4, 4, 4)})
    scaled = {}
    for student, levels in pairs.items():
        scaled[student] = {}
        for level, (t, _) in levels.items():
            scale = RNG.uniform(0.01, 100.0, size=t.shape[:3] + (1,)).astype(np.float32)
            scaled[student][level] = (t, t * scale)
    total, _ = jax.jit(losses.paper_loss)(scaled)
    assert abs(float(total)) < 1e-6
    spec = am.MapSpec(am.FUSIONS.bind("sum"), distances.DISTANCES.bind("squared_l2"))
    final, per_level = jax.jit(am.anomaly_maps, static_argnums=(1, 2))(scaled, (64, 96), spec)
    assert final.shape == (2, 64, 96)
    np.testing.assert_allclose(np.asarray(final), 0.0, atol=1e-6)
    for m in jax.tree.leaves(per_level):
        np.testing.assert_allclose(np.asarray(m), 0.0, atol=1e-6)
    # Opposite directions give the maximum, 1/2 * ||2 t^||^2 = 2, at every position.
    t = pairs["student1"]["layer1"][0]
    np.testing.assert_allclose(np.asarray(losses.distance_map(t, -3.0 * t)), 2.0, atol=1e-5)


def test_unknown_loss_and_fusion_names_are_rejected():
    with pytest.raises(ValueError, match="loss.name 'no_such_loss'.*paper.*config.plugins"):
        losses.LOSSES.get("no_such_loss")
    with pytest.raises(ValueError, match="maps.fusion 'no_such_fusion'"):
        am.FUSIONS.get("no_such_fusion")
    with pytest.raises(ValueError, match="maps.distance"):
        distances.DISTANCES.get("no_such_distance")
    assert "paper" in losses.LOSSES.names()


# --- maps ----------------------------------------------------------------------------------

def hand_made_maps() -> dict:
    """Small integer maps per student and level, at one (output) resolution."""
    return {student: {lvl: RNG.integers(0, 5, size=(2, 4, 6)).astype(np.float32)
                      for lvl in ("layer1", "layer2", "layer3")}
            for student in ("student1", "student2")}


def test_fusion_adds_students_then_multiplies_levels():
    maps = hand_made_maps()
    a, b = maps["student1"], maps["student2"]
    expected = {lvl: a[lvl] + b[lvl] for lvl in a}
    added = sum_over_students(maps)
    for lvl in expected:
        np.testing.assert_array_equal(np.asarray(added[lvl]), expected[lvl])
    product = expected["layer1"] * expected["layer2"] * expected["layer3"]
    np.testing.assert_array_equal(np.asarray(am.FUSIONS.get("multiply")(maps)), product)
    # Not multiply-then-add: the two orders disagree on these maps.
    assert not np.array_equal(product, a["layer1"] * a["layer2"] * a["layer3"]
                              + b["layer1"] * b["layer2"] * b["layer3"])
    total = expected["layer1"] + expected["layer2"] + expected["layer3"]
    np.testing.assert_array_equal(np.asarray(am.FUSIONS.get("sum")(maps)), total)
    np.testing.assert_array_equal(np.asarray(am.image_score(product)), product.max(axis=(1, 2)))


@pytest.mark.parametrize("src,dst", [((16, 24), (64, 96)), ((4, 6), (64, 96)), ((7, 10), (64, 96)),
                                     ((3, 5), (32, 32)), ((64, 96), (16, 24))])
def test_resize_is_bilinear_half_pixel(src, dst):
    maps = RNG.normal(size=(2, *src)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(am.resize(maps, dst)), np_bilinear(maps, dst), atol=1e-5)


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    maps = RNG.normal(size=(2, 7, 10)).astype(np.float32)
    for size in ((64, 96), (28, 40), (56, 80)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=size,
                                              mode="bilinear", align_corners=False)[:, 0].numpy()
        np.testing.assert_allclose(np.asarray(am.resize(maps, size)), ref, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.5, 4.0])
def test_gaussian_smooth_matches_scipy_mirror(sigma):
    maps = RNG.uniform(size=(2, 40, 56)).astype(np.float32)
    maps[:, 3:9, 40:50] += 5.0  # a blob near the border, so edges matter
    ref = scipy.ndimage.gaussian_filter(maps.astype(np.float64), sigma=(0, sigma, sigma), mode="mirror",
                                        truncate=4.0)
    np.testing.assert_allclose(np.asarray(am.gaussian_smooth(maps, sigma)), ref, atol=1e-5)


def test_gaussian_smooth_zero_sigma_is_identity():
    maps = RNG.uniform(size=(1, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(am.gaussian_smooth(maps, 0.0)), maps)


@pytest.mark.parametrize("students", [("student1",), ("student1", "student2")])
def test_anomaly_maps_pipeline_matches_numpy(students):
    pairs = random_pairs({s: (8, 16, 32) for s in students})
    size = (64, 96)
    spec = am.MapSpec(am.FUSIONS.bind("multiply"), distances.DISTANCES.bind("squared_l2"), 2.0)
    final, per_level = jax.jit(am.anomaly_maps, static_argnums=(1, 2))(pairs, size, spec)
    levels = {}
    for student in students:
        for level, (t, s) in pairs[student].items():
            up = np_bilinear(np_distance(t, s), size)
            np.testing.assert_allclose(np.asarray(per_level[student][level]), up, atol=1e-5)
            levels[level] = levels.get(level, 0.0) + up
    fused = levels["layer1"] * levels["layer2"] * levels["layer3"]
    ref = scipy.ndimage.gaussian_filter(fused, sigma=(0, 2.0, 2.0), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(np.asarray(final), ref, rtol=1e-4, atol=1e-5)


# --- registries ----------------------------------------------------------------------------

def test_registry_refuses_duplicates_and_binds_hashably():
    from rstpm_jax.registry import Registry

    reg = Registry("widget", "widget.name")

    @reg.register("a")
    def first(x, scale=1.0):
        return x * scale

    reg.register("a")(first)  # the same function again: no-op

    def second(x):
        return x

    with pytest.raises(ValueError, match="widget 'a' is already registered by .*first.*second"):
        reg.register("a")(second)
    reg.register("a", replace=True)(second)
    assert reg.get("a") is second
    reg.register("b")(first)
    bound1 = reg.bind("b", {"scale": 2.0, "sizes": [1, 2]})
    bound2 = reg.bind("b", {"sizes": [1, 2], "scale": 2.0})
    assert bound1 == bound2 and hash(bound1) == hash(bound2)
    assert bound1 != reg.bind("b", {"scale": 3.0})
    assert reg.bind("b", {"scale": 2.0})(3.0) == 6.0
    with pytest.raises(ValueError, match="widget.name 'b'.*numbers, strings"):
        reg.bind("b", {"scale": np.zeros(3)})


def test_loss_follows_the_map_distance_unless_its_kwargs_say_otherwise():
    import ml_collections

    pairs = random_pairs({"student1": (8, 16, 32)})

    @distances.register_distance("test_l1_normalised")
    def l1(t, s):
        return jax.numpy.abs(distances.l2_normalize(t) - distances.l2_normalize(s)).sum(-1)

    def np_normalize(x):
        return x / np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)

    maps_cfg = ml_collections.ConfigDict({"distance": "test_l1_normalised", "distance_kwargs": {}})
    loss = losses.from_config(ml_collections.ConfigDict({"name": "paper", "kwargs": {}}), maps_cfg)
    total, _ = loss(pairs)
    ref = sum(float(np.mean(np.abs(np_normalize(t) - np_normalize(s)).sum(-1)))
              for t, s in pairs["student1"].values())
    np.testing.assert_allclose(float(total), ref, rtol=1e-5)
    explicit = losses.from_config(
        ml_collections.ConfigDict({"name": "paper", "kwargs": {"distance": "squared_l2"}}), maps_cfg)
    np.testing.assert_allclose(float(explicit(pairs)[0]), np_paper_loss(pairs)[0], rtol=1e-5)
