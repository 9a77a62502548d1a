"""DICOM (and PNG/JPEG) to model-input tensor: the ONE preprocessing for serving and training.

The edge worker calls :func:`preprocess` on received DICOM objects; training calls
:func:`load_image_file` on its 8-bit PNGs.  Both end in :func:`grey_to_input`, so the model sees
the same pixel pipeline in both places.  This module never imports torch.

Pipeline (DICOM PS3.4 N.2, "Grayscale Transformations"; PS3.3 C.11):

1. :func:`decode`: stored pixel values of the first frame (PS3.5 8.1.1 / 8.2, Annex A.4), by the
   decoder measured fastest for the transfer syntax (:mod:`worker.decoders`), pydicom's own
   decoders as the fallback; an image is refused only when every decoder fails.
2. :func:`to_grey8`: Modality LUT (PS3.3 C.11.1), VOI LUT or window (C.11.2), and the
   MONOCHROME1 inversion (C.7.6.3.1.2), folded into one lookup table over every possible stored
   value, giving an 8-bit display image in which bone is bright.
3. :func:`grey_to_input`: centre-square crop, Pillow resize, scale to [0, 1], normalise, replicate
   grey to the model's channels.

Speed: for integer stored data of up to 16 bits the whole grey-scale chain is one 64 KiB
(or 256 B) table applied with ``np.take``; robust percentiles come from a histogram of a strided
subsample.  :func:`preprocess` additionally crops *before* the table lookup, so a 2000x2500 image
only maps its 2000x2000 centre.  The result is bit-identical to
``grey_to_input(to_grey8(ds, decode(ds, spec), spec), spec)`` (tested).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from worker.decoders import Frame, fast_decoders

__all__ = [
    "PixelError",
    "PreprocessSpec",
    "decode",
    "to_grey8",
    "grey_to_input",
    "fit_grey",
    "preprocess",
    "load_image_file",
]

log = logging.getLogger(__name__)

#: Native (not encapsulated) little-endian transfer syntaxes whose Pixel Data we read directly
#: with ``np.frombuffer``.  Deflate (PS3.5 A.5) is undone by pydicom when the file is read, so
#: its Pixel Data is native too.
_NATIVE_LE = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

_VOI_MODES = ("auto", "minmax")
_CROP_MODES = ("center_square", "none")

#: Target number of pixels for the percentile subsample (every k-th row and column); about
#: 650 samples lie beyond a 0.5% bound, plenty for a display window.
_STAT_PIXELS = 1 << 17
#: Elements per ``np.take`` chunk: keeps the intp index temporary in L2 cache.
_TAKE_CHUNK = 1 << 16
#: Pillow: box-reduce by an integer factor first while the remaining scale stays >= this.
_REDUCING_GAP = 2.0


class PixelError(ValueError):
    """Pixel data that cannot be decoded or fails a sanity check. str(e) is a reason a person can read."""


# --------------------------------------------------------------------------------------------
# Specification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input.  Frozen and hashable; normally built from a model card.

    Attributes:
        size: (height, width) of the model input.
        channels: grey is replicated to this many channels.
        mean, std: per-channel normalisation applied to grey scaled to [0, 1] (one value, or one
            per channel).
        voi: ``"auto"``: VOI LUT Sequence if present, else the first Window Center/Width, else
            robust min-max (8-bit unsigned data with an identity modality LUT and no VOI is
            taken as already being display grey levels); ``"minmax"``: always robust min-max.
        percentiles: (low, high) bounds of the robust min-max, in percent.
        crop: ``"center_square"`` (centre crop to a square on the shorter side, as the training
            PNGs were made) or ``"none"`` (squash to ``size``).
        max_bytes: declared pixel data larger than this is refused before decoding.
        j2k_reduce: decode JPEG 2000 (PS3.5 A.4.4) at the smallest wavelet resolution level whose
            shorter side is still at least twice the model input (ISO 15444-1: each level halves
            both sides), instead of at full size and then throwing 99 % of the pixels away.  The
            level's LL band is a proper low-pass image and the usual resize does the last step,
            so the model sees nearly what the full decode gives; a 2000 x 2500 lossless image
            decodes about 20 times faster.
    """

    size: tuple[int, int] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    voi: str = "auto"
    percentiles: tuple[float, float] = (0.5, 99.5)
    crop: str = "center_square"
    max_bytes: int = 512 * 2**20
    j2k_reduce: bool = True

    def __post_init__(self) -> None:
        # Validate, and normalise sequences to tuples so the spec stays hashable.
        channels = _check_channels(self.channels, "channels")
        object.__setattr__(self, "size", _check_size(self.size, "size"))
        object.__setattr__(self, "mean", _check_norm(self.mean, channels, "mean", positive=False))
        object.__setattr__(self, "std", _check_norm(self.std, channels, "std", positive=True))
        _check_choice(self.voi, _VOI_MODES, "voi")
        object.__setattr__(self, "percentiles", _check_percentiles(self.percentiles, "percentiles"))
        _check_choice(self.crop, _CROP_MODES, "crop")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError("max_bytes must be a positive integer")

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> PreprocessSpec:
        """From a model card dict: card["input"] = {"size":[h,w], "channels":3, "mean":[...],
        "std":[...], "layout":"NCHW"}, card.get("preprocessing", {}) = {"voi":...,
        "percentiles":[lo,hi], "crop":...}. Missing keys take defaults; bad values raise ValueError
        naming the key (e.g. "model card input.size must be two positive integers")."""
        if not isinstance(card, Mapping):
            raise ValueError("model card must be an object")
        inp = card.get("input", {})
        pre = card.get("preprocessing", {})
        if inp is None:
            inp = {}
        if pre is None:
            pre = {}
        if not isinstance(inp, Mapping):
            raise ValueError("model card input must be an object")
        if not isinstance(pre, Mapping):
            raise ValueError("model card preprocessing must be an object")

        kwargs: dict[str, Any] = {}
        if "size" in inp:
            kwargs["size"] = _check_size(inp["size"], "model card input.size")
        if "channels" in inp:
            kwargs["channels"] = _check_channels(inp["channels"], "model card input.channels")
        channels = kwargs.get("channels", cls.channels)
        if "mean" in inp:
            kwargs["mean"] = _check_norm(inp["mean"], channels, "model card input.mean", positive=False)
        if "std" in inp:
            kwargs["std"] = _check_norm(inp["std"], channels, "model card input.std", positive=True)
        if "layout" in inp and inp["layout"] != "NCHW":
            raise ValueError(f"model card input.layout must be NCHW (got {inp['layout']!r})")
        if "voi" in pre:
            kwargs["voi"] = _check_choice(pre["voi"], _VOI_MODES, "model card preprocessing.voi")
        if "percentiles" in pre:
            kwargs["percentiles"] = _check_percentiles(pre["percentiles"], "model card preprocessing.percentiles")
        if "crop" in pre:
            kwargs["crop"] = _check_choice(pre["crop"], _CROP_MODES, "model card preprocessing.crop")
        unknown = sorted(set(pre) - {"voi", "percentiles", "crop"})
        if unknown:
            log.warning("model card preprocessing keys ignored (not understood): %s", ", ".join(unknown))
        try:
            return cls(**kwargs)
        except ValueError as exc:  # e.g. default mean (3 values) with channels=1
            raise ValueError(f"model card: {exc}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v: Any) -> bool:
    return (
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and math.isfinite(v)
    )


def _check_size(v: Any, key: str) -> tuple[int, int]:
    if (
        isinstance(v, (str, bytes))
        or not isinstance(v, Sequence)
        or len(v) != 2
        or not all(_is_int(x) and x > 0 for x in v)
    ):
        raise ValueError(f"{key} must be two positive integers")
    return (int(v[0]), int(v[1]))


def _check_channels(v: Any, key: str) -> int:
    if not _is_int(v) or v <= 0:
        raise ValueError(f"{key} must be a positive integer")
    return int(v)


def _check_norm(v: Any, channels: int, key: str, *, positive: bool) -> tuple[float, ...]:
    what = "positive" if positive else "finite"
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) not in (1, channels):
        raise ValueError(f"{key} must be 1 or {channels} (channels) {what} numbers")
    if not all(_is_num(x) and (x > 0 or not positive) for x in v):
        raise ValueError(f"{key} must be 1 or {channels} (channels) {what} numbers")
    return tuple(float(x) for x in v)


