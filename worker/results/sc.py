"""The optional Secondary Capture (PS3.3 A.8.1): a downscaled copy of the source under a
burned-in banner that says what the model found and that it is not a diagnosis.

Built with pydicom directly; why not highdicom's ``SCImage`` is in the package docstring.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from PIL import Image, ImageDraw, ImageFont
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from worker.imaging import PreprocessSpec, decode, to_grey8
from worker.results.common import (
    DISCLAIMER,
    MANUFACTURER,
    SC_MAX_SIDE,
    SC_SERIES_NUMBER,
    SERIES_DESCRIPTION,
    TriageResult,
    _contributing_equipment,
    _copy_patient_and_study,
    _dicom_dt,
    _instance_number,
    _now,
    _require_uids,
    _set_common,
    _text,
    _valid_value,
    result_uids,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- SC


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in bitmap font (no FreeType, no font files): same pixels everywhere.
    Loaded once (it was loaded about 13 times per SC, ~6 ms); only read from afterwards."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1
    return loader() if loader is not None else ImageFont.load_default()


def _banner_lines(result: TriageResult) -> list[str]:
    return [
        DISCLAIMER,
        f"{result.predicted_class}: P={result.probability:.2f}  priority: {result.priority.upper()}",
        f"model: {result.model_name} {result.model_version}",
    ]


@dataclass(frozen=True)
class _BannerLayout:
    lines: tuple[str, ...]
    scale: int  # integer magnification of the bitmap font
    line_w: int  # widest line at 1x
    line_h: int  # line pitch at 1x
    pad: int  # at 1x
    width: int

    @property
    def height(self) -> int:
        return (self.line_h * len(self.lines) + 2 * self.pad) * self.scale


def _banner_layout(lines: Sequence[str], width: int) -> _BannerLayout:
    """Scale the bitmap font by the largest integer (at most 4) that keeps the widest line
    within about 90% of ``width``; lines are cut with '...' only on tiny images (< ~250 px)."""
    font = _font()
    pad = 4

    def size(s: str) -> tuple[int, int]:
        left, top, right, bottom = font.getbbox(s)
        return max(1, int(right) - min(int(left), 0)), max(1, int(bottom) - min(int(top), 0))

    fitted = list(lines)
    avail = max(8, width - 2 * pad)
    for i, s in enumerate(fitted):
        while len(s) > 4 and size(s)[0] > avail:
            s = s[:-4] + "..."
        fitted[i] = s
    line_w = max(size(s)[0] for s in fitted)
    line_h = max(size(s)[1] for s in fitted) + 3
    scale = int(max(1, min(4, (0.9 * avail) // line_w)))
    return _BannerLayout(tuple(fitted), scale, line_w, line_h, pad, width)


def _render_banner(layout: _BannerLayout) -> Image.Image:
    """White text on black; the 1x rendering is magnified with nearest neighbour, so glyphs stay
    crisp (Pillow's bitmap font has one size)."""
    font = _font()
    small = Image.new("L", (layout.line_w, layout.line_h * len(layout.lines)), 0)
    draw = ImageDraw.Draw(small)
    for i, s in enumerate(layout.lines):
        draw.text((0, i * layout.line_h + 1), s, fill=255, font=font)
    k = layout.scale
    text = small.resize((small.width * k, small.height * k), Image.Resampling.NEAREST)
    banner = Image.new("L", (layout.width, layout.height), 0)
    banner.paste(text, (max(0, (layout.width - text.width) // 2), layout.pad * k))
    return banner


def _fit(h: int, w: int, lines: Sequence[str]) -> tuple[int, int, _BannerLayout]:
    """The largest image size (aspect kept, never enlarged) such that image plus banner has its
    long side <= SC_MAX_SIDE.  The banner's height grows with the width, so search for it."""

    def size_for(th: int) -> tuple[int, int, _BannerLayout]:
        tw = max(1, round(w * th / h))
        return th, tw, _banner_layout(lines, tw)

    def fits(th: int) -> bool:
        th, tw, layout = size_for(th)
        return max(tw, th + layout.height) <= SC_MAX_SIDE

    lo, hi = 1, min(h, SC_MAX_SIDE)
    if not fits(lo):  # absurd aspect ratios: give up on the limit rather than fail
        return size_for(lo)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return size_for(lo)


def _sc_pixels(source: Dataset, result: TriageResult) -> np.ndarray:
    """8-bit MONOCHROME2 display image (imaging.decode + to_grey8), downscaled, banner on top;
    the long side of the whole image is at most :data:`SC_MAX_SIDE`."""
    spec = PreprocessSpec()
    grey = np.ascontiguousarray(to_grey8(source, decode(source, spec), spec), dtype=np.uint8)
    img = Image.fromarray(grey)
    th, tw, layout = _fit(img.height, img.width, _banner_lines(result))
    if (tw, th) != (img.width, img.height):
        img = img.resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0)
    banner = _render_banner(layout)
    canvas = Image.new("L", (tw, th + banner.height), 0)
    canvas.paste(banner, (0, 0))
    canvas.paste(img, (0, banner.height))
    return np.asarray(canvas, dtype=np.uint8)


#: Compressed transfer syntaxes that are lossless (PS3.5 A.4, 8.2): a source sent in one of these
#: is not lossy by its transfer syntax. (pydicom 3.0's UID has no ``is_lossless``.)
_LOSSLESS_SYNTAXES = frozenset({
    uid.RLELossless, uid.JPEGLossless, uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEG2000Lossless,
    uid.JPEG2000MCLossless, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.DeflatedExplicitVRLittleEndian,
})


def _is_lossy(source: Dataset) -> bool:
    """PS3.3 C.7.6.1.1.5: once lossy-compressed, always flagged, also in derived images."""
    if _text(source, "LossyImageCompression") == "01":
        return True
    meta = getattr(source, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    return bool(ts) and ts.is_transfer_syntax and ts.is_compressed and ts not in _LOSSLESS_SYNTAXES


def build_sc(source: pydicom.Dataset, result: TriageResult, *, now: datetime | None = None) -> pydicom.Dataset:
    """Optional Secondary Capture (PS3.3 A.8.1): the source image (decode + to_grey8, downscaled
    so the long side is <= 1024 px) under a burned-in banner with the predicted class, its
    probability, the priority, model name/version and 'AI triage - not for diagnosis'.

    BurnedInAnnotation YES, ImageType DERIVED\\SECONDARY, 8-bit MONOCHROME2, Explicit VR Little
    Endian, Patient/Study copied, new series (:data:`SC_SERIES_NUMBER`, Modality OT),
    ConversionType WSD (C.8.6.1), the source in SourceImageSequence, deterministic UIDs from
    :func:`result_uids`.  The banner carries no patient identity.  Raises
    :class:`worker.imaging.PixelError` when the source pixels cannot be read, ValueError when the
    source lacks its UIDs.
    """
    now = _now(now)
    sop_class, sop_uid, study_uid, _series = _require_uids(source)
    uids = result_uids(sop_uid, study_uid, result.model_name, result.model_version)
    pixels = _sc_pixels(source, result)
    date, time = _dicom_dt(now)

    ds = Dataset()
    # SOP Common (C.12.1)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uids.sc_instance
    _set_common(ds, source, now)
    ds.ContributingEquipmentSequence = [_contributing_equipment(result, now)]
    # Patient, General Study, Patient Study
    _copy_patient_and_study(source, ds)
    # General Series (C.7.3.1)
    ds.Modality = "OT"
    ds.SeriesInstanceUID = uids.sc_series
    ds.SeriesNumber = SC_SERIES_NUMBER
    ds.SeriesDescription = SERIES_DESCRIPTION
    # Type 2C: required (may be empty) unless Image Laterality is present; copied if known.
    ds.Laterality = _text(source, "Laterality") or None
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1)
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = result.model_name[:64]
    ds.SecondaryCaptureDeviceSoftwareVersions = result.model_version[:64]
    # General Image (C.7.6.1) and SC Image (C.8.6.2)
    ds.InstanceNumber = _instance_number(source)
    # Type 2C (C.7.6.1.1.1): row and column direction; unchanged by scaling, so copied when valid.
    ds.PatientOrientation = None
    if "PatientOrientation" in source:
        elem = source["PatientOrientation"]
        if isinstance(elem.value, (list, MultiValue)) and len(elem.value) == 2 and _valid_value(elem):
            ds.PatientOrientation = list(elem.value)
    ds.ContentDate = date
    ds.ContentTime = time
    ds.DateOfSecondaryCapture = date
    ds.TimeOfSecondaryCapture = time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"Downscaled display rendering with burned-in banner: {DISCLAIMER}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_uid
    ref.PurposeOfReferenceCodeSequence = [CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)]
    ds.SourceImageSequence = [ref]
    ds.BurnedInAnnotation = "YES"
    if _is_lossy(source):
        ds.LossyImageCompression = "01"
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if kw in source and source[kw].value not in (None, ""):
                setattr(ds, kw, source[kw].value)
    else:
        ds.LossyImageCompression = "00"
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()  # even length padding is added by pydicom on write

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    log.debug("built SC %s (%dx%d) for source %s", uids.sc_instance, ds.Columns, ds.Rows, sop_uid)
    return ds
