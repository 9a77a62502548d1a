"""Grey-level mapping (PS3.3 C.11, PS3.4 N.2): Modality LUT, VOI (window, VOI LUT or robust
min-max), MONOCHROME1 inversion, as one lookup table per image for integer data
(:func:`to_grey8`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.multival import MultiValue

from worker.imaging.codestream import _int_attr, _transfer_syntax
from worker.imaging.spec import _STAT_PIXELS, _TAKE_CHUNK, PixelError, PreprocessSpec

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Grey-scale transforms (PS3.3 C.11, PS3.4 N.2)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Domain:
    """Every possible word of an 8/16-bit array, as stored values.

    ``levels``: the distinct stored values, ascending (float64); ``index``: for each word (read as
    unsigned) the position of its stored value in ``levels``.  The grey-scale chain is evaluated
    once per level (4096 evaluations for 12-bit data), then spread to a table over all words.
    """

    levels: np.ndarray
    index: np.ndarray


@functools.lru_cache(maxsize=16)
def _domain(dtype_str: str, bits_stored: int | None, signed: bool | None) -> _Domain:
    """Words of ``dtype_str`` to stored values.

    ``bits_stored=None``: each word is its own value in ``dtype`` (data already decoded).
    Otherwise the word is raw Pixel Data: only the low ``bits_stored`` bits count, sign-extended
    from bit ``bits_stored - 1`` when ``signed`` (PS3.5 8.1.1, two's complement).
    """
    dtype = np.dtype(dtype_str)
    nbits = dtype.itemsize * 8
    words = np.arange(1 << nbits, dtype=np.int64)
    if bits_stored is None:
        bits, is_signed = nbits, dtype.kind == "i"
    else:
        bits, is_signed = bits_stored, bool(signed)
    low = -(1 << (bits - 1)) if is_signed else 0
    values = words & ((1 << bits) - 1)
    if is_signed:
        sign = 1 << (bits - 1)
        values = (values ^ sign) - sign
    levels = np.arange(low, low + (1 << bits), dtype=np.float64)
    index = (values - low).astype(np.intp)
    levels.flags.writeable = False
    index.flags.writeable = False
    return _Domain(levels, index)


def _lut_array(item: pydicom.Dataset, ds: pydicom.Dataset, what: str) -> tuple[np.ndarray, int, int] | None:
    """(LUT values, first input value mapped, bits per entry) of a Modality/VOI LUT item
    (PS3.3 C.11.1.1 / C.11.2.1.1), or None (with a warning) when it is unusable."""
    try:
        desc = [int(x) for x in item.LUTDescriptor]
        data = item.LUTData
    except (AttributeError, TypeError, ValueError):
        log.warning("%s LUT item lacks a usable LUTDescriptor/LUTData; ignored", what)
        return None
    if len(desc) != 3:
        log.warning("%s LUTDescriptor has %d values, expected 3; ignored", what, len(desc))
        return None
    n, first, bits = desc
    n = n or 65536  # PS3.3 C.11.1.1.1: 0 means 2^16 entries
    if first > 32767 and _int_attr(ds, "PixelRepresentation", 0) == 1:
        first -= 65536  # descriptor read as US although the first value mapped is negative (SS)
    if isinstance(data, (bytes, bytearray)):
        ts = _transfer_syntax(ds)
        little = ts.is_little_endian if ts.is_transfer_syntax else True
        if len(data) >= 2 * n:
            values = np.frombuffer(bytes(data[: 2 * n]), dtype="<u2" if little else ">u2")
        elif len(data) >= n and bits <= 8:
            values = np.frombuffer(bytes(data[:n]), dtype=np.uint8)
        else:
            log.warning("%s LUTData has %d bytes for %d entries; ignored", what, len(data), n)
            return None
    else:
        values = np.atleast_1d(np.asarray(data, dtype=np.int64))
        if values.size < n:
            log.warning("%s LUTData has %d entries, descriptor says %d; ignored", what, values.size, n)
            return None
        values = values[:n]
    return values.astype(np.float64), first, bits


def _apply_table(values: np.ndarray, first: int, x: np.ndarray) -> np.ndarray:
    """LUT lookup: inputs below the first mapped value take the first entry, above the last take
    the last (PS3.3 C.11.1.1.1 / C.11.2.1.1)."""
    idx = np.clip(np.rint(x - first), 0, values.size - 1).astype(np.intp)
    return cast(np.ndarray, values[idx])


def _modality(ds: pydicom.Dataset) -> tuple[Callable[[np.ndarray], np.ndarray], bool]:
    """Modality LUT (PS3.3 C.11.1) as a function of stored values, and whether it is the identity.

    A Modality LUT Sequence takes precedence; otherwise Rescale Slope/Intercept (C.11.1.1.2),
    defaulting to 1 and 0 when absent (e.g. Secondary Capture)."""
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        lut = _lut_array(seq[0], ds, "Modality")
        if lut is not None:
            values, first, _bits = lut
            return (lambda x: _apply_table(values, first, x)), False
    raw_slope, raw_intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    try:
        slope = 1.0 if raw_slope is None or raw_slope == "" else float(raw_slope)
        intercept = 0.0 if raw_intercept is None or raw_intercept == "" else float(raw_intercept)
    except (TypeError, ValueError):
        log.warning("unreadable RescaleSlope/RescaleIntercept; identity modality LUT used")
        slope, intercept = 1.0, 0.0
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        log.warning("invalid RescaleSlope/RescaleIntercept; identity modality LUT used")
        slope, intercept = 1.0, 0.0
    if slope == 1.0 and intercept == 0.0:
        return (lambda x: x), True
    return (lambda x: x * slope + intercept), False


def _first_value(v: Any) -> float | None:
    """First value of a possibly multi-valued DS (Window Center/Width may hold several)."""
    if v is None or v == "":
        return None
    if isinstance(v, (list, tuple, MultiValue)):
        if len(v) == 0:
            return None
        v = v[0]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _window(ds: pydicom.Dataset) -> Callable[[np.ndarray], np.ndarray] | None:
    """The first Window Center/Width pair as a function to [0, 255] (float), or None.

    VOI LUT Function (PS3.3 C.11.2.1.3): LINEAR (default, C.11.2.1.2.1), LINEAR_EXACT
    (C.11.2.1.3.2) and SIGMOID (C.11.2.1.3.1); an unknown function is treated as LINEAR.
    """
    c = _first_value(ds.get("WindowCenter", None))
    w = _first_value(ds.get("WindowWidth", None))
    if c is None or w is None:
        return None
    func = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        log.warning("VOILUTFunction %s not supported; LINEAR used", func)
        func = "LINEAR"
    if func == "LINEAR":
        if w < 1:
            log.warning("WindowWidth %s < 1 is invalid for LINEAR (C.11.2.1.2.1); window ignored", w)
            return None

        def linear(x: np.ndarray) -> np.ndarray:
            # PS3.3 C.11.2.1.2.1 with ymin=0, ymax=255.
            lower = c - 0.5 - (w - 1) / 2
            upper = c - 0.5 + (w - 1) / 2
            if w == 1:  # the ramp is empty: a step at c - 0.5
                return np.where(x <= lower, 0.0, 255.0)
            ramp = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
            return np.where(x <= lower, 0.0, np.where(x > upper, 255.0, ramp))

        return linear
    if w <= 0:
        log.warning("WindowWidth %s <= 0 is invalid for %s; window ignored", w, func)
        return None
    if func == "LINEAR_EXACT":

        def linear_exact(x: np.ndarray) -> np.ndarray:
            ramp = ((x - c) / w + 0.5) * 255.0
            return np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, ramp))

        return linear_exact

    def sigmoid(x: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return 255.0 / (1.0 + np.exp(-4.0 * (x - c) / w))

    return sigmoid


def _voi_lut(ds: pydicom.Dataset) -> Callable[[np.ndarray], np.ndarray] | None:
    """First item of the VOI LUT Sequence (PS3.3 C.11.2.1.1) as a function to [0, 255], or None.

    Output is scaled by 2^bits - 1 from the LUT Descriptor; when LUTData holds larger values (a
    known vendor error) the scale follows the data instead, so the image is not clipped."""
    seq = ds.get("VOILUTSequence", None)
    if not seq:
        return None
    lut = _lut_array(seq[0], ds, "VOI")
    if lut is None:
        return None
    values, first, bits = lut
    top = float((1 << max(1, min(bits, 16))) - 1)
    vmax = float(values.max()) if values.size else 0.0
    if vmax > top:
        log.warning("VOI LUTData exceeds the %d bits its descriptor declares; scaled by its maximum", bits)
        top = float((1 << int(vmax).bit_length()) - 1)
    scale = 255.0 / top
    return lambda x: _apply_table(values, first, x) * scale


def _photometric(ds: pydicom.Dataset) -> str:
    pi = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelError(f"not greyscale ({pi or 'no PhotometricInterpretation'})")
    return pi


def _padding_mask(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | None:
    """True where a stored value is Pixel Padding (PS3.3 C.7.5.1.1.2); excluded from statistics."""
    pad = ds.get("PixelPaddingValue", None)
    if not isinstance(pad, (int, np.integer)):
        return None
    limit = ds.get("PixelPaddingRangeLimit", None)
    hi = int(limit) if isinstance(limit, (int, np.integer)) else int(pad)
    lo, hi = min(int(pad), hi), max(int(pad), hi)
    return (stored >= lo) & (stored <= hi)


def _weighted_percentiles(
    values: np.ndarray, counts: np.ndarray, qs: tuple[float, float]
) -> tuple[float, float] | None:
    """Percentiles by the inverted CDF (numpy ``method="inverted_cdf"``): the smallest value whose
    cumulative count reaches q% of the total.  ``None`` when there is nothing to count."""
    keep = (counts > 0) & np.isfinite(values)
    values, counts = values[keep], counts[keep]
    if values.size == 0:
        return None
    if values.size > 1 and not np.all(values[1:] >= values[:-1]):  # e.g. negative rescale slope
        order = np.argsort(values, kind="stable")
        values, counts = values[order], counts[order]
    cum = np.cumsum(counts)
    total = cum[-1]
    out = []
    for q in qs:
        i = int(np.searchsorted(cum, q / 100.0 * total, side="left"))
        out.append(float(values[min(i, values.size - 1)]))
    return out[0], out[1]


def _stat_step(rows: int, cols: int) -> int:
    """Row/column stride of the percentile subsample (about 2^17 pixels; 1 for small images)."""
    return max(1, math.ceil(math.sqrt(rows * cols / _STAT_PIXELS)))


def _transfer(
    ds: pydicom.Dataset,
    spec: PreprocessSpec,
    percentiles_of: Callable[[Callable[[np.ndarray], np.ndarray]], tuple[float, float] | None],
) -> Callable[[np.ndarray], np.ndarray]:
    """The whole grey-scale chain as one function: stored values (float64) -> uint8 display values.

    ``percentiles_of(modality)`` returns the robust (low, high) of the modality output over the
    image; it is called only when min-max is needed (so windowed images skip the histogram).
    """
    invert = _photometric(ds) == "MONOCHROME1"
    modality, identity = _modality(ds)
    voi: Callable[[np.ndarray], np.ndarray] | None = None
    flat = False
    if spec.voi == "auto":
        voi = _voi_lut(ds) or _window(ds)
        bits_stored = _int_attr(ds, "BitsStored", None) or _int_attr(ds, "BitsAllocated", 16) or 16
        if voi is None and identity and bits_stored <= 8 and _int_attr(ds, "PixelRepresentation", 0) == 0:
            # 8-bit unsigned data without VOI information is already display grey (e.g.
            # Secondary Capture made from 8-bit images, like the training PNGs): keep it.
            voi = lambda x: x  # noqa: E731
    if voi is None:
        bounds = percentiles_of(modality)
        if bounds is None or bounds[1] <= bounds[0]:
            flat = True
        else:
            lo, hi = bounds
            k = 255.0 / (hi - lo)
            voi = lambda x: (x - lo) * k  # noqa: E731

    def chain(stored: np.ndarray) -> np.ndarray:
        if flat:
            return np.zeros(stored.shape, dtype=np.uint8)
        assert voi is not None
        y = voi(modality(stored))
        y = np.floor(np.clip(np.nan_to_num(y, nan=0.0), 0.0, 255.0) + 0.5).astype(np.uint8)
        if invert:  # MONOCHROME1: minimum value is white (PS3.3 C.7.6.3.1.2)
            np.subtract(255, y, out=y)
        return y

    return chain


def _is_table_dtype(dtype: np.dtype) -> bool:
    return dtype.kind in "ui" and dtype.itemsize in (1, 2)


def _unsigned(arr: np.ndarray) -> np.ndarray:
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}")) if arr.dtype.kind == "i" else arr


def _table_lut(ds: pydicom.Dataset, spec: PreprocessSpec, full: np.ndarray, domain: _Domain) -> np.ndarray:
    """uint8 lookup table over every word of ``full``'s dtype; statistics from ``full``."""

    def percentiles_of(modality: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float] | None:
        step = _stat_step(*full.shape)
        sub = _unsigned(full[::step, ::step]).ravel()
        word_counts = np.bincount(sub, minlength=domain.index.size)
        counts = np.bincount(domain.index, weights=word_counts, minlength=domain.levels.size)
        pad = _padding_mask(ds, domain.levels)
        if pad is not None:
            counts[pad] = 0
        return _weighted_percentiles(modality(domain.levels), counts, spec.percentiles)

    per_level = _transfer(ds, spec, percentiles_of)(domain.levels)
    return cast(np.ndarray, per_level[domain.index])


def _take(lut: np.ndarray, words: np.ndarray) -> np.ndarray:
    """``lut[words]`` in row chunks, so numpy's intp index temporary stays in cache."""
    out = np.empty(words.shape, dtype=lut.dtype)
    rows = max(1, _TAKE_CHUNK // max(1, words.shape[1]))
    for r in range(0, words.shape[0], rows):
        # mode="wrap": indices are in range by construction, and it lets numpy write into out directly.
        np.take(lut, words[r : r + rows], out=out[r : r + rows], mode="wrap")
    return out


def to_grey8(ds: pydicom.Dataset, stored: np.ndarray, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """uint8 2-D display image: Modality LUT (RescaleSlope/Intercept; a Modality LUT Sequence if
    present), then VOI (per spec.voi: VOI LUT Sequence, else first WindowCenter/WindowWidth with the
    DICOM PS3.3 C.11.2.1.2 linear function, VOILUTFunction SIGMOID/LINEAR_EXACT supported if simple,
    else robust min-max by spec.percentiles), then MONOCHROME1 inverted so that bone is bright.
    Degenerate (flat) images give a clear result (all zeros), not NaN.

    Details:
      * Output values are ``floor(y + 0.5)`` of the PS3.3 formulas with ymin=0, ymax=255.
      * Robust min-max maps the low/high percentile (inverted-CDF definition) of the modality
        output to 0/255, clipping outside; percentiles come from every k-th row and column
        (about 2^17 pixels), skipping Pixel Padding Value (C.7.5.1.1.2).
      * ``voi="auto"`` with no VOI LUT and no valid window, 8-bit unsigned data and an identity
        modality LUT: stored values are taken as grey levels unchanged (they already are display
        values, like the 8-bit training PNGs); any other data falls back to robust min-max.
      * uint8/int8/uint16/int16 input is mapped through one lookup table (fast); other dtypes
        (int32, float) element-wise, same result.
      * PixelError if PhotometricInterpretation is not MONOCHROME1/MONOCHROME2.
    """
    if stored.ndim != 2:
        raise PixelError(f"expected a 2-D image, got shape {stored.shape}")
    if not stored.dtype.isnative:
        stored = stored.astype(stored.dtype.newbyteorder("="))
    if _is_table_dtype(stored.dtype):
        lut = _table_lut(ds, spec, stored, _domain(stored.dtype.str, None, None))
        return _take(lut, _unsigned(stored))

    values = stored.astype(np.float64, copy=False)

    def percentiles_of(modality: Callable[[np.ndarray], np.ndarray]) -> tuple[float, float] | None:
        step = _stat_step(*values.shape)
        sub = values[::step, ::step].ravel()
        pad = _padding_mask(ds, sub)
        if pad is not None:
            sub = sub[~pad]
        uniq, counts = np.unique(sub[np.isfinite(sub)], return_counts=True)
        return _weighted_percentiles(modality(uniq), counts, spec.percentiles)

    return _transfer(ds, spec, percentiles_of)(values)
