"""Pixel Data before decoding (PS3.5 section 8): the declared geometry, native lengths, the first
frame of encapsulated data and its codestream header (JPEG SOF, JPEG 2000 SIZ/COD), checked
against Rows/Columns before a decoder is trusted with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pydicom
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from worker.imaging.spec import PixelError, PreprocessSpec

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
