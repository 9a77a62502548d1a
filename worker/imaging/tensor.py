"""Grey image to model input: centre crop, antialiased resize, normalisation and channel
replication (:func:`grey_to_input`), the whole chain for a DICOM object (:func:`preprocess`), and
the same for PNG/JPEG training images (:func:`load_image_file`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import cast

import numpy as np
import pydicom
from PIL import Image, ImageOps

from worker.imaging.decoding import _decode_frame
from worker.imaging.grey import _domain, _is_table_dtype, _table_lut, _take, _unsigned, to_grey8
from worker.imaging.spec import _REDUCING_GAP, PreprocessSpec

# --------------------------------------------------------------------------------------------
# Geometry and normalisation
# --------------------------------------------------------------------------------------------


def _crop_box(rows: int, cols: int, crop: str) -> tuple[slice, slice]:
    """Centre square on the shorter side (odd excess: the extra row/column goes to the end)."""
    if crop == "none" or rows == cols:
        return slice(None), slice(None)
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return slice(top, top + side), slice(left, left + side)


@functools.lru_cache(maxsize=16)
def _norm_table(mean: tuple[float, ...], std: tuple[float, ...], channels: int) -> np.ndarray:
    """(channels, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every grey level v, computed
    in float64 and rounded once, so the output is exact and independent of image size."""
    m = np.broadcast_to(np.asarray(mean, dtype=np.float64), (channels,))
    s = np.broadcast_to(np.asarray(std, dtype=np.float64), (channels,))
    levels = np.arange(256, dtype=np.float64) / 255.0
    table = ((levels[None, :] - m[:, None]) / s[:, None]).astype(np.float32)
    table.flags.writeable = False
    return table


def grey_to_input(grey8: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """float32 (channels, H, W): crop per spec.crop, resize to spec.size with Pillow (antialiased, e.g.
    BILINEAR with reducing_gap or BOX then BILINEAR; say which in the docstring), scale to [0,1],
    normalise by mean/std per channel, replicate grey to channels. Training calls this on its 8-bit
    PNGs, so PNG training and DICOM serving see the same pixels.

    Resampling: ``Image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)``, i.e. Pillow
    first box-reduces by the largest integer factor that keeps the remaining scale >= 2 (e.g.
    2000 -> 500 for a 224 target), then applies its antialiased bilinear filter (a triangle
    filter widened by the scale when shrinking).  A 256x256 training PNG gets the bilinear step
    only.  An image already of the target size is not resampled.  Then ``(v/255 - mean)/std``
    per channel, via an exact float32 table of the 256 grey levels.
    """
    img = fit_grey(grey8, spec)
    table = _norm_table(spec.mean, spec.std, spec.channels)
    return np.take(table, img, axis=1)


def fit_grey(grey8: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """The 8-bit grey image cropped per ``spec.crop`` and resized to ``spec.size``: the first half
    of :func:`grey_to_input` (which is ``normalise(fit_grey(g))``), same resampling.

    The training stage caches this once per image at its largest input size; since an image
    already of the target size is not resampled, ``grey_to_input(fit_grey(g, spec), spec)`` is
    bit-identical to ``grey_to_input(g, spec)``."""
    if grey8.ndim != 2 or grey8.dtype != np.uint8:
        raise ValueError(f"grey_to_input needs a 2-D uint8 image, got {grey8.dtype} {grey8.shape}")
    rs, cs = _crop_box(grey8.shape[0], grey8.shape[1], spec.crop)
    img = grey8[rs, cs]
    h, w = spec.size
    if img.shape != (h, w):
        pil = Image.fromarray(np.ascontiguousarray(img))
        img = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP))
    return img


def preprocess(
    ds: pydicom.Dataset, spec: PreprocessSpec = PreprocessSpec(), timings: dict[str, float] | None = None
) -> np.ndarray:
    """= grey_to_input(to_grey8(ds, decode(ds, spec), spec), spec).

    Same result, computed faster: native data is read as raw words (masking and sign extension
    folded into the lookup table), statistics come from the whole frame, and only the cropped
    region is mapped through the table.  Raises PixelError like :func:`decode`/:func:`to_grey8`.
    ``timings``, when given, receives ``decode_ms`` (the pixel decode alone).
    """
    t0 = time.perf_counter()
    arr, g, raw = _decode_frame(ds, spec)
    if timings is not None:
        timings["decode_ms"] = (time.perf_counter() - t0) * 1e3
    if not _is_table_dtype(arr.dtype):
        return grey_to_input(to_grey8(ds, arr, spec), spec)
    if raw:
        domain = _domain(arr.dtype.str, g.bits_stored, g.signed)
    else:
        domain = _domain(arr.dtype.str, None, None)
    lut = _table_lut(ds, spec, arr, domain)
    rs, cs = _crop_box(arr.shape[0], arr.shape[1], spec.crop)
    grey = _take(lut, _unsigned(arr)[rs, cs])
    return grey_to_input(grey, spec)


# --------------------------------------------------------------------------------------------
# Image files (training)
# --------------------------------------------------------------------------------------------


def _minmax8(a: np.ndarray) -> np.ndarray:
    """Full-range min-max to uint8, ``floor(255 * (x - min) / (max - min) + 0.5)``; flat -> zeros."""
    a = a.astype(np.float64, copy=False)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    y = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))
    return cast(np.ndarray, np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8))


def pil_to_grey8(im: Image.Image) -> np.ndarray:
    """A Pillow image as uint8 grey: 8-bit as is, 16/32-bit grey by min-max, colour to L.

    Public because training caches exactly these pixels (training/data.py), so that a cached
    PNG and ``load_image_file`` can never disagree.
    """
    if im.mode == "L":
        return np.asarray(im)
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit grey (e.g. 16-bit PNG: "I;16")
        return _minmax8(np.asarray(im))
    return np.asarray(im.convert("L"))  # RGB/RGBA/P/LA/1/CMYK: ITU-R 601-2 luma


def load_image_file(path: str | os.PathLike[str], spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """PNG/JPEG (8- or 16-bit grey or RGB) -> grey8 (16-bit scaled by min-max, RGB converted to L)
    -> grey_to_input. For training.

    The EXIF orientation is applied first (as when the training PNGs were made).  Errors from
    Pillow (missing file, not an image) propagate as OSError.
    """
    with Image.open(path) as im:
        grey = pil_to_grey8(ImageOps.exif_transpose(im) or im)
    return grey_to_input(grey, spec)
