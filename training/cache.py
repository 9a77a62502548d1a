"""On-disk cache of the training images as the worker sees them, decoded and fitted once.

Every training run used to decode all 2,552 PNGs again and resize each sample from the full
image every epoch.  :class:`GreyCache` decodes each image of a manifest once through the
worker's own code (``training.data.load_grey8``: the exact ``worker.imaging`` path) and keeps it
cropped and resized to the run's largest input size (``worker.imaging.fit_grey``) as one uint8
array on disk, memory-mapped by every run that uses the same data.  Epochs at a lower resolution
(progressive resizing) resize from it cheaply; at the largest size no resampling happens, so a
sample is bit-identical to ``grey_to_input`` of the full image, i.e. to what the worker feeds the
model (tests check it).

The cache is keyed by the manifest's sha256, the preprocessing spec (size, crop, VOI mode,
percentiles) and the sha256 of the ``worker/imaging/`` modules themselves, so a change to the data, the spec or
the worker's preprocessing never serves stale pixels.  Files (written atomically, temp + rename)::

    <cache_dir>/<key>.npy    uint8 (N, H, W): one fitted image per manifest row, in manifest order
    <key>.json               {"format", "manifest_sha256", "spec", "imaging_sha256", "files": [...]}
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker import imaging
from worker.imaging import PreprocessSpec

from .data import load_grey8, manifest_sha256, read_manifest
from .progress import Progress

log = logging.getLogger(__name__)

FORMAT = "cxr-triage-grey-cache/1"

__all__ = ["GreyCache", "default_cache_dir", "cache_key"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cxr-triage/training`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cxr-triage" / "training"


def _imaging_sha256() -> str:
    """sha256 over the modules of the ``worker.imaging`` package (name and bytes, sorted by name):
    a change to any stage of the preprocessing builds a new cache."""
    h = hashlib.sha256()
    for p in sorted(Path(imaging.__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _spec_entry(spec: PreprocessSpec) -> dict:
    return {"size": list(spec.size), "crop": spec.crop, "voi": spec.voi, "percentiles": list(spec.percentiles)}


def cache_key(manifest_sha: str, spec: PreprocessSpec) -> str:
    """Hex digest naming the cache of one manifest under one preprocessing spec."""
    ident = {"format": FORMAT, "manifest_sha256": manifest_sha, "spec": _spec_entry(spec), "imaging_sha256": _imaging_sha256()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class GreyCache(Mapping[str, np.ndarray]):
    """Absolute image path -> fitted 8-bit grey image (read-only view into the memory map).

    Paths outside the manifest (an evaluation set from elsewhere) are loaded and fitted on first
    use and kept in memory, so the mapping can stand in wherever a plain dict cache did."""

    spec: PreprocessSpec
    pixels: np.ndarray
    index: dict[str, int]
    path: Path | None = None

    def __post_init__(self) -> None:
        self._extra: dict[str, np.ndarray] = {}

    @classmethod
    def open(cls, manifest: str | os.PathLike, spec: PreprocessSpec, cache_dir: str | os.PathLike | None = None,
             *, progress: str = "auto") -> GreyCache:
        """The cache of ``manifest`` under ``spec``, built first when it does not exist yet."""
        manifest = Path(manifest)
        sha = manifest_sha256(manifest)
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        key = cache_key(sha, spec)
        npy, meta = folder / f"{key}.npy", folder / f"{key}.json"
        rows = read_manifest(manifest)
        files = [r["_path"] for r in rows]
        if npy.exists() and meta.exists():
            info = json.loads(meta.read_text())
            if info.get("files") == [r["file"] for r in rows]:
                pixels = np.load(npy, mmap_mode="r")
                log.info("grey cache %s: %d images at %dx%d", npy, len(files), *spec.size)
                return cls(spec, pixels, {p: i for i, p in enumerate(files)}, npy)
            log.warning("grey cache %s does not match the manifest's rows; rebuilding", npy)
        folder.mkdir(parents=True, exist_ok=True)
        h, w = spec.size
        tmp = npy.with_name(npy.name + f".{os.getpid()}.tmp")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), h, w))
        bar = Progress("caching", len(files), unit="images", mode=progress)
        for i, p in enumerate(files):
            out[i] = imaging.fit_grey(load_grey8(p, spec), spec)
            bar.update(1)
        bar.close()
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, npy)
        info = {"format": FORMAT, "manifest": str(manifest.resolve()), "manifest_sha256": sha, "spec": _spec_entry(spec),
                "imaging_sha256": _imaging_sha256(), "files": [r["file"] for r in rows],
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        mtmp = meta.with_name(meta.name + ".tmp")
        mtmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(mtmp, meta)
        return cls(spec, np.load(npy, mmap_mode="r"), {p: i for i, p in enumerate(files)}, npy)

    def __getitem__(self, path: str) -> np.ndarray:
        i = self.index.get(path)
        if i is not None:
            return self.pixels[i]
        if path not in self._extra:
            self._extra[path] = imaging.fit_grey(load_grey8(path, self.spec), self.spec)
        return self._extra[path]

    def __contains__(self, path: object) -> bool:
        return True  # every path can be served (see the class docstring)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)
