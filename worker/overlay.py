"""The heatmap Secondary Capture (issue 17): where the model looked, for a person to see.

With ``send.heatmap = true`` every screened image gets, besides its SR, one Secondary Capture
Image (PS3.3 A.8.1) in the source study:

* what the model saw (the centre square that ``worker.imaging`` crops, from the same 8-bit
  display rendering as the banner SC) with the Grad-CAM heatmap of :mod:`worker.heatmap`
  blended over it in colour, one panel per class shown (the predicted class, then COVID-19 /
  pneumonia when over their thresholds: :func:`worker.heatmap.cam_classes`), each captioned
  with the class and its probability;
* a burned-in banner "AI heatmap - not for diagnosis" with the model name and version, and a
  legend (the colour scale from low to high attention, and what the map is);
* RGB, 8 bits, PlanarConfiguration 0 (PS3.3 C.7.6.3.1.3), BurnedInAnnotation YES, ImageType
  DERIVED\\SECONDARY, ConversionType WSD, the source in SourceImageSequence; long side at most
  1024 px like the banner SC.
* UIDs: deterministic (:func:`heatmap_uids`, ``2.25.<UUIDv5>`` of the source SOP Instance UID,
  the study and the model name + version), so a re-run replaces the object in the PACS.

The header is the banner SC's (``worker.results.build_sc``: Patient, Study, equipment,
lossy-compression flags, dates), with this object's UIDs, series, description and pixels put in;
that keeps one implementation of those modules.  The SR points at the heatmap by
:func:`reference_in_sr`: an IMAGE content item "AI heatmap" (local code) in its Qualitative
Evaluations container, and the SC in PertinentOtherEvidenceSequence (PS3.3 C.17.2.3: every
instance the content tree references is listed as evidence).  The heatmap is not a finding:
the SR's probabilities and triage stay what they are.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import UID

from worker.imaging import PreprocessSpec, decode, to_grey8
from worker.results import LOCAL_SCHEME, TriageResult, build_sc

log = logging.getLogger(__name__)

__all__ = [
    "HEATMAP_DISCLAIMER",
    "HEATMAP_SERIES_NUMBER",
    "build_heatmap_sc",
    "colour_table",
    "colourize",
    "heatmap_uids",
    "overlay_pixels",
    "reference_in_sr",
]

HEATMAP_DISCLAIMER = "AI heatmap - not for diagnosis"
HEATMAP_SERIES_NUMBER = 9903
MAX_SIDE = 1024
#: Opacity of the colour at full attention (0 attention shows the grey image unchanged).
ALPHA = 0.55
_NAMESPACE = uuid.UUID("0c4b8e7a-2f61-4d3c-a9e5-7b1d6c2e8f93")  # fixed forever: UIDs depend on it
#: Qualitative Evaluations (C0034375, UMLS): the container the SR's IMAGE item goes into.
_QUALITATIVE_EVALUATIONS = ("C0034375", "UMLS")
_HEATMAP_CODE = ("AIHEATMAP", LOCAL_SCHEME, "AI heatmap")


def _uid(kind: str, *parts: str) -> UID:
    name = json.dumps(["cxr-triage", kind, *parts], separators=(",", ":"), ensure_ascii=True)
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, name).int}")


def heatmap_uids(
    source_sop_instance_uid: str, study_instance_uid: str, model_name: str, model_version: str
) -> tuple[UID, UID]:
    """``(series UID, instance UID)`` of the heatmap SC: one series per study and model version."""
    return (
        _uid("heatmap-series", str(study_instance_uid), model_name, model_version),
        _uid("heatmap-instance", str(source_sop_instance_uid), model_name, model_version),
    )


# --------------------------------------------------------------------------- pixels


@functools.lru_cache(maxsize=1)
def colour_table() -> np.ndarray:
    """(256, 3) uint8: blue -> cyan -> green -> yellow -> red (a 'jet'-like scale, readable on grey)."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    rgb = np.array([[0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], dtype=np.float64)
    x = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(x, stops, rgb[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)
    table.flags.writeable = False
    return table


def colourize(grey: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``(H, W)`` uint8 grey and ``(H, W)`` heat in [0, 1] -> ``(H, W, 3)`` uint8: the colour of the
    heat blended over the grey with opacity ``alpha * heat`` (no attention: the grey unchanged)."""
    h = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    colour = np.take(colour_table(), (h * 255.0 + 0.5).astype(np.uint8), axis=0).astype(np.float32)
    g = np.asarray(grey, dtype=np.float32)[..., None]
    a = (np.float32(alpha) * h)[..., None]
    return (g + a * (colour - g) + 0.5).astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1: the bitmap font
    return loader() if loader is not None else ImageFont.load_default()


def _text_block(lines: Sequence[str], width: int, scale: int) -> Image.Image:
    """White lines of Pillow's bitmap font on black, magnified by ``scale`` (nearest: crisp glyphs)."""
    font = _font()
    line_h = 14
    w1 = max(1, width // scale)
    small = Image.new("L", (w1, line_h * len(lines) + 4), 0)
    draw = ImageDraw.Draw(small)
    for i, s in enumerate(lines):
        while len(s) > 4 and draw.textlength(s, font=font) > w1 - 4:
            s = s[:-4] + "..."
        draw.text((2, 2 + i * line_h), s, fill=255, font=font)
    return small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)


def _legend(width: int, scale: int) -> Image.Image:
    """The colour scale with 'low' and 'high' at its ends, and what the colours mean."""
    font = _font()
    bar_w, bar_h = max(32, width // (2 * scale)), 8
    small = Image.new("RGB", (max(1, width // scale), 28), (0, 0, 0))
    draw = ImageDraw.Draw(small)
    x0 = (small.width - bar_w) // 2
    draw.text((max(0, x0 - 26), 1), "low", fill=(255, 255, 255), font=font)
    draw.text((x0 + bar_w + 4, 1), "high", fill=(255, 255, 255), font=font)
    bar = colour_table()[np.linspace(0, 255, bar_w).round().astype(int)][None].repeat(bar_h, axis=0)
    small.paste(Image.fromarray(np.ascontiguousarray(bar)), (x0, 2))
    note = "Grad-CAM: where the model looked, not a finding"
    while len(note) > 4 and draw.textlength(note, font=font) > small.width - 4:
        note = note[:-4] + "..."
    draw.text(
        (max(2, (small.width - int(draw.textlength(note, font=font))) // 2), 14), note, fill=(255, 255, 255), font=font
    )
    return small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)


def _crop(grey: np.ndarray, crop: str) -> np.ndarray:
    """What the model saw: the centre square on the shorter side (``imaging``'s crop)."""
    rows, cols = grey.shape
    if crop == "none" or rows == cols:
        return grey
    side = min(rows, cols)
    top, left = (rows - side) // 2, (cols - side) // 2
    return grey[top : top + side, left : left + side]


def overlay_pixels(
    grey8: np.ndarray,
    cams: Mapping[str, np.ndarray],
    probabilities: Mapping[str, float],
    banner: Sequence[str],
    crop: str = "center_square",
) -> np.ndarray:
    """``(rows, cols, 3)`` uint8: banner, one captioned overlay panel per class in ``cams`` (in its
    order), legend; the long side is at most :data:`MAX_SIDE`."""
    if not cams:
        raise ValueError("overlay_pixels needs at least one heatmap")
    view = _crop(np.asarray(grey8, dtype=np.uint8), crop)
    n = len(cams)
    gap = 8
    # panels of 320-512 px: small sources are enlarged (a display rendering; the banner and legend
    # stay legible), large ones reduced; n panels side by side fit MAX_SIDE
    side = int(min(max(max(view.shape), 320), 512, (MAX_SIDE - gap * (n - 1)) // n))
    vh, vw = view.shape
    ph, pw = (
        (side, side) if vh == vw else (max(1, round(side * vh / max(vh, vw))), max(1, round(side * vw / max(vh, vw))))
    )
    width = pw * n + gap * (n - 1)
    scale = int(max(1, min(3, width // 250)))
    top = _text_block(list(banner), width, scale)
    panels = Image.new("RGB", (width, ph), (0, 0, 0))
    grey_img = Image.fromarray(np.ascontiguousarray(view))
    if grey_img.size != (pw, ph):
        grey_img = grey_img.resize((pw, ph), Image.Resampling.LANCZOS, reducing_gap=3.0)
    grey_small = np.asarray(grey_img, dtype=np.uint8)
    captions = []
    for i, (cls_name, cam) in enumerate(cams.items()):
        heat = Image.fromarray(np.asarray(cam, dtype=np.float32)).resize((pw, ph), Image.Resampling.BILINEAR)
        panel = colourize(grey_small, np.asarray(heat))
        panels.paste(Image.fromarray(panel), (i * (pw + gap), 0))
        captions.append(f"{cls_name}: P={float(probabilities.get(cls_name, float('nan'))):.2f}")
    cap_parts = [_text_block([c], pw, max(1, min(scale, 2))) for c in captions]
    cap = Image.new("L", (width, max(p.height for p in cap_parts)), 0)
    for i, p in enumerate(cap_parts):
        cap.paste(p, (i * (pw + gap), 0))
    legend = _legend(width, max(1, min(scale, 2)))
    canvas = Image.new("RGB", (width, top.height + ph + cap.height + legend.height), (0, 0, 0))
    y = 0
    for part in (top.convert("RGB"), panels, cap.convert("RGB"), legend):
        canvas.paste(part, (0, y))
        y += part.height
    if max(canvas.size) > MAX_SIDE:  # very tall banners on tiny images: shrink the whole
        k = MAX_SIDE / max(canvas.size)
        canvas = canvas.resize(
            (max(1, round(canvas.width * k)), max(1, round(canvas.height * k))), Image.Resampling.LANCZOS
        )
    return np.asarray(canvas, dtype=np.uint8)


# --------------------------------------------------------------------------- DICOM


def build_heatmap_sc(
    source: Dataset,
    result: TriageResult,
    cams: Mapping[str, np.ndarray],
    *,
    crop: str = "center_square",
    now: datetime | None = None,
) -> Dataset:
    """The heatmap Secondary Capture of ``source`` (see the module docstring).

    ``cams``: class name -> ``(H, W)`` heatmap in [0, 1] over the model input (from
    :func:`worker.heatmap.gradcam`), in display order; ``crop``: the card's preprocessing crop.
    Raises :class:`worker.imaging.PixelError` when the source pixels cannot be read, ValueError
    when the source lacks its UIDs (as ``build_sc``)."""
    ds = build_sc(source, result, now=now)  # the header of the banner SC; pixels replaced below
    series, instance = heatmap_uids(
        str(source.SOPInstanceUID), str(source.StudyInstanceUID), result.model_name, result.model_version
    )
    spec = PreprocessSpec()
    grey = np.ascontiguousarray(to_grey8(source, decode(source, spec), spec), dtype=np.uint8)
    banner = [
        HEATMAP_DISCLAIMER,
        f"model: {result.model_name} {result.model_version}",
        f"prediction: {result.predicted_class} (P={result.probability:.2f}), priority {result.priority.upper()}",
    ]
    pixels = overlay_pixels(grey, cams, result.probabilities, banner, crop)
    ds.SOPInstanceUID = instance
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.SeriesInstanceUID = series
    ds.SeriesNumber = HEATMAP_SERIES_NUMBER
    ds.SeriesDescription = HEATMAP_DISCLAIMER
    ds.DerivationDescription = (
        f"Grad-CAM heatmap of {', '.join(cams)} over the model's input crop, burned in: {HEATMAP_DISCLAIMER}"
    )[:1024]
    ds.BurnedInAnnotation = "YES"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0  # colour-by-pixel (C.7.6.3.1.3)
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    log.debug(
        "built heatmap SC %s (%dx%d, %s) for source %s",
        instance,
        ds.Columns,
        ds.Rows,
        ",".join(cams),
        source.SOPInstanceUID,
    )
    return ds


def _code_seq(code: tuple[str, str, str]) -> list[Dataset]:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return [item]


def reference_in_sr(sr: Dataset, sc: Dataset) -> Dataset:
    """Point ``sr`` (from ``worker.results.build_sr``) at the heatmap ``sc``, in place; returns ``sr``.

    Adds ``CONTAINS IMAGE (AIHEATMAP, 99CXRTRIAGE, "AI heatmap")`` to the root's Qualitative
    Evaluations container and the SC to PertinentOtherEvidenceSequence (C.17.2.3).  The container
    is copied first: ``build_sr`` may share it with its cache."""
    content = sr.ContentSequence
    at = next(
        (
            i
            for i, item in enumerate(content)
            if "ConceptNameCodeSequence" in item
            and (item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
            == _QUALITATIVE_EVALUATIONS
        ),
        None,
    )
    if at is None:
        raise ValueError("the SR has no Qualitative Evaluations container to reference the heatmap from")
    container = copy.deepcopy(content[at])
    image = Dataset()
    image.RelationshipType = "CONTAINS"
    image.ValueType = "IMAGE"
    image.ConceptNameCodeSequence = _code_seq(_HEATMAP_CODE)
    ref = Dataset()
    ref.ReferencedSOPClassUID = sc.SOPClassUID
    ref.ReferencedSOPInstanceUID = sc.SOPInstanceUID
    image.ReferencedSOPSequence = [ref]
    container.ContentSequence.append(image)
    content[at] = container

    sop = Dataset()
    sop.ReferencedSOPClassUID = sc.SOPClassUID
    sop.ReferencedSOPInstanceUID = sc.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = sc.SeriesInstanceUID
    series.ReferencedSOPSequence = [sop]
    study = Dataset()
    study.StudyInstanceUID = sc.StudyInstanceUID
    study.ReferencedSeriesSequence = [series]
    sr.PertinentOtherEvidenceSequence = [study]
    return sr
