"""Stored pixel values of the first frame (:func:`decode`): native data with ``np.frombuffer``,
compressed data through the fast decoders of worker/decoders.py, reduced-resolution JPEG 2000
where the model input is much smaller, then pydicom's own plugins.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import numpy as np
import pydicom
from PIL import Image

from worker.decoders import Frame, fast_decoders
from worker.imaging.codestream import (
    _J2K_REDUCIBLE,
    _check_codestream,
    _check_native_length,
    _first_frame,
    _Geometry,
    _geometry,
    _j2k_header,
    _j2k_reduction,
    _J2KHeader,
)
from worker.imaging.spec import _NATIVE_LE, PixelError, PreprocessSpec

log = logging.getLogger(__name__)

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
