"""The on-disk grey cache (training.cache): built once, keyed by data and preprocessing, and
serving the worker's own pixels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from synth import CLASSES3

from training.cache import GreyCache, cache_key
from training.data import ManifestDataset, manifest_sha256, read_manifest
from worker import imaging
from worker.imaging import PreprocessSpec

SPEC = PreprocessSpec(size=(32, 32), channels=3)


def test_cache_serves_the_workers_pixels_and_is_built_once(tiny_manifest: Path, tmp_path: Path) -> None:
    cache = GreyCache.open(tiny_manifest, SPEC, tmp_path, progress="none")
    assert cache.path is not None and cache.path.parent == tmp_path
    built = cache.path.stat().st_mtime_ns
    rows = read_manifest(tiny_manifest)
    assert len(cache) == len(rows) and cache.pixels.shape == (len(rows), 32, 32) and cache.pixels.dtype == np.uint8

    with_cache = ManifestDataset(rows, CLASSES3, spec=SPEC, grey_cache=cache)
    without = ManifestDataset(rows, CLASSES3, spec=SPEC, cache=False)
    for i in (0, 7, len(rows) - 1):
        x, _ = with_cache[i]
        assert np.array_equal(x.numpy(), without[i][0].numpy())  # bit-identical at the largest size
        assert np.array_equal(x.numpy(), imaging.load_image_file(with_cache.paths[i], SPEC))  # = the worker's function
    # a lower epoch size resizes the cached image; the shapes follow
    with_cache.set_size(24)
    assert with_cache[0][0].shape == (3, 24, 24)

    again = GreyCache.open(tiny_manifest, SPEC, tmp_path, progress="none")
    assert again.path == cache.path and cache.path.stat().st_mtime_ns == built  # not rebuilt
    assert np.array_equal(np.asarray(again.pixels), np.asarray(cache.pixels))


def test_cache_key_follows_data_and_spec(tiny_manifest: Path, tmp_path: Path) -> None:
    sha = manifest_sha256(tiny_manifest)
    assert cache_key(sha, SPEC) != cache_key(sha, PreprocessSpec(size=(48, 48)))
    assert cache_key(sha, SPEC) != cache_key(sha, PreprocessSpec(size=(32, 32), voi="minmax"))
    copy = tmp_path / "data"
    shutil.copytree(tiny_manifest.parent, copy)
    m = copy / "manifest.csv"
    m.write_text(m.read_text().replace("CC0", "CC-BY-4.0", 1))  # one changed byte of the manifest: a new cache
    a = GreyCache.open(tiny_manifest, SPEC, tmp_path / "c", progress="none")
    b = GreyCache.open(m, SPEC, tmp_path / "c", progress="none")
    assert a.path != b.path and len(list((tmp_path / "c").glob("*.npy"))) == 2


def test_paths_outside_the_manifest_are_loaded_on_demand(tiny_manifest: Path, tmp_path: Path) -> None:
    cache = GreyCache.open(tiny_manifest, SPEC, tmp_path, progress="none")
    other = tmp_path / "other.png"
    shutil.copy(read_manifest(tiny_manifest)[0]["_path"], other)
    assert str(other) not in cache.index
    assert np.array_equal(cache[str(other)], cache.pixels[0])
