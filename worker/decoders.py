"""Which decoder reads a frame of compressed pixel data first, per transfer syntax (PS3.5 A.4).

pydicom picks among its installed plugins in a fixed order, and for two syntaxes that order is
the slow one (2,000 x 2,500 12-bit, one core, ``bench/decode.py``; bench/README.md has the run):

* JPEG lossless, processes 14 / 14 SV1 (PS3.5 A.4.1): pydicom uses pylibjpeg-libjpeg; libjpeg-turbo
  3 through ``imagecodecs.jpeg8_decode`` is about 5 times faster and bit-exact (lossless, so any
  correct decoder gives the same samples).  imagecodecs is optional (the ``codecs`` extra: a
  26 MB wheel, about 80 MB installed); without it pydicom decodes as before.
* JPEG-LS (A.4.3): pydicom tries pylibjpeg-libjpeg before pyjpegls (CharLS), which is about 4 times
  faster; so pyjpegls is asked first (a base dependency: a 2.7 MB wheel, 8 MB installed).
* RLE Lossless (A.4.2): pylibjpeg-rle explicitly, ahead of pydicom's pure-numpy decoder.

JPEG 2000 keeps its reduced-resolution shortcut in :mod:`worker.imaging`; in full, pydicom's choice
(pylibjpeg-openjpeg) was as fast as the alternatives.  Lossy JPEG (A.4.1 processes 1, 2/4) stays
with pydicom: another IDCT would change pixels.  Every decoder here is only a first try: the
caller records its failure and falls back to pydicom's own decoders, so no image that pydicom
reads is refused because a faster decoder could not.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pydicom

__all__ = ["Frame", "FastDecoder", "fast_decoders"]

log = logging.getLogger(__name__)

_JPEG_LOSSLESS = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_RLE = "1.2.840.10008.1.2.5"


@dataclass(frozen=True)
class Frame:
    """One encoded frame and what the Image Pixel module (PS3.3 C.7.6.3) says it holds."""

    ds: pydicom.Dataset
    data: bytes
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    signed: bool


#: A decoder: the frame's stored values as a (rows, cols) array of pydicom's dtype for the
#: image, ``None`` when it does not apply to this image (pydicom decodes it), or an exception.
Decode = Callable[[Frame, Any], "np.ndarray | None"]


@dataclass(frozen=True)
class FastDecoder:
    name: str
    decode: Decode


def _sof(data: bytes) -> tuple[int, int] | None:
    """(SOF marker, sample precision) of a JPEG codestream's frame header (ITU T.81 B.2.2)."""
    i, n = 2, len(data)
    while i + 5 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker, data[i + 4]
        if marker == 0xDA:
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _imagecodecs_jpeg8(frame: Frame, _decoder: Any) -> np.ndarray | None:
    """libjpeg-turbo 3 (lossless, SOF3) via imagecodecs, for unsigned samples that fit BitsStored
    (so no masking or sign extension is due, and the samples are exactly pydicom's).  dcmtk writes
    12-bit data with a 16-bit sample precision; then the values are checked against BitsStored
    and anything above it is left to pydicom."""
    sof = _sof(frame.data)
    if frame.signed or sof is None or sof[0] != 0xC3 or not 2 <= sof[1] <= frame.bits_allocated:
        return None
    import imagecodecs

    arr = imagecodecs.jpeg8_decode(frame.data)
    want = np.dtype(f"u{frame.bits_allocated // 8}")
    if arr.ndim != 2 or arr.dtype.kind != "u" or arr.dtype.itemsize > want.itemsize:
        raise ValueError(f"unexpected result {arr.dtype} {arr.shape}")
    if sof[1] > frame.bits_stored and arr.size and int(arr.max()) >> frame.bits_stored:
        return None
    return arr if arr.dtype == want else arr.astype(want)


def _pydicom_plugin(plugin: str) -> Decode:
    """pydicom's decoder restricted to one plugin: the same conversions as pydicom's default path
    (signed data, Pixel Representation mismatches), only another plugin order."""

    def run(frame: Frame, decoder: Any) -> np.ndarray | None:
        if plugin not in decoder.available_plugins:
            return None
        arr, _meta = decoder.as_array(frame.ds, index=0, decoding_plugin=plugin)
        return cast(np.ndarray, arr)

    return run


@functools.lru_cache(maxsize=1)
def _have_imagecodecs() -> bool:
    return importlib.util.find_spec("imagecodecs") is not None


def fast_decoders(transfer_syntax: str) -> tuple[FastDecoder, ...]:
    """The decoders to try, in order, before pydicom's own choice for ``transfer_syntax``."""
    if transfer_syntax in _JPEG_LOSSLESS:
        return (FastDecoder("imagecodecs (libjpeg-turbo)", _imagecodecs_jpeg8),) if _have_imagecodecs() else ()
    if transfer_syntax in _JPEG_LS:
        return (FastDecoder("pydicom with pyjpegls (CharLS)", _pydicom_plugin("pyjpegls")),)
    if transfer_syntax == _RLE:
        return (FastDecoder("pydicom with pylibjpeg-rle", _pydicom_plugin("pylibjpeg")),)
    return ()