def _check_choice(v: Any, choices: tuple[str, ...], key: str) -> str:
    if v not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)} (got {v!r})")
    return str(v)


def _check_percentiles(v: Any, key: str) -> tuple[float, float]:
    if (
        isinstance(v, (str, bytes))
        or not isinstance(v, Sequence)
        or len(v) != 2
        or not all(_is_num(x) for x in v)
        or not 0.0 <= v[0] < v[1] <= 100.0
    ):
        raise ValueError(f"{key} must be two numbers 0 <= low < high <= 100")
    return (float(v[0]), float(v[1]))


# --------------------------------------------------------------------------------------------
# Decoding (PS3.5 section 8: encoding of pixel data)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    rows: int
    cols: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    transfer_syntax: UID


def _int_attr(ds: pydicom.Dataset, keyword: str, default: int | None) -> int | None:
    """An integer attribute (US/IS), ``default`` when absent or empty; PixelError when unreadable."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PixelError(f"{keyword} {value!r} is not an integer") from None


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """The transfer syntax the data set was encoded with.

    From the File Meta Information (PS3.10 7.1) when present; otherwise (a bare data set such as
    the classic CR-MONO1-10-chest file, read with ``force=True``) from the encoding pydicom
    detected, and failing that the DICOM default, Implicit VR Little Endian (PS3.5 10.1).
    """
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID", None) if meta is not None else None
    if uid:
        return UID(str(uid))
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if little is False:
        return UID("1.2.840.10008.1.2.2")  # Explicit VR Big Endian (retired)
    if implicit is False:
        return ExplicitVRLittleEndian
    return ImplicitVRLittleEndian


def _check_pixel_element_complete(ds: pydicom.Dataset) -> None:
    """A Pixel Data element whose declared length runs past the end of the object (a file cut
    short, or a forged length up to 4 GB) is refused, even when the bytes present happen to
    fill Rows x Columns: pydicom reads such a value to the end of the file without an error."""
    try:
        elem = ds.get_item(0x7FE00010)
    except Exception:
        return
    length = getattr(elem, "length", None)
    value = getattr(elem, "value", None)
    if (
        isinstance(elem, pydicom.dataelem.RawDataElement)
        and isinstance(length, int)
        and length != 0xFFFFFFFF
        and isinstance(value, (bytes, bytearray))
        and len(value) < length
    ):
        raise PixelError(f"Pixel Data declares {length} bytes but the object ends after {len(value)} (truncated)")


def _geometry(ds: pydicom.Dataset, spec: PreprocessSpec) -> _Geometry:
    """Check the Image Pixel module (PS3.3 C.7.6.3) and the declared size, before any decoding."""
    _check_pixel_element_complete(ds)
    if "PixelData" not in ds or ds.PixelData is None or len(ds.PixelData) == 0:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelError("float pixel data is not supported")
        raise PixelError("no pixel data")
    rows = _int_attr(ds, "Rows", 0)
    cols = _int_attr(ds, "Columns", 0)
    if not rows or not cols or rows < 0 or cols < 0:
        raise PixelError(f"image size {rows or 0}x{cols or 0} (Rows x Columns) is empty or missing")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    if samples != 1:
        raise PixelError(f"SamplesPerPixel is {samples}: only single-sample greyscale is supported")
    bits_allocated = _int_attr(ds, "BitsAllocated", None)
    if bits_allocated not in (8, 16):
        raise PixelError(f"BitsAllocated {bits_allocated} is not supported (only 8 or 16)")
    bits_stored = _int_attr(ds, "BitsStored", bits_allocated)
    assert bits_stored is not None
    if not 1 <= bits_stored <= bits_allocated:
        raise PixelError(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")
    pixel_rep = _int_attr(ds, "PixelRepresentation", 0)
    if pixel_rep not in (0, 1):
        raise PixelError(f"PixelRepresentation {pixel_rep} is not 0 or 1")
    frames = _int_attr(ds, "NumberOfFrames", 1) or 1
    if frames < 0:
        raise PixelError(f"NumberOfFrames {frames} is negative")
    declared = rows * cols * frames * (bits_allocated // 8) * samples
    if declared > spec.max_bytes:
        raise PixelError(
            f"declared pixel data {rows}x{cols}x{frames} frame(s) of {bits_allocated} bits "
            f"({declared} bytes) exceeds the limit of {spec.max_bytes} bytes"
        )
    return _Geometry(rows, cols, frames, bits_allocated, bits_stored, pixel_rep == 1, _transfer_syntax(ds))


def _check_native_length(ds: pydicom.Dataset, g: _Geometry) -> bytes:
    """Native Pixel Data must hold exactly Rows*Columns*Frames words, plus at most one pad byte
    (PS3.5 7.1.1: values have even length).  Anything longer is refused, because pydicom would
    silently read the excess as extra frames and a wrong Rows/Columns would go unnoticed."""
    data = ds.PixelData
    expected = g.rows * g.cols * g.frames * (g.bits_allocated // 8)
    if len(data) < expected:
        raise PixelError(
            f"pixel data is truncated: {len(data)} bytes, expected {expected} for "
            f"{g.rows}x{g.cols}x{g.frames} frame(s) of {g.bits_allocated} bits"
        )
    if len(data) > expected + 1:
        raise PixelError(
            f"pixel data is too long: {len(data)} bytes, expected {expected} for "
            f"{g.rows}x{g.cols}x{g.frames} frame(s) of {g.bits_allocated} bits "
            "(wrong Rows/Columns/NumberOfFrames?)"
        )
    return cast(bytes, data)


_JPEG_FAMILY = frozenset(
    {
        "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    }
)
_J2K_FAMILY = frozenset(
    {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
     "1.2.840.10008.1.2.4.203"}
)
#: JPEG 2000 Part 1 codestreams OpenJPEG (Pillow) can decode at reduced resolution.
_J2K_REDUCIBLE = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
#: JPEG SOFn markers (ITU T.81 B.1.1.3) and JPEG-LS SOF55 (T.87): C4 (DHT), C8 (JPG), CC (DAC) are not SOFs.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})


def _first_frame(ds: pydicom.Dataset, g: _Geometry) -> bytes:
    """The encoded bytes of frame 0 of encapsulated Pixel Data (PS3.5 A.4)."""
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(ds.PixelData, number_of_frames=g.frames))
    except StopIteration:
        raise PixelError("encapsulated pixel data holds no frame") from None
    except Exception as exc:  # malformed items: wrong tags, lengths past the end
        raise PixelError(f"encapsulated pixel data is malformed: {exc}") from None


def _check_codestream(frame: bytes, ts: UID, g: _Geometry) -> None:
    """Refuse, before any decoder allocates, a codestream whose own header declares another
    image size than Rows/Columns (a small file can declare gigapixels), or that lacks its end
    marker (decoders fill a truncated JPEG / JPEG-LS scan with garbage without an error)."""
    if ts in _JPEG_FAMILY:
        dims = _jpeg_dims(frame)
        kind, marker = ("JPEG-LS", "SOF55") if ts.endswith((".80", ".81")) else ("JPEG", "SOF")
    elif ts in _J2K_FAMILY:
        dims = _j2k_dims(frame)
        kind, marker = "JPEG 2000", "SIZ"
    else:
        return  # RLE: the decoder's output size comes from Rows/Columns, already checked
    what = f"could not decode {ts.name} ({ts}) pixel data"
    if dims is None:
        raise PixelError(f"{what}: the {kind} codestream of frame 1 has no frame header ({marker} marker)")
    rows, cols = dims
    if (rows, cols) != (g.rows, g.cols):
        raise PixelError(
            f"{what}: the {kind} codestream declares {rows}x{cols} but Rows/Columns say {g.rows}x{g.cols} "
            "(refused before decoding)"
        )
    # EOI (JPEG, JPEG-LS) / EOC (JPEG 2000); encoders pad after it (00 or FF bytes, seen in the
    # wild), and byte stuffing keeps FF D9 out of entropy-coded data, so look at the last bytes.
    if b"\xff\xd9" not in frame[-16:]:
        raise PixelError(f"{what}: the {kind} codestream of frame 1 is truncated (no end-of-image marker)")


def _jpeg_dims(frame: bytes) -> tuple[int, int] | None:
    """(rows, cols) from the first SOF marker segment of a JPEG / JPEG-LS codestream."""
    if frame[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(frame)
    while i + 4 <= n:
        if frame[i] != 0xFF:
            return None
        marker = frame[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:  # no length
            i += 2
            continue
        length = int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            return int.from_bytes(frame[i + 5 : i + 7], "big"), int.from_bytes(frame[i + 7 : i + 9], "big")
        if marker == 0xDA or length < 2:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _siz_dims(frame: bytes, at: int) -> tuple[int, int]:
    """(rows, cols) from a SIZ segment whose Xsiz field starts at ``at`` (Xsiz, Ysiz, XOsiz, YOsiz)."""
    xsiz, ysiz, xo, yo = (int.from_bytes(frame[at + 4 * k : at + 4 + 4 * k], "big") for k in range(4))
    return ysiz - yo, xsiz - xo


def _j2k_dims(frame: bytes) -> tuple[int, int] | None:
    """(rows, cols) from the SIZ marker segment (ISO 15444-1 A.5.1), raw codestream or JP2."""
    i = frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if i < 0 or i + 24 > len(frame):
        return None
    return _siz_dims(frame, i + 8)


@dataclass(frozen=True)
class _J2KHeader:
    rows: int
    cols: int
    precision: int
    signed: bool
    levels: int  # wavelet decomposition levels (COD SPcod), the most a decoder can reduce by


def _j2k_header(frame: bytes) -> _J2KHeader | None:
    """SIZ and COD of a raw JPEG 2000 codestream's main header (ISO 15444-1 A.5.1, A.6.1)."""
    if frame[:4] != b"\xff\x4f\xff\x51":
        return None  # a JP2 file or no codestream: the full decoder handles (or refuses) it
    i, n = 2, len(frame)
    siz: tuple[int, int, int, bool] | None = None
    while i + 4 <= n and frame[i] == 0xFF:
        marker, length = frame[i + 1], int.from_bytes(frame[i + 2 : i + 4], "big")
        if marker == 0x51 and i + 41 <= n:  # SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz ... Csiz, then Ssiz
            ncomp = int.from_bytes(frame[i + 38 : i + 40], "big")
            ssiz = frame[i + 40]
            if ncomp != 1:
                return None
            siz = (*_siz_dims(frame, i + 6), (ssiz & 0x7F) + 1, bool(ssiz & 0x80))
        elif marker == 0x52 and i + 9 < n and siz is not None:  # COD: Lcod Scod SGcod(4) SPcod(levels, ...)
            return _J2KHeader(*siz, levels=frame[i + 9])
        elif marker == 0x90:  # SOT: the main header ended without a COD
            return None
        if length < 2:
            return None
        i += 2 + length
    return None


