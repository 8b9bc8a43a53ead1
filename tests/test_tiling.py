"""Tiling (rstpm_jax.data.tiling) and the tiled input pipeline: every pixel covered, tiles cut
where the grid says, stitching the inverse of cutting (overlaps averaged), a stitched model
map equal to the untiled one when the tile is the image, and tf.data's tiles equal NumPy's."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rstpm_jax.data import tiling
from rstpm_jax.data.tiling import Stitcher, TileSpec


def test_spec_validation_and_config():
    assert TileSpec(64).stride == 64 and TileSpec(64, 32).stride == 32
    for bad in ((0, 0), (48, 0), (64, 65), (64, -1)):
        with pytest.raises(ValueError):
            TileSpec(*bad)

    class Cfg(dict):
        def get(self, k, d=None):
            return dict.get(self, k, d)
    assert TileSpec.from_config(Cfg(tile_size=0, tile_stride=0)) is None
    assert TileSpec.from_config(Cfg(tile_size=96, tile_stride=64)) == TileSpec(96, 64)


@pytest.mark.parametrize("length,size,stride", [(100, 32, 32), (100, 32, 16), (96, 32, 32), (32, 32, 8),
                                                (20, 32, 32), (257, 64, 48)])
def test_starts_cover_every_pixel_and_stay_inside(length, size, stride):
    s = tiling.starts(length, size, stride)
    padded = max(length, size)
    assert s[0] == 0 and s[-1] == padded - size  # the last tile is aligned with the far edge
    assert all(b > a for a, b in zip(s, s[1:])) and all(b - a <= stride for a, b in zip(s, s[1:]))
    covered = np.zeros(padded, int)
    for a in s:
        covered[a:a + size] += 1
    assert covered.min() >= 1


@pytest.mark.parametrize("shape,spec", [((100, 70, 3), TileSpec(32, 32)), ((100, 70, 3), TileSpec(32, 16)),
                                        ((20, 50), TileSpec(32, 32)), ((64, 64, 3), TileSpec(64))])
def test_stitch_inverts_tiling(shape, spec):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tiles, pos = tiling.tile_image(x, spec)
    assert tiles.shape == (tiling.num_tiles(*shape[:2], spec), spec.size, spec.size, *shape[2:])
    padded = tiling.pad_to_tile(x, spec)
    for t, (y, xx) in zip(tiles, pos):
        np.testing.assert_array_equal(t, padded[y:y + spec.size, xx:xx + spec.size])
    np.testing.assert_allclose(tiling.stitch(tiles, pos, *shape[:2], spec), x, rtol=1e-6, atol=1e-7)
    batched = list(tiling.tile_batches(x, spec, 5))
    assert max(len(b) for b, _ in batched) <= 5
    np.testing.assert_array_equal(np.concatenate([b for b, _ in batched]), tiles)


def test_overlaps_are_averaged():
    spec = TileSpec(32, 16)
    pos = tiling.grid(48, 32, spec)  # two tiles overlapping in rows 16..31
    tiles = np.stack([np.full((32, 32), 1.0), np.full((32, 32), 3.0)]).astype(np.float32)
    out = tiling.stitch(tiles, pos, 48, 32, spec)
    np.testing.assert_array_equal(out[:16], 1.0)
    np.testing.assert_array_equal(out[16:32], 2.0)
    np.testing.assert_array_equal(out[32:], 3.0)


def test_stitcher_streams_interleaved_images():
    spec = TileSpec(32, 16)
    rng = np.random.default_rng(1)
    images = {k: rng.standard_normal((h, w, 3)).astype(np.float32) for k, (h, w) in
              enumerate([(64, 48), (40, 96), (20, 20)])}
    stream = []
    for k, img in images.items():
        tiles, pos = tiling.tile_image(img, spec)
        stream += [(k, t, p) for t, p in zip(tiles, pos)]
    order = rng.permutation(len(stream))
    st, done = Stitcher(spec), {}
    for i in order:
        k, t, (y, x) = stream[i]
        out = st.add(k, y, x, *images[k].shape[:2], {"image": t, "nested": {"sum": t.sum(-1)}})
        if out is not None:
            assert k not in done
            done[k] = out
    assert st.pending == 0 and sorted(done) == sorted(images)
    for k, img in images.items():
        np.testing.assert_allclose(done[k]["image"], img, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(done[k]["nested"]["sum"], img.sum(-1), rtol=1e-5, atol=1e-5)


def test_stitched_model_map_equals_untiled_when_tile_is_image(get_config):
    """A tile the size of the image: one tile, and the stitched map is the model's own map."""
    import jax

    from rstpm_jax.anomaly_maps import MapSpec
    from rstpm_jax.inference import make_infer_fn
    from rstpm_jax.models.rstpm import build_model

    config = get_config("stpm")
    config.model.random_teachers = True
    size, spec = 64, TileSpec(64)
    model = build_model(config.model)
    tv, sv = jax.jit(lambda k: model.init(k, (1, size, size, 3)))(jax.random.key(0))
    infer = jax.jit(make_infer_fn(model, MapSpec.from_config(config.maps), with_levels=False))
    image = np.random.default_rng(2).standard_normal((size, size, 3)).astype(np.float32)
    whole = np.asarray(infer(tv, sv, image[None])["map"][0])
    acc = tiling.TileAccumulator(size, size, spec)
    for tiles, pos in tiling.tile_batches(image, spec, 4):
        acc.add(np.asarray(infer(tv, sv, tiles)["map"]), pos)
    assert acc.added == 1
    np.testing.assert_array_equal(acc.result(), whole)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    from rstpm_jax.data import synthetic
    root = str(tmp_path_factory.mktemp("tiling_data"))
    synthetic.generate(root, seed=0, image_size=64, categories=("fabric",))
    return root


