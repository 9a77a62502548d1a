"""Header-only input filter: is this object a frontal chest radiograph the model can read?

:func:`check` looks at DICOM attributes only and never touches (or decodes) Pixel Data, so it is
cheap enough to run on everything the node receives.  A non-None result is a reason a person can
read; the pipeline stores it on a ``skipped`` job.  Pixel-level problems (truncated or corrupt
data) are found later by :mod:`worker.imaging`, which raises ``PixelError``.

Attributes used (PS3.3): Modality (C.7.3.1.1.1), SOP Class UID (C.12.1), Body Part Examined
(C.7.3.1, values from PS3.16 Annex L), View Position (C.8.11.5 DX, C.8.1.1 CR), View Code
Sequence (C.8.11.5.1), Presentation Intent Type (C.8.11.1.1.1), Photometric Interpretation and
Samples per Pixel (C.7.6.3.1).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pydicom
from pydicom.multival import MultiValue

__all__ = ["ACCEPTED_MODALITIES", "SECONDARY_CAPTURE_CLASSES", "check"]

log = logging.getLogger(__name__)

ACCEPTED_MODALITIES = frozenset({"CR", "DX"})

#: Secondary Capture Image Storage and its multi-frame greyscale byte/word variants (PS3.4 B.5).
#: Public chest X-ray sets are often distributed as SC objects converted from 8-bit images.
SECONDARY_CAPTURE_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC Image Storage
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC Image Storage
    }
)

#: View Position defined terms that are not a frontal (AP/PA) projection.  Lateral decubitus
#: (LLD/RLD) is excluded too: the model was trained on erect/supine frontal films only.
_LATERAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LATERAL DECUBITUS"})
_OBLIQUE_VIEWS = frozenset({"RLO", "LLO", "RAO", "LAO", "RPO", "LPO", "OBLIQUE"})

#: Body Part Examined values that mean chest (PS3.16 Annex L: CHEST, THORAX; vendor variants).
_CHEST_BODY_PART = re.compile(r"CHEST|THORA[XC]|LUNG|CXR", re.IGNORECASE)
#: Words in descriptions that make a Secondary Capture plausibly a chest radiograph.
_CHEST_WORDS = re.compile(r"chest|thora[xc]|lung|cxr|pneumon|covid", re.IGNORECASE)


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """An attribute as stripped text ("" when absent or empty); first value if multi-valued."""
    value: Any = ds.get(keyword, None)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else ""
    return str(value).strip()


def _chest_evidence(ds: pydicom.Dataset) -> bool:
    """Body Part Examined says chest, or a study/series/protocol description mentions it."""
    if _CHEST_BODY_PART.search(_text(ds, "BodyPartExamined")):
        return True
    return any(
        _CHEST_WORDS.search(_text(ds, kw)) for kw in ("StudyDescription", "SeriesDescription", "ProtocolName")
    )


#: Anatomy other than the chest, as radiography study/series/protocol descriptions name it
#: (PS3.16 Annex L body parts and their common abbreviations). Whole words only: "HAND" in
#: "XR HAND LEFT 2 VIEWS", never "HANDLING".
_OTHER_ANATOMY = re.compile(
    r"\b(HANDS?|FINGERS?|THUMB|WRISTS?|FOREARM|ELBOWS?|HUMERUS|SHOULDERS?|CLAVICLE|SCAPULA|KNEES?|PATELLA|TIBIA|"
    r"FIBULA|TIB/FIB|ANKLES?|FOOT|FEET|TOES?|HEEL|CALCANEUS|HIPS?|PELVIS|FEMUR|SACRUM|COCCYX|SPINE|[CLT]-SPINE|"
    r"CERVICAL|LUMBAR|SKULL|HEAD|FACIAL|SINUS(ES)?|MANDIBLE|NASAL|ORBITS?|ABDOMEN|ABD|KUB|LEG|ARM|BREAST|MAMMO\w*|"
    r"DENTAL|TEETH|EXTREMITY|SI JOINTS?)\b",
    re.IGNORECASE,
)
_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")


def _other_anatomy_in_descriptions(ds: pydicom.Dataset) -> str | None:
    """With Body Part Examined empty: the non-chest body part the descriptions name, if they name
    one and none of them mentions the chest (e.g. "HAND (StudyDescription)"); else None.

    Only the matched word and the attribute's keyword are returned: descriptions are free text
    and the reason is stored and audited.
    """
    texts = [(kw, _text(ds, kw)) for kw in _DESCRIPTIONS]
    if any(_CHEST_WORDS.search(t) for _, t in texts):
        return None
    for kw, t in texts:
        m = _OTHER_ANATOMY.search(t)
        if m:
            return f"{m.group(0).upper()} ({kw})"
    return None


def _view_code_meaning(ds: pydicom.Dataset) -> str:
    seq = ds.get("ViewCodeSequence", None)
    if not seq:
        return ""
    return str(seq[0].get("CodeMeaning", "") or "").strip().lower()


#: Written into every result object (worker/results/); kept here to avoid importing highdicom.
OWN_SERIES_DESCRIPTION = "AI triage - not for diagnosis"
OWN_MANUFACTURER = "cxr-triage"


def check(ds: pydicom.Dataset) -> str | None:
    """Header-only (never decodes pixels): None when the object looks like a frontal chest radiograph
    we can read; otherwise a reason a person can read, which becomes a 'skipped' row. Rules: no
    PixelData -> "no pixel data"; Modality not CR/DX -> skip, EXCEPT Secondary Capture (SOPClassUID
    1.2.840.10008.5.1.4.1.1.7 and its multi-frame greyscale variants
    1.2.840.10008.5.1.4.1.1.7.2/.7.3) which passes only with chest evidence (BodyPartExamined
    CHEST/THORAX, or StudyDescription/SeriesDescription/ProtocolName mentioning chest, thorax, lung,
    CXR, or pneumonia/covid); ViewPosition lateral (LL, RL, LATERAL, LLD, RLD...) -> "lateral view";
    BodyPartExamined present and not chest-like -> e.g. "body part KNEE is not chest";
    PhotometricInterpretation not MONOCHROME1/2 -> "not greyscale (RGB)"; SamplesPerPixel != 1.

    Decisions beyond the list above:
      * Modality CR or DX passes whatever the SOP class (an SC object with Modality DX, like the
        NIH ChestX-ray14 DICOM release, is a radiograph by its own account), and a CR/DX object
        without Body Part Examined passes (the tag is optional, Type 2/3, and often empty).
      * A lateral View Code Sequence (DX, C.8.11.5.1) counts as lateral like View Position;
        oblique views (RAO, LAO, ...) are skipped as "oblique view (...)".
      * With Body Part Examined empty, the Study and Series Descriptions and the Protocol Name are
        read instead: one naming another body part ("XR HAND LEFT 2 VIEWS") skips the image
        as "body part HAND (StudyDescription) is not chest ...", unless one of them mentions the
        chest; descriptions that name no body part ("XR PORTABLE") pass as before.
      * DX "FOR PROCESSING" images (Presentation Intent Type, C.8.11.1.1.1) are raw detector
        data not meant for display; they are skipped.
      * Rules are checked in the order above; the first failing rule gives the reason.
    """
    if "PixelData" not in ds:
        return "no pixel data"

    # Our own result objects routed back by PACS (the SC carries the source's descriptions and
    # could otherwise pass as chest evidence): never screen them, or results would loop.
    if _text(ds, "SeriesDescription") == OWN_SERIES_DESCRIPTION or _text(ds, "Manufacturer") == OWN_MANUFACTURER:
        return "a cxr-triage result object, not a source image"

    modality = _text(ds, "Modality").upper()
    if modality not in ACCEPTED_MODALITIES:
        if _text(ds, "SOPClassUID") in SECONDARY_CAPTURE_CLASSES:
            if not _chest_evidence(ds):
                return (f"secondary capture ({modality or 'no modality'}) without chest evidence in body part"
                        " or descriptions")
        else:
            return f"modality {modality or '(missing)'} is not CR or DX"

    view = _text(ds, "ViewPosition").upper()
    meaning = _view_code_meaning(ds)
    if view in _LATERAL_VIEWS or "lateral" in meaning:
        return "lateral view"
    if view in _OBLIQUE_VIEWS or "oblique" in meaning:
        return f"oblique view ({view or meaning})"

    body_part = _text(ds, "BodyPartExamined")
    if body_part and not _CHEST_BODY_PART.search(body_part):
        return f"body part {body_part.upper()} is not chest"
    if not body_part:
        other = _other_anatomy_in_descriptions(ds)
        if other:
            return f"body part {other} is not chest (Body Part Examined is empty)"

    if _text(ds, "PresentationIntentType").upper() == "FOR PROCESSING":
        return "DX for processing (raw detector data, not for presentation)"

    photometric = _text(ds, "PhotometricInterpretation").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"not greyscale ({photometric or 'no PhotometricInterpretation'})"

    samples: Any = ds.get("SamplesPerPixel", 1)
    if samples not in (None, "", 1):
        return f"SamplesPerPixel {samples} is not 1 (not single-channel greyscale)"
    return None


def truncated_element(ds: pydicom.Dataset) -> str | None:
    """A reason when a top-level element declares more bytes than the object holds.

    pydicom reads such a value to the end of the file without an error, so a forged length
    (up to 4 GB) or an object cut short would otherwise surface as a misleading "no pixel
    data" (the element swallowed everything after it). Raw elements only: nothing is decoded.
    """
    from pydicom.dataelem import RawDataElement

    for elem in ds.elements():
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        if isinstance(elem.value, (bytes, bytearray)) and len(elem.value) < elem.length:
            return (
                f"stored object is truncated: element ({elem.tag.group:04X},{elem.tag.element:04X}) declares "
                f"{elem.length} bytes but only {len(elem.value)} follow"
            )
    return None