def _j2k_reduction(header: _J2KHeader, spec: PreprocessSpec) -> int:
    """The largest r with ceil(shorter side / 2**r) >= twice the model input's larger side.

    Twice, not once: the wavelet low-pass band is a different filter from the box + bilinear
    resize the full path uses, and leaving the last halving to that resize keeps the model input
    close to the full decode's (on two real 1,024 px radiographs: mean difference 0.5-0.7 grey
    levels, 99th percentile 4-5, instead of 1.4-1.9 and 11-12 when reducing all the way).
    """
    need = 2 * max(spec.size)
    r = 0
    while r < header.levels and -(-min(header.rows, header.cols) // 2 ** (r + 1)) >= need:
        r += 1
    return r


def _decode_j2k_reduced(frame: bytes, header: _J2KHeader, r: int) -> np.ndarray | None:
    """Decode resolution level ``r`` with OpenJPEG through Pillow (pylibjpeg-openjpeg has no
    reduce option).  Pillow widens precisions of 9-15 bits to 16 by a left shift; undone here.
    None when Pillow returns something else than expected (the caller decodes in full)."""
    import io

    with Image.open(io.BytesIO(frame)) as im:
        im.reduce = r  # type: ignore[method-assign,assignment]  # Jpeg2KImageFile: decode only up to this resolution level
        im.load()
        arr = np.asarray(im)
    if arr.dtype == np.uint16 and 8 < header.precision <= 16:
        return np.ascontiguousarray(arr >> (16 - header.precision)) if header.precision < 16 else arr
    if arr.dtype == np.uint8 and header.precision == 8:
        return arr
    return None


def _decode_frame(ds: pydicom.Dataset, spec: PreprocessSpec) -> tuple[np.ndarray, _Geometry, bool]:
    """First frame as ``(array, geometry, raw)``.

    For native little-endian data ``array`` is a zero-copy, read-only view of the Pixel Data as
    unsigned words and ``raw`` is True: bits above BitsStored are NOT yet masked and signed
    values are NOT yet sign-extended (callers fold that into a lookup table or do it themselves).
    Otherwise ``array`` holds the stored values decoded by pydicom and ``raw`` is False.
    """
    g = _geometry(ds, spec)
    ts = g.transfer_syntax
    if ts in _NATIVE_LE:
        data = _check_native_length(ds, g)
        dtype = np.dtype("<u2") if g.bits_allocated == 16 else np.dtype(np.uint8)
        arr = np.frombuffer(data, dtype=dtype, count=g.rows * g.cols).reshape(g.rows, g.cols)
        return arr, g, True

    if not ts.is_transfer_syntax:
        raise PixelError(f"unsupported transfer syntax {ts}")
    if not ts.is_encapsulated:  # Explicit VR Big Endian (retired): rare; let pydicom swap bytes.
        _check_native_length(ds, g)
    from pydicom.pixels.decoders.base import get_decoder  # local: keeps import time low

    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise PixelError(f"unsupported transfer syntax {ts.name} ({ts})") from None
    if not decoder.is_available:
        raise PixelError(f"no decoder installed for transfer syntax {ts.name} ({ts})")
    failures: list[str] = []  # "decoder: reason" of every decoder tried, for the final refusal
    if ts.is_encapsulated:
        frame = _first_frame(ds, g)
        _check_codestream(frame, ts, g)
        reduced = _try_j2k_reduced(frame, g, spec, failures)
        if reduced is not None:
            return reduced, g, False
        fast = _try_fast_decoders(ds, frame, g, decoder, failures)
        if fast is not None:
            return fast, g, False
    try:
        arr, _meta = decoder.as_array(ds, index=0)
    except Exception as exc:  # any decoder failure is a property of this object's data
        failures.append(f"pydicom: {_one_line(exc)}")
        raise PixelError(f"could not decode {ts.name} ({ts}) pixel data: {'; '.join(failures)}") from exc
    if arr.shape != (g.rows, g.cols):
        raise PixelError(f"decoded image has shape {arr.shape}, expected ({g.rows}, {g.cols}) from Rows/Columns")
    return arr, g, False


def _one_line(exc: BaseException) -> str:
    """An exception as one line: plugins' messages span lines, and the reason ends up in tables and logs."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _try_fast_decoders(
    ds: pydicom.Dataset, frame: bytes, g: _Geometry, decoder: Any, failures: list[str]
) -> np.ndarray | None:
    """The first frame from the faster decoders :mod:`worker.decoders` lists for this transfer
    syntax, or None (pydicom's own choice decodes it).  A decoder that fails or returns another
    shape or dtype than pydicom would is recorded in ``failures`` and the next one is tried."""
    want = np.dtype(f"{'i' if g.signed else 'u'}{g.bits_allocated // 8}")
    for fast in fast_decoders(g.transfer_syntax):
        try:
            arr = fast.decode(Frame(ds, frame, g.rows, g.cols, g.bits_allocated, g.bits_stored, g.signed), decoder)
        except Exception as exc:  # noqa: BLE001 - the next decoder, finally pydicom's, decides
            failures.append(f"{fast.name}: {_one_line(exc)}")
            log.info("%s failed, trying the next decoder: %s", fast.name, failures[-1])
            continue
        if arr is None:
            continue
        if arr.shape != (g.rows, g.cols) or arr.dtype != want:
            failures.append(f"{fast.name}: returned {arr.dtype} {arr.shape}, expected {want} ({g.rows}, {g.cols})")
            continue
        return arr
    return None


def _try_j2k_reduced(frame: bytes, g: _Geometry, spec: PreprocessSpec, failures: list[str]) -> np.ndarray | None:
    """The reduced-resolution JPEG 2000 decode when it applies and succeeds, else None.

    Any failure, or a result of another dtype or shape than the main header promises, is recorded
    in ``failures`` and the caller decodes in full: a codestream can be valid and still refused
    here, e.g. when a tile-part header's COD/COC (ISO 15444-1 A.6.1-A.6.2) gives fewer wavelet
    levels than the main header's COD, which OpenJPEG then cannot reduce by ("broken data stream").
    """
    ts = g.transfer_syntax
    if not (spec.j2k_reduce and ts in _J2K_REDUCIBLE and not g.signed and g.bits_allocated in (8, 16)):
        return None
    header = _j2k_header(frame)
    r = _j2k_reduction(header, spec) if header is not None and not header.signed else 0
    if header is None or r == 0 or header.precision > g.bits_allocated:
        return None
    what = "reduced-resolution decode (OpenJPEG via Pillow)"
    try:
        reduced = _decode_j2k_reduced(frame, header, r)
    except Exception as exc:  # noqa: BLE001 - corrupt or unusual data: the full decoder decides
        failures.append(f"{what}: {_one_line(exc)}")
    else:
        want = (-(-g.rows // 2**r), -(-g.cols // 2**r))
        if reduced is None:
            failures.append(f"{what}: unexpected sample type for {header.precision}-bit data")
        elif reduced.shape != want:
            failures.append(f"{what}: level {r} has shape {reduced.shape}, expected {want}")
        else:
            return reduced
    log.info("%s failed, decoding in full: %s", what, failures[-1])
    return None


def decode(ds: pydicom.Dataset, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    """Stored pixel values of the first frame as a 2-D array (no LUTs applied). Raises PixelError with
    a readable reason for: no PixelData, Rows/Columns zero or missing, declared size over
    spec.max_bytes (check BEFORE decoding), SamplesPerPixel != 1, native pixel data shorter than
    Rows*Columns*frames*BitsAllocated/8 (truncated) or more than that plus one padding byte (too
    long: pydicom would silently read it as extra frames), encapsulated data that fails to decode
    (catch the decoder's exception and say which transfer syntax), decoded array whose shape isn't
    (Rows, Columns), unsupported transfer syntax.

    Native little-endian data (Implicit/Explicit VR LE, Deflated) is read with ``np.frombuffer``
    (PS3.5 8.1.1): dtype uint8/uint16 or int8/int16 per BitsAllocated and PixelRepresentation,
    bits above BitsStored masked off (unsigned) or replaced by the sign bit (signed, two's
    complement).  When no masking is needed the result is a read-only view of ``ds.PixelData``.
    Encapsulated data (RLE, JPEG, JPEG-LS, JPEG 2000, HTJ2K) and Explicit VR Big Endian go through
    pydicom's decoders, decoding only frame 0.  BitsAllocated must be 8 or 16.
    """
    arr, g, raw = _decode_frame(ds, spec)
    if not raw:
        return arr
    bits = g.bits_allocated
    if g.signed:
        signed = arr.view(np.int16 if bits == 16 else np.int8)
        if g.bits_stored == bits:
            return signed
        shift = bits - g.bits_stored  # move the sign bit to the top, then shift back arithmetically
        return (arr << shift).view(signed.dtype) >> shift
    if g.bits_stored == bits:
        return arr
    return cast(np.ndarray, arr & arr.dtype.type((1 << g.bits_stored) - 1))


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