def test_tf_pipeline_tiles_equal_numpy_tiles(synthetic_root):
    from rstpm_jax.data import input_pipeline as ip
    from rstpm_jax.data import mvtec
    from rstpm_jax.data.preprocess import NORM_OFFSET, NORM_SCALE

    root, spec = synthetic_root, TileSpec(32, 16)
    items = ip._items(root, "fabric", "train", 0.25, 0)
    item, pos = ip.tile_table(ip.image_sizes(items, root, "fabric", "train"), spec)
    assert len(item) == len(items) * 9 == ip.num_examples(root, "fabric", "train", 0.25, 0, tiling=spec)
    kw = dict(image_size=64, global_batch_size=8, seed=0, epoch=1, holdout_fraction=0.25, tiling=spec,
              drop_last=False)
    cached = list(ip.train_dataset(root, "fabric", **kw))
    uncached = list(ip.train_dataset(root, "fabric", cache_max_bytes=0, **kw))
    assert len(cached) == len(uncached) == -(-len(item) // 8)
    seen = []
    for a, b in zip(cached, uncached):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["index"], b["index"])
        for tile, j in zip(a["image"], a["index"]):
            if j < 0:
                continue
            seen.append(int(j))
            (y, x), rgb = pos[j], mvtec.read_rgb(items[item[j]].path)
            ref = rgb[y:y + 32, x:x + 32].astype(np.float32) * NORM_SCALE + NORM_OFFSET
            np.testing.assert_allclose(tile, ref, rtol=1e-6, atol=1e-6)
    assert sorted(seen) == list(range(len(item)))  # every tile once per epoch
    images, idx = ip.load_images(root, "fabric", "train", image_size=64, holdout_fraction=0.25, seed=0,
                                 tiling=spec)
    np.testing.assert_array_equal(idx, np.arange(len(item)))
    np.testing.assert_array_equal(images[seen[0]], next(
        a["image"][list(a["index"]).index(seen[0])] for a in cached if seen[0] in a["index"]))


@pytest.mark.parametrize("hosts", [1, 2])
def test_tf_eval_tiles_stitch_back_to_the_images_and_masks(synthetic_root, hosts):
    from rstpm_jax.data import input_pipeline as ip
    from rstpm_jax.data import mvtec
    from rstpm_jax.data.preprocess import NORM_OFFSET, NORM_SCALE

    root, spec = synthetic_root, TileSpec(32, 16)
    streams = [list(ip.eval_dataset(root, "fabric", image_size=64, global_batch_size=8, tiling=spec,
                                    process_index=p, process_count=hosts)) for p in range(hosts)]
    assert len({len(s) for s in streams}) == 1  # every host the same number of batches
    st, done = Stitcher(spec), {}
    for batches in itertools.zip_longest(*streams):
        for b in batches:
            for r in np.flatnonzero(b["valid"]):
                out = st.add(int(b["index"][r]), *b["tile_yx"][r], *b["image_hw"][r],
                             {"image": b["image"][r], "mask": b["mask"][r].astype(np.float32)})
                if out is not None:
                    done[int(b["index"][r])] = (out, int(b["label"][r]))
    items = ip.test_items(root, "fabric")
    assert st.pending == 0 and sorted(done) == list(range(len(items)))
    for i, it in enumerate(items):
        (out, label) = done[i]
        rgb = mvtec.read_rgb(it.path).astype(np.float32) * NORM_SCALE + NORM_OFFSET
        np.testing.assert_allclose(out["image"], rgb, rtol=1e-6, atol=1e-6)
        want = mvtec.read_mask(it.mask_path, (64, 64)) if it.mask_path else np.zeros((64, 64))
        np.testing.assert_array_equal(out["mask"], want)
        assert label == it.label


def test_tiles_from_prepared_tfds_data_equal_the_files(synthetic_root, tmp_path):
    from rstpm_jax.data import input_pipeline as ip
    from rstpm_jax.data import tfds_mvtec

    root, spec, data_dir = synthetic_root, TileSpec(32, 16), str(tmp_path / "tfds")
    tfds_mvtec.prepare(root, "fabric", data_dir)
    for fn, kw in ((ip.eval_dataset, dict(global_batch_size=8)),
                   (ip.train_dataset, dict(global_batch_size=8, seed=0, epoch=0, holdout_fraction=0.25))):
        via_tfds = list(fn(root, "fabric", image_size=64, tiling=spec, data_dir=data_dir, **kw))
        direct = list(fn(root, "fabric", image_size=64, tiling=spec, **kw))
        assert len(via_tfds) == len(direct) > 0
        for a, b in zip(via_tfds, direct):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=k)
