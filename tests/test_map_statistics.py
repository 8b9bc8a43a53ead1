"""The normalised fusion rules: their numerics against NumPy, the held-out statistics (from
held-out normal images only, never test images) and the config checks of their quantiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rstpm_jax import anomaly_maps, config_checks
from rstpm_jax.anomaly_maps import FUSIONS, MapSpec

SIZE = 64
RNG = np.random.default_rng(0)
MAPS = {s: {lvl: RNG.gamma(2.0, 0.3, (2, 8, 8)).astype(np.float32) for lvl in ("layer1", "layer2", "layer3")}
        for s in ("student1", "student2")}
STATS = {s: {lvl: np.array([0.5 + 0.1 * i, 1.5 + 0.2 * i + j], np.float32) for i, lvl in enumerate(levels)}
         for j, (s, levels) in enumerate(MAPS.items())}


def _normalised_numpy() -> dict[str, dict[str, np.ndarray]]:
    return {s: {lvl: (m.astype(np.float64) - STATS[s][lvl][0]) / (STATS[s][lvl][1] - STATS[s][lvl][0])
                for lvl, m in levels.items()} for s, levels in MAPS.items()}


def test_normalized_rules_match_numpy():
    norm = _normalised_numpy()
    per_level = [norm["student1"][lvl] + norm["student2"][lvl] for lvl in ("layer1", "layer2", "layer3")]
    want_sum = sum(per_level)
    want_mul = np.prod([np.log1p(np.exp(x)) for x in per_level], axis=0)  # softplus
    for name, want in (("normalized_sum", want_sum), ("normalized_multiply", want_mul)):
        rule = FUSIONS.bind(name, {"q_low": 0.8, "q_high": 0.99})
        assert anomaly_maps.needs_map_statistics(rule)
        np.testing.assert_allclose(np.asarray(rule(MAPS, stats=STATS)), want, rtol=1e-5, atol=1e-6)
    assert not anomaly_maps.needs_map_statistics(FUSIONS.bind("multiply"))
    # Through anomaly_maps(): the stats reach the rule; the per-level maps come back raw.
    pairs = {s: {lvl: (np.ones((2, 4, 4, 3), np.float32), np.ones((2, 4, 4, 3), np.float32))
                 for lvl in levels} for s, levels in MAPS.items()}
    spec = MapSpec(FUSIONS.bind("normalized_sum"), anomaly_maps.distances.DISTANCES.bind("squared_l2"))
    final, levels = anomaly_maps.anomaly_maps(pairs, (8, 8), spec, STATS)
    want = sum(-STATS[s][lvl][0] / (STATS[s][lvl][1] - STATS[s][lvl][0]) for s in MAPS for lvl in MAPS[s])
    np.testing.assert_allclose(np.asarray(final), np.full((2, 8, 8), want), rtol=1e-5)
    assert float(np.abs(np.asarray(levels["student1"]["layer1"])).max()) == 0.0


def test_map_statistics_are_the_quantiles_of_each_map():
    batches = [MAPS, {s: {lvl: m + 1.0 for lvl, m in levels.items()} for s, levels in MAPS.items()}]
    got = anomaly_maps.map_statistics(batches, 0.9, 0.995)
    for s, levels in MAPS.items():
        for lvl, m in levels.items():
            values = np.concatenate([m.reshape(-1), (m + 1.0).reshape(-1)]).astype(np.float64)
            np.testing.assert_allclose(got[s][lvl], np.quantile(values, [0.9, 0.995]), rtol=1e-6)
    flat = anomaly_maps.map_statistics([{"s": {"l": np.zeros((1, 4, 4))}}])  # constant map: no 0/0
    assert flat["s"]["l"][1] > flat["s"]["l"][0]
    arrays = anomaly_maps.stats_arrays({"maps": got})
    assert arrays["student2"]["layer3"].dtype == np.float32 and anomaly_maps.stats_arrays(None) is None
    with pytest.raises(ValueError, match="held-out"):
        anomaly_maps.map_statistics([])


def test_bad_quantiles_are_named(get_config):
    config = get_config("demo")
    config.maps.fusion = "normalized_multiply"
    config.maps.kwargs.q_low = 0.999
    config.maps.kwargs.q_high = 1.5
    config.data.holdout_fraction = 0.0
    with pytest.raises(ValueError) as e:
        config_checks.validate(config, check_files=False)
    msg = str(e.value)
    assert "maps.kwargs.q_high=1.5" in msg and "quantile in [0, 1]" in msg
    assert "data.holdout_fraction=0" in msg
    config.maps.kwargs.q_high = 0.99
    config.data.holdout_fraction = 0.1
    with pytest.raises(ValueError, match=r"maps.kwargs.q_low=0.999 must be below maps.kwargs.q_high=0.99"):
        config_checks.validate(config, check_files=False)
    config.maps.kwargs.q_low = 0.9
    config_checks.validate(config, check_files=False)
    with pytest.raises(ValueError, match="needs the held-out map statistics"):
        anomaly_maps.require_map_statistics(config.maps, None)
    anomaly_maps.require_map_statistics(get_config("mvtec").maps, None)  # the paper's rule needs none


def _mean_rgb_infer(teacher_vars, student_vars, images):
    """A stand-in model: every level map is the image's channel mean (the statistics then
    depend on exactly the pixels of the images the pass reads)."""
    m = images.mean(axis=-1)
    return {"map": m, "score": m.max(axis=(1, 2)), "levels": {"student1": {"layer1": m, "layer2": 2 * m}}}


def test_statistics_come_from_held_out_normal_images_only(tmp_path, get_config):
    import jax

    from rstpm_jax import evaluate, sharding
    from rstpm_jax.data import input_pipeline, mvtec, synthetic
    from rstpm_jax.data.sources import Source

    root = str(tmp_path / "data")
    synthetic.generate(root, seed=0, image_size=SIZE, categories=("fabric",))
    config = get_config("demo")
    config.maps.fusion = "normalized_sum"
    config.data.holdout_fraction = 0.25
    mesh = sharding.make_mesh()
    infer = jax.jit(_mean_rgb_infer)

    def stats():
        return evaluate.compute_map_statistics(config, Source(root), "fabric", infer, None, None, mesh)

    first = stats()
    assert first["split"] == "holdout" and first["quantiles"] == [0.9, 0.995]
    assert set(first["maps"]["student1"]) == {"layer1", "layer2"}
    files = mvtec.scan_category(root, "fabric", verify=False)
    train, held = input_pipeline.split_train_holdout(files.train, 0.25, int(config.seed))
    noise = np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), np.uint8)
    for item in files.test:  # every test image changed: the statistics stay
        Image.fromarray(noise).save(item.path)
    Image.fromarray(noise).save(train[0])  # a training (not held-out) image too
    assert stats() == first
    Image.fromarray(255 - noise).save(held[0])  # one held-out image changed: they move
    assert stats()["maps"] != first["maps"]
