"""Screening results as DICOM objects for PACS: one Structured Report per screened image and an
optional Secondary Capture.  Builds datasets only; sending them is someone else's job (no network).

Structured Report
=================

SOP class: **Comprehensive SR** (1.2.840.10008.5.1.4.1.1.88.33, PS3.3 A.35.3), built with
highdicom's :class:`highdicom.sr.ComprehensiveSR`.  Why not the others highdicom offers:

* Enhanced SR (88.22, A.35.2) would carry this content too (no spatial coordinates), but it has
  narrower PACS/viewer support than Comprehensive SR and gives us nothing we need.
* Comprehensive 3D SR (88.34, A.35.13) exists for SCOORD3D; a classifier has no coordinates.  The
  IHE AI Results (AIR) profile lists Comprehensive 3D SR as its SR IOD, so a site that tests
  against AIR strictly may want it: the content tree below is valid in either class, and the
  switch is the one constant ``_SR_CLASS``.
* Comprehensive SR is the common SOP class for TID 1500 measurement reports: DICOM's own
  examples, highdicom's and dcmqi's, and it is accepted by practically every PACS.

Content tree: TID 1500 "Measurement Report" (PS3.16 A.1500), one report per source image::

    CONTAINER (126000, DCM, "Imaging Measurement Report")              TID 1500
      HAS CONCEPT MOD  Language of Content = English (eng, RFC5646)    TID 1204
      HAS OBS CONTEXT  Observer Type = Device; Device Observer UID/Name/Manufacturer/Model
                                                                       TID 1002/1004
      HAS CONCEPT MOD  Procedure Reported = (413815006, SCT, "Chest imaging")
      CONTAINS Image Library > Image Library Group > IMAGE the source   TID 1600/1601/1602
      CONTAINS Imaging Measurements                                    (126010, DCM)
        CONTAINS Measurement Group, one per model class, card order     TID 1501
          HAS OBS CONTEXT Tracking Identifier / Tracking Unique Identifier
          CONTAINS CODE Finding (121071, DCM) = the class's code (what this group measures)
          HAS CONCEPT MOD Algorithm Name / Version / Parameters           TID 4019
                          (parameters: "sha256=<model .bin sha256>", "precision=<f32|...>")
          CONTAINS IMAGE  Source image for measurement group (260753009, SCT "Source")
          CONTAINS NUM    Probability (122157, DCM) = P(class), unit ("1", UCUM, "no units")
          CONTAINS NUM    Threshold Value (122411, DCM) = card threshold   (thresholded classes)
          CONTAINS CODE   Predicted class (local) = Yes/No (373066001/373067005, SCT)
      CONTAINS Qualitative Evaluations (C0034375, UMLS)                 TID 1500 row 12
        CONTAINS CODE Finding (121071, DCM) = the predicted class     <- the coded finding
        CONTAINS CODE Priority (260870009, SCT) = Urgent | Routine     (local codes)
        CONTAINS TEXT Triage reason (local) = e.g. "P(covid19)=0.91 >= 0.50"
        CONTAINS TEXT Comment (121106, DCM) = "AI triage - not for diagnosis"

What highdicom builds and what we build ourselves, and why:

* highdicom: the SOP instance (SR Document General/Content, General Series, Equipment modules),
  the evidence (CurrentRequestedProcedureEvidenceSequence, SR Document General Module, PS3.3
  C.17.2, from ``evidence``), the TID 1500 root, observation context, TID 1501 groups, TID 4019
  algorithm identification, measurements and qualitative evaluations, and
  ContributingEquipmentSequence.
* pydicom / highdicom content items by hand:

  - the Image Library (TID 1600): highdicom's :class:`~highdicom.sr.ImageLibrary` requires
    PatientOrientation and ImagerPixelSpacing on every CR/DX image (TID 1603 descriptors) and
    raises without them; real chest images often lack both.  We emit the TID 1602/1603
    descriptors that the source actually has.
  - the root "Qualitative Evaluations" container: highdicom's MeasurementReport only supports
    imaging measurements (rows 6-9 of TID 1500), not row 12.
  - the Patient and Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2): copied attribute by
    attribute from the source, type 2 attributes written empty when the source lacks them.
    highdicom would copy them itself, but it puts a Patient's Name it dislikes (no caret, e.g.
    "Anonymized") verbatim into a warning (0.28; a log record in older versions, and one with
    ``logging.captureWarnings``), rejects Patient's Sex values outside M/F/O, and reads type 2
    attributes as if always present.
    highdicom is therefore given a header-only *stand-in* for the source that holds the UIDs
    and image description but no patient identity, and we write the identity afterwards.

Speed: template plus per-image patch
------------------------------------

Built with highdicom alone (:func:`_build_sr_reference`) an SR costs about 100 ms: highdicom
validates every content item, deep-copies and re-parses the whole tree and searches it for
evidence.  :func:`build_sr` produces the *same* dataset (every element: tag, VR, value and its
Python type; file meta; preamble; encoded bytes) in about 2-3 ms: what depends only on the model
and on the source's SOP class and modality is built once with highdicom as a template (a small
LRU cache, read only, copied per image); the per-image parts (UIDs, dates and times, Patient and
Study, evidence, tracking UIDs, source references, probabilities, Yes/No codes, Image Library,
Qualitative Evaluations, the source's acquisition equipment) are written with plain pydicom the
way highdicom's classes write them.  tests/worker/test_results.py compares the two builders on
many inputs and the real sample files, so a highdicom upgrade that changes its output shows up
as a failing test instead of a silent difference.  The first SR per model and source SOP class
in a process costs one reference build (plus highdicom's own first-use set-up).

Codes
-----

Findings (SNOMED CT): normal 17621005 "Normal"; pneumonia 233604007 "Pneumonia"; bacterial
pneumonia 53084003; viral pneumonia 75570004; covid19 840539006 "COVID-19" (its fully specified
name "Disease caused by severe acute respiratory syndrome coronavirus 2" is 65 characters, over
the 64 of Code Meaning, LO).  Any other class name (other models) gets a code of the local
scheme ``99CXRTRIAGE`` (a "99" prefix marks a private designator, PS3.16 chapter 8), declared in
CodingSchemeIdentificationSequence (PS3.3 C.12.1).  Triage priority values, "Triage reason" and
"Predicted class" are local codes too: no standard code was verifiable offline for them.

Probabilities use UCUM ``1`` ("no units"): the UCUM unit of unity, valid in every UCUM parser
and used by DICOM for dimensionless ratios; ``{probability}`` is also valid UCUM (an annotation,
equal to 1) but some consumers do not parse annotations, and the concept name "Probability"
already says what the number is.

ContributingEquipmentSequence (SOP Common, PS3.3 C.12.1): Manufacturer "cxr-triage",
Manufacturer's Model Name = model name, Software Versions = model version, Purpose of Reference
(109102, DCM, "Processing Equipment") -- the CID 7005 code for equipment that processed the data
to make this object; 109103 "Modifying Equipment" would claim we modified an existing
instance, 109104 is "De-identifying Equipment".  highdicom adds an item for the source's acquisition equipment
(109101) and one for itself (109102).

UIDs
----

:func:`result_uids` derives every UID as ``2.25.<UUID as integer>`` (PS3.5 B.2) from a
name-based UUID (RFC 4122 version 5) of the inputs, so a re-run or re-send yields the same
objects (a PACS replaces rather than duplicates) and a new model version new ones.  Note
``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` cannot do this: with ``prefix=None``
pydicom 3 ignores ``entropy_srcs`` and returns a random UUID; and it joins entropy strings
without a separator, so ``["ab", "c"]`` and ``["a", "bc"]`` would collide.

Secondary Capture
=================

:func:`build_sc` writes a Secondary Capture Image (PS3.3 A.8.1) with pydicom directly: a
downscaled copy of the source (long side <= 1024 px) under a burned-in banner.  highdicom's
``SCImage`` does not fit: it hard-codes ConversionType DI (we are a workstation, WSD), rejects
valid caret-less patient names such as "Anonymized", and requires a patient orientation that
sources often lack.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept, RelationshipTypeValues
from PIL import Image, ImageDraw, ImageFont
from pydicom import config, uid
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import DA, DS, TM, validate_value

from worker.imaging import PreprocessSpec, decode, to_grey8
from worker.priority import PRIORITIES  # ("urgent", "high", "routine")

log = logging.getLogger(__name__)

__all__ = [
    "LOCAL_SCHEME",
    "MANUFACTURER",
    "SC_SERIES_NUMBER",
    "SERIES_DESCRIPTION",
    "SR_SERIES_NUMBER",
    "ResultUIDs",
    "TriageResult",
    "build_sc",
    "build_sr",
    "finding_code",
    "result_uids",
]

SERIES_DESCRIPTION = "AI triage - not for diagnosis"
#: The disclaimer text, in the SR (TEXT "Comment") and burned into the SC.
DISCLAIMER = SERIES_DESCRIPTION
MANUFACTURER = "cxr-triage"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
#: Longest side of the Secondary Capture image, banner included.
SC_MAX_SIDE = 1024
PRECISIONS: tuple[str, ...] = ("f32", "bf16", "f16", "int8")

_SR_CLASS = hd.sr.ComprehensiveSR

# --------------------------------------------------------------------------- codes

#: Private coding scheme for concepts without a standard code ("99" prefix: private, PS3.16 chapter 8).
LOCAL_SCHEME = "99CXRTRIAGE"
_LOCAL_SCHEME_ITEM = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME,
    name="cxr-triage local codes",
    responsible_organization=MANUFACTURER,
)

#: The fully specified name "Disease caused by severe acute respiratory syndrome coronavirus 2"
#: is 65 characters, one more than Code Meaning (LO) allows; "COVID-19" is its SNOMED CT synonym
#: (the preferred term in the US edition).
_COVID19 = ("840539006", "COVID-19")
#: Class names (lower case, letters and digits only) -> SNOMED CT (value, meaning).
_SNOMED_FINDINGS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "normal": ("17621005", "Normal"),
        "pneumonia": ("233604007", "Pneumonia"),
        "bacterialpneumonia": ("53084003", "Bacterial pneumonia"),
        "viralpneumonia": ("75570004", "Viral pneumonia"),
        "covid19": _COVID19,
        "covid": _COVID19,
        "sarscov2": _COVID19,
    }
)

_PROCEDURE_REPORTED = CodedConcept("413815006", "SCT", "Chest imaging")
_QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_SOURCE = CodedConcept("260753009", "SCT", "Source")
_PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)  # (122157, DCM)
_THRESHOLD = CodedConcept.from_code(codes.DCM.ThresholdValue)  # (122411, DCM)
_NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)  # ("1", UCUM, "no units")
_PIXELS = CodedConcept("{pixels}", "UCUM", "Pixels")
_PRIORITY = CodedConcept.from_code(codes.SCT.Priority)  # (260870009, SCT)
_PRIORITY_VALUES: Mapping[str, CodedConcept] = MappingProxyType(
    {
        "urgent": CodedConcept("URGENT", LOCAL_SCHEME, "Urgent"),
        "high": CodedConcept("HIGH", LOCAL_SCHEME, "High"),
        "routine": CodedConcept("ROUTINE", LOCAL_SCHEME, "Routine"),
    }
)
_TRIAGE_REASON = CodedConcept("TRIAGEREASON", LOCAL_SCHEME, "Triage reason")
_PREDICTED_CLASS = CodedConcept("PREDICTEDCLASS", LOCAL_SCHEME, "Predicted class")
_YES = CodedConcept.from_code(codes.SCT.Yes)
_NO = CodedConcept.from_code(codes.SCT.No)
#: PS3.16 CID 7005 "Contributing Equipment Purposes of Reference".
_PROCESSING_EQUIPMENT = codes.DCM.ProcessingEquipment  # (109102, DCM)

_CODE_VALUE_CHARS = re.compile(r"[^A-Z0-9]+")


def finding_code(class_name: str) -> CodedConcept:
    """The coded finding for a model class name.

    SNOMED CT where the class is known (matched case- and punctuation-insensitively, so
    ``covid19``, ``COVID-19`` and ``covid_19`` agree); otherwise a code of the local scheme
    :data:`LOCAL_SCHEME`: Code Value is the class name in upper-case letters and digits when that
    fits SH (16 characters, PS3.5 6.2), else a stable hash of it; Code Meaning is the name.
    """
    key = re.sub(r"[^a-z0-9]+", "", class_name.lower())
    known = _SNOMED_FINDINGS.get(key)
    if known is not None:
        return CodedConcept(known[0], "SCT", known[1])
    value = _CODE_VALUE_CHARS.sub("", class_name.upper())
    if not value or len(value) > 16:
        value = "C" + uuid.uuid5(_UID_NAMESPACE, class_name).hex[:15].upper()
    meaning = class_name.replace("\\", "/").strip()[:64] or value
    return CodedConcept(value, LOCAL_SCHEME, meaning)


# --------------------------------------------------------------------------- UIDs

#: Namespace of the name-based UUIDs behind our UIDs (fixed forever: changing it changes every
#: result UID, so re-sends would duplicate instead of replace).
_UID_NAMESPACE = uuid.UUID("5b0d7e0c-6a8f-4c2e-9d3b-3f1c2a7e9b41")


def _uid(kind: str, *parts: str) -> UID:
    """``2.25.<int>`` (PS3.5 B.2) of a UUIDv5 over an unambiguous encoding of the parts."""
    name = json.dumps(["cxr-triage", kind, *parts], separators=(",", ":"), ensure_ascii=True)
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


@dataclass(frozen=True)
class ResultUIDs:
    """The UIDs of the result objects made for one source image by one model version."""

    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str


def result_uids(
    source_sop_instance_uid: str, study_instance_uid: str, model_name: str, model_version: str
) -> ResultUIDs:
    """Deterministic UIDs per (source SOP Instance UID, model name + version).

    A re-run or re-send gives the same UIDs, so the PACS replaces rather than duplicates; a new
    model version gives new objects.  Series UIDs depend on (study, model name, version, kind)
    only, so all results of one model version in a study share one SR series and one SC series.
    Each object kind has its own entropy, so SR and SC never share a UID.
    """
    src, study = str(source_sop_instance_uid), str(study_instance_uid)
    return ResultUIDs(
        sr_series=_uid("sr-series", study, model_name, model_version),
        sr_instance=_uid("sr-instance", src, model_name, model_version),
        sc_series=_uid("sc-series", study, model_name, model_version),
        sc_instance=_uid("sc-instance", src, model_name, model_version),
    )


# --------------------------------------------------------------------------- result


def _probability(v: Any, what: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number (got {v!r})") from None
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"{what} must be a number in [0, 1] (got {v!r})")
    return f


@dataclass(frozen=True)
class TriageResult:
    """What the pipeline stored for one screened image (from the jobs row and the model card)."""

    predicted_class: str
    probabilities: Mapping[str, float]  # class name -> probability, in card class order
    priority: str  # "urgent" | "high" | "routine" (worker/priority.py)
    triage_reason: str  # e.g. "P(covid19)=0.91 >= 0.50"
    thresholds: Mapping[str, float]  # class -> threshold from the card
    model_name: str
    model_version: str
    model_sha256: str | None  # card files.bin_sha256
    model_precision: str  # f32 | bf16 | f16 | int8

    def __post_init__(self) -> None:
        """Validate and freeze: numbers become plain floats in read-only mappings (numpy scalars
        from the engine are accepted); a result that cannot be reported raises ValueError."""
        probs = {str(k): _probability(v, f"probabilities[{k!r}]") for k, v in self.probabilities.items()}
        if not probs:
            raise ValueError("probabilities must not be empty")
        if self.predicted_class not in probs:
            raise ValueError(f"predicted_class {self.predicted_class!r} is not one of the classes {list(probs)}")
        thresholds = {str(k): _probability(v, f"thresholds[{k!r}]") for k, v in self.thresholds.items()}
        unknown = [k for k in thresholds if k not in probs]
        if unknown:
            raise ValueError(f"thresholds name classes without a probability: {unknown}")
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {PRIORITIES} (got {self.priority!r})")
        if self.model_precision not in PRECISIONS:
            raise ValueError(f"model_precision must be one of {PRECISIONS} (got {self.model_precision!r})")
        for fld in ("model_name", "model_version"):
            if not str(getattr(self, fld)).strip():
                raise ValueError(f"{fld} must not be empty")
        object.__setattr__(self, "probabilities", MappingProxyType(probs))
        object.__setattr__(self, "thresholds", MappingProxyType(thresholds))

    @property
    def probability(self) -> float:
        """Probability of the predicted class."""
        return self.probabilities[self.predicted_class]

    @classmethod
    def from_job(cls, job: Any, card: Any) -> TriageResult:
        """From a finished :class:`worker.jobs.Instance` row and the
        :class:`worker.modelcard.ModelCard` that produced it (probabilities in card class order)."""
        stored = dict(job.probabilities or {})
        order = [c for c in card.classes if c in stored] + [c for c in stored if c not in card.classes]
        return cls(
            predicted_class=job.predicted_class,
            probabilities={c: stored[c] for c in order},
            priority=job.priority,
            triage_reason=job.triage_reason or "",
            thresholds=dict(card.thresholds),
            model_name=job.model_name or card.name,
            model_version=job.model_version or card.version,
            model_sha256=card.bin_sha256,
            model_precision=job.model_precision or card.precision,
        )


# --------------------------------------------------------------------------- shared header


#: Patient (C.7.1.1), Patient Study (C.7.2.2) and General Study (C.7.2.1) attributes copied
#: from the source.  Type 2: always written, empty when absent in the source.
_TYPE2_COPIED: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
#: Type 1/3: copied when present.
_OPTIONAL_COPIED: tuple[str, ...] = (
    "StudyInstanceUID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthTime",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
_PATIENT_STUDY_KEYWORDS = _TYPE2_COPIED + _OPTIONAL_COPIED
#: (keyword, tag, VR) of each: tag lookups are much cheaper than keyword lookups in pydicom.
_PATIENT_STUDY_TAGS: tuple[tuple[str, BaseTag, str], ...] = tuple(
    (kw, BaseTag(tag_for_keyword(kw)), dictionary_VR(kw)) for kw in _PATIENT_STUDY_KEYWORDS  # type: ignore[arg-type]
)

#: Header attributes the highdicom stand-in carries: references, image description (TID 1602)
#: and the acquisition equipment (for its ContributingEquipmentSequence item).  No identity.
_STANDIN_KEYWORDS: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "BitsAllocated",
    "NumberOfFrames",
    "Manufacturer",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "StationName",
)


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    return "" if v is None else str(v).strip()


#: Identity attributes that a PACS reconciles on: copied verbatim, never judged.
_VERBATIM: frozenset[str] = frozenset(
    {"PatientName", "PatientID", "IssuerOfPatientID", "StudyInstanceUID", "AccessionNumber"}
)
#: PS3.3 C.7.1.1: Patient's Sex is an enumerated value.
_PATIENT_SEX = frozenset({"M", "F", "O", ""})


def _valid_value(elem: DataElement) -> bool:
    """Whether ``elem`` holds a value valid for its VR (PS3.5 6.2), checked silently."""
    if elem.VR == "SQ" or elem.value is None:
        return True
    values = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    try:
        for v in values:
            validate_value(elem.VR, v, config.RAISE)
    except (ValueError, TypeError, AttributeError):
        return False
    if elem.keyword == "PatientSex" and str(elem.value).strip() not in _PATIENT_SEX:
        return False
    return True


def _copy_element(elem: DataElement) -> DataElement:
    # validation_mode IGNORE: pydicom's WARN mode would log the offending value (maybe PHI).
    return DataElement(elem.tag, elem.VR, _copy_value(elem.value), validation_mode=config.IGNORE)


def _copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Patient (C.7.1.1), Patient Study (C.7.2.2) and General Study (C.7.2.1) attributes,
    element by element with their VR.

    Identity attributes (:data:`_VERBATIM`) are copied as they are, since a PACS matches the study
    by them.  Any other value that is invalid for its VR (old ACR-NEMA dates ``1995.07.20``, a
    Patient's Age ``68`` without its unit) is not guessed at: a type 2 attribute is written
    empty ("unknown", PS3.5 7.4.3), a type 3 attribute is left out, and a warning names the
    attribute (never its value).
    """
    for _kw, tag, _vr in _PATIENT_STUDY_TAGS:
        if tag in target:
            del target[tag]
    dropped: list[str] = []
    for kw, tag, vr in _PATIENT_STUDY_TAGS:
        elem = source[tag] if tag in source else None
        if elem is not None and (kw in _VERBATIM or _valid_value(elem)):
            target.add(_copy_element(elem))
            continue
        if elem is not None:
            dropped.append(kw)
        if kw in _TYPE2_COPIED:
            target.add(DataElement(tag, vr, None))
    if dropped:
        log.warning(
            "source %s: value(s) invalid for their VR not copied (written empty if type 2): %s",
            _text(source, "SOPInstanceUID"), ", ".join(dropped),
        )


def _copy_value(value: Any) -> Any:
    if isinstance(value, pydicom.Sequence):
        return pydicom.Sequence([_deep_copy(item) for item in value])
    if isinstance(value, MultiValue):
        return list(value)
    return value  # str, numbers, PersonName, bytes: immutable


def _deep_copy(ds: Dataset) -> Dataset:
    out = Dataset()
    for elem in ds:
        out.add(_copy_element(elem))
    return out


def _standin(source: Dataset) -> Dataset:
    """A header-only stand-in for the source that highdicom may read, copy and log freely:
    UIDs and image description, type 2 Patient/Study attributes present but empty."""
    s = Dataset()
    for kw in _STANDIN_KEYWORDS:
        if kw in source and source[kw].value not in (None, ""):
            s.add(_copy_element(source[kw]))
    if "Modality" not in s:
        s.Modality = "OT"
    for kw in _TYPE2_COPIED:
        setattr(s, kw, None)
    return s


def _require_uids(source: Dataset) -> tuple[str, str, str, str]:
    """(SOP Class, SOP Instance, Study Instance, Series Instance) UIDs of the source."""
    keywords = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    vals = [_text(source, kw) for kw in keywords]
    missing = [kw for kw, v in zip(keywords, vals, strict=True) if not v]
    if missing:
        raise ValueError(f"source dataset lacks {', '.join(missing)}")
    return vals[0], vals[1], vals[2], vals[3]


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now().astimezone()


def _tz_offset(now: datetime) -> str | None:
    off = now.utcoffset()
    if off is None:
        return None
    minutes = int(off.total_seconds() // 60)
    sign = "+" if minutes >= 0 else "-"
    return f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _dicom_dt(now: datetime) -> tuple[str, str]:
    """DA and TM of ``now`` (its own local time; the offset goes into TimezoneOffsetFromUTC)."""
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")


def _contributing_equipment(result: TriageResult, now: datetime) -> hd.ContributingEquipment:
    """The item that names the model (SOP Common C.12.1; purpose 109102 Processing Equipment)."""
    desc = f"{DISCLAIMER}; model {result.model_name} {result.model_version}, precision {result.model_precision}"
    if result.model_sha256:
        desc += f", sha256 {result.model_sha256}"
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=_PROCESSING_EQUIPMENT,
        manufacturer_model_name=result.model_name[:64],
        software_versions=result.model_version[:64],
        contribution_datetime=now,
        contribution_description=desc[:1024],
    )


def _set_common(ds: Dataset, source: Dataset, now: datetime) -> None:
    """SOP Common details shared by SR and SC (PS3.3 C.12.1)."""
    date, time = _dicom_dt(now)
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    tz = _tz_offset(now)
    if tz is not None:
        ds.TimezoneOffsetFromUTC = tz
    elif "TimezoneOffsetFromUTC" in ds:
        del ds.TimezoneOffsetFromUTC
    if "SpecificCharacterSet" in source:
        # Copied names/descriptions are in the source's repertoire; our own text is ASCII.
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet


def _instance_number(source: Dataset) -> int:
    try:
        n = int(source.get("InstanceNumber") or 1)
    except (TypeError, ValueError):
        return 1
    return n if 0 < n < 2**31 else 1


# --------------------------------------------------------------------------- SR


def _image_library(source: Dataset) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library with one TID 1601 group holding the source image and the TID 1602
    (and, for projection radiography, TID 1603) descriptors the source actually has."""
    contains, acq = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.HAS_ACQ_CONTEXT

    def num(name: Any, value: float, unit: Any) -> hd.sr.NumContentItem:
        return hd.sr.NumContentItem(name=name, value=value, unit=unit, relationship_type=acq)

    def text(name: Any, value: str) -> hd.sr.TextContentItem:
        return hd.sr.TextContentItem(name=name, value=value, relationship_type=acq)

    modality = _text(source, "Modality") or "OT"
    descriptors: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.DCM.Modality, value=_modality_code(modality), relationship_type=acq)
    ]
    if _text(source, "FrameOfReferenceUID"):
        descriptors.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID, value=str(source.FrameOfReferenceUID), relationship_type=acq
            )
        )
    for code, kw in ((codes.DCM.PixelDataRows, "Rows"), (codes.DCM.PixelDataColumns, "Columns")):
        if kw in source and source[kw].value:
            descriptors.append(num(code, int(source[kw].value), _PIXELS))
    orientation, spacing = _orientation_and_spacing(source)
    if orientation is not None:
        descriptors.append(text(codes.DCM.PatientOrientationRow, orientation[0]))
        descriptors.append(text(codes.DCM.PatientOrientationColumn, orientation[1]))
    if spacing is not None:
        row_mm, col_mm = spacing
        descriptors.append(num(codes.DCM.HorizontalPixelSpacing, col_mm, codes.UCUM.Millimeter))
        descriptors.append(num(codes.DCM.VerticalPixelSpacing, row_mm, codes.UCUM.Millimeter))
    image = hd.sr.ImageContentItem(
        name=_SOURCE,
        referenced_sop_class_uid=str(source.SOPClassUID),
        referenced_sop_instance_uid=str(source.SOPInstanceUID),
        relationship_type=contains,
    )
    image.ContentSequence = hd.sr.ContentSequence(descriptors)
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence([image])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _orientation_and_spacing(source: Dataset) -> tuple[tuple[str, str] | None, tuple[float, float] | None]:
    """Patient Orientation (row, column) and Imager Pixel Spacing (row mm, column mm) when usable.

    One reading for both SR builders (the highdicom reference and the fast path), so they can
    never disagree on which source values make it into the Image Library.
    """
    orientation = source.get("PatientOrientation")
    pair = None
    if isinstance(orientation, (list, MultiValue)) and len(orientation) == 2 and all(orientation):
        pair = (str(orientation[0]), str(orientation[1]))
    spacing = source.get("ImagerPixelSpacing")
    mm = None
    if isinstance(spacing, (list, MultiValue)) and len(spacing) == 2:
        try:
            mm = (float(spacing[0]), float(spacing[1]))
        except (TypeError, ValueError):
            mm = None
    return pair, mm


def _modality_code(modality: str) -> CodedConcept:
    """CID 29 Acquisition Modality (DCM codes equal the Modality defined terms)."""
    for kw in codes.cid29.dir():
        code = getattr(codes.cid29, kw)
        if code.value == modality:
            return CodedConcept.from_code(code)
    return CodedConcept(modality, "DCM", modality)


def _class_group(
    cls_name: str,
    result: TriageResult,
    algorithm: hd.sr.AlgorithmIdentification,
    source_ref: hd.sr.SourceImageForMeasurementGroup,
    source_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group about one class: its probability, threshold (if any), predicted or not."""
    measurements = [hd.sr.Measurement(name=_PROBABILITY, value=result.probabilities[cls_name], unit=_NO_UNITS)]
    if cls_name in result.thresholds:
        measurements.append(hd.sr.Measurement(name=_THRESHOLD, value=result.thresholds[cls_name], unit=_NO_UNITS))
    predicted = _YES if cls_name == result.predicted_class else _NO
    identifier = f"{result.model_name} {result.model_version} {cls_name}"[:64]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid("tracking", source_uid, result.model_name, result.model_version, cls_name),
            identifier=identifier,
        ),
        finding_type=finding_code(cls_name),
        algorithm_id=algorithm,
        source_images=[source_ref],
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_PREDICTED_CLASS, value=predicted)],
    )


def _qualitative_evaluations(result: TriageResult) -> hd.sr.ContainerContentItem:
    """TID 1500 row 12: the predicted finding, the priority, why, and the disclaimer."""
    contains = RelationshipTypeValues.CONTAINS
    predicted = finding_code(result.predicted_class)
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(name=codes.DCM.Finding, value=predicted, relationship_type=contains),
        hd.sr.CodeContentItem(name=_PRIORITY, value=_PRIORITY_VALUES[result.priority], relationship_type=contains),
    ]
    reason = result.triage_reason.strip()
    if reason:
        items.append(hd.sr.TextContentItem(name=_TRIAGE_REASON, value=reason, relationship_type=contains))
    items.append(hd.sr.TextContentItem(name=codes.DCM.Comment, value=DISCLAIMER, relationship_type=contains))
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=contains)
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _build_sr_reference(
    source: pydicom.Dataset, result: TriageResult, *, now: datetime | None = None
) -> pydicom.Dataset:
    """The SR built entirely with highdicom: the reference that :func:`build_sr` reproduces element for
    element (tests compare the two), and the builder of the per-model templates of the fast path.
    About 100 ms per call (highdicom validates, deep-copies and re-parses the content tree)."""
    now = _now(now)
    sop_class, sop_uid, study_uid, _series = _require_uids(source)
    uids = result_uids(sop_uid, study_uid, result.model_name, result.model_version)
    standin = _standin(source)

    params = [f"precision={result.model_precision}"]
    if result.model_sha256:
        params.insert(0, f"sha256={result.model_sha256}")
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.model_name, version=result.model_version, parameters=params, manufacturer=MANUFACTURER
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", result.model_name, result.model_version),
            name=result.model_name[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{result.model_name} {result.model_version}"[:64],
        ),
    )
    source_ref = hd.sr.SourceImageForMeasurementGroup.from_source_image(standin)
    groups = [_class_group(c, result, algorithm, source_ref, sop_uid) for c in result.probabilities]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_PROCEDURE_REPORTED,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    root = report[0]
    content = root.ContentSequence
    # TID 1500 order: ... Procedure Reported, Image Library (row 5), Imaging Measurements (row 6).
    measurements_code = codes.DCM.ImagingMeasurements.value
    at = next(i for i, item in enumerate(content) if item.ConceptNameCodeSequence[0].CodeValue == measurements_code)
    content.insert(at, _image_library(source))
    content.append(_qualitative_evaluations(result))

    date, time = _dicom_dt(now)
    try:
        sr = _SR_CLASS(
            evidence=[standin],
            content=root,
            series_instance_uid=uids.sr_series,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids.sr_instance,
            instance_number=_instance_number(source),
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=f"{result.model_name} {result.model_version}"[:64],
            series_description=SERIES_DESCRIPTION,
            is_complete=True,
            is_final=False,
            is_verified=False,
            content_date=date,
            content_time=time,
            coding_schemes=[_LOCAL_SCHEME_ITEM],
            contributing_equipment=[_contributing_equipment(result, now)],
        )
    except KeyError as exc:  # highdicom looks the source's IOD up by its SOP Class UID
        raise ValueError(f"source SOP Class UID {sop_class} is not a storage SOP class highdicom knows") from exc
    _copy_patient_and_study(source, sr)
    _set_common(sr, source, now)
    for item in sr.ContributingEquipmentSequence:  # highdicom stamps its own item with its clock
        if "ContributionDateTime" in item:
            stamp = now.strftime("%Y%m%d%H%M%S.%f") + (_tz_offset(now) or "")
            item.ContributionDateTime = stamp  # type: ignore[assignment]  # pydicom accepts the DT string
    return sr


# --------------------------------------------------------------------------- SR, fast path
#
# _build_sr_reference costs ~100 ms per image, nearly all of it highdicom: every content item
# re-validated, the content tree deep-copied and re-parsed, evidence searched for.  build_sr
# gets the same dataset, element for element, in well under 5 ms:
#
# * everything that depends only on the model (name, version, sha256, precision, classes,
#   thresholds) and on the source's SOP class and modality (the header, the observation context,
#   the TID 1501 groups with TID 4019, the coding schemes, our and highdicom's contributing
#   equipment) comes from a *template*: an SR built once by _build_sr_reference for a canonical
#   source (fixed placeholder UIDs, no identity), converted to plain pydicom datasets and kept
#   in a small LRU cache.  Templates are never modified: each SR starts from a copy.
# * per image, the copy gets its UIDs, dates and times, Patient/Study (the same
#   _copy_patient_and_study and _set_common as the reference), the evidence, the tracking UIDs,
#   source references, probabilities and Yes/No codes patched in, and its Image Library and
#   Qualitative Evaluations built with plain pydicom exactly as highdicom's content item classes
#   build them (ContentItem: ValueType, ConceptNameCodeSequence, RelationshipType; NUM:
#   MeasuredValueSequence with NumericValue = DS(value, auto_format=True) and, for floats,
#   FloatingPointValue; ...).
#
# tests/worker/test_results.py compares build_sr with _build_sr_reference element by element
# (tag, VR, Python type and value, and the encoded bytes) for many inputs: after a highdicom
# upgrade that changes what it writes, that test fails rather than the output drifting.

_T_GROUP_LENGTH = BaseTag(0x00020000)
_T_MEDIA_SOP_INSTANCE = BaseTag(0x00020003)
_T_SOP_INSTANCE = BaseTag(0x00080018)
_T_CONTENT_DATE = BaseTag(0x00080023)
_T_CONTENT_TIME = BaseTag(0x00080033)
_T_REF_SERIES_SEQ = BaseTag(0x00081115)
_T_REF_SOP_CLASS = BaseTag(0x00081150)
_T_REF_SOP_INSTANCE = BaseTag(0x00081155)
_T_REF_SOP_SEQ = BaseTag(0x00081199)
_T_CONTRIBUTING_EQUIPMENT = BaseTag(0x0018A001)
_T_STUDY_UID = BaseTag(0x0020000D)
_T_SERIES_UID = BaseTag(0x0020000E)
_T_INSTANCE_NUMBER = BaseTag(0x00200013)
_T_MEASUREMENT_UNITS = BaseTag(0x004008EA)
_T_RELATIONSHIP = BaseTag(0x0040A010)
_T_VALUE_TYPE = BaseTag(0x0040A040)
_T_CONCEPT_NAME = BaseTag(0x0040A043)
_T_CONTINUITY = BaseTag(0x0040A050)
_T_UID = BaseTag(0x0040A124)
_T_TEXT_VALUE = BaseTag(0x0040A160)
_T_FLOAT_VALUE = BaseTag(0x0040A161)
_T_CONCEPT_CODE = BaseTag(0x0040A168)
_T_MEASURED_VALUE = BaseTag(0x0040A300)
_T_NUMERIC_VALUE = BaseTag(0x0040A30A)
_T_EVIDENCE = BaseTag(0x0040A375)
_T_CONTENT_SEQ = BaseTag(0x0040A730)

_new_element = DataElement.__new__


def _el(tag: BaseTag, vr: str, value: Any) -> DataElement:
    """A new element; its value converted exactly as ``Dataset.__setattr__`` converts it."""
    return DataElement(tag, vr, value, validation_mode=config.IGNORE)


#: The attributes of a new, empty Dataset; ``Dataset()`` sets them one by one through pydicom's
#: ``__setattr__`` (about 3 us, most of the cost of a small item), _new_ds copies them at once.
_EMPTY_DATASET_STATE: dict[str, Any] = dict(Dataset().__dict__)
_MUTABLE_DATASET_STATE = tuple(k for k, v in _EMPTY_DATASET_STATE.items() if isinstance(v, (dict, list, set)))


def _new_ds(elements: dict[BaseTag, DataElement]) -> Dataset:
    """``Dataset(elements)``, without the per-attribute ``__setattr__`` overhead."""
    ds = object.__new__(Dataset)
    state = _EMPTY_DATASET_STATE.copy()
    for k in _MUTABLE_DATASET_STATE:
        state[k] = state[k].copy()
    state["_dict"] = elements
    object.__setattr__(ds, "__dict__", state)
    return ds


def _ds(*elems: DataElement) -> Dataset:
    return _new_ds({e.tag: e for e in elems})


_SQ = pydicom.Sequence
_new_sequence = _SQ.__new__


def _clone(ds: Dataset) -> Dataset:
    """A deep copy, as a plain Dataset, of a dataset built by :func:`_plain` or this module: plain
    DataElements whose values are immutable (str, UID, numbers, DS/IS/DA/TM, PersonName) except
    sequences (pydicom.Sequence, copied item by item) and multi-values (deep-copied)."""
    out: dict[BaseTag, DataElement] = {}
    for tag, elem in ds._dict.items():
        state = elem.__dict__.copy()
        value = state["_value"]
        vt = type(value)
        if vt is _SQ:
            seq = _new_sequence(_SQ)  # Sequence(items) without re-validating items we made
            seq.__dict__["_list"] = [_clone(item) for item in value._list]
            state["_value"] = seq
        elif vt is MultiValue or vt is list:
            state["_value"] = copy.deepcopy(value)
        new = _new_element(DataElement)
        new.__dict__ = state
        out[tag] = new
    return _new_ds(out)


def _plain(ds: Dataset) -> Dataset:
    """A deep copy of any dataset (e.g. highdicom's content items and sequences) made of plain
    pydicom Datasets, Sequences and DataElements, for :func:`_clone`."""
    out: dict[BaseTag, DataElement] = {}
    for tag in list(ds.keys()):
        elem = ds[tag]  # converts a RawDataElement
        value = elem.value
        if isinstance(value, pydicom.Sequence):
            value = _SQ([_plain(item) for item in value])
        elif isinstance(value, (MultiValue, list)):
            value = copy.deepcopy(value)
        new = _new_element(DataElement)
        new.__dict__ = {**elem.__dict__, "_value": value}
        out[tag] = new
    return _new_ds(out)


#: id(code object) -> (the object, its item).  Holding the object keeps its id unique; only
#: long-lived code objects (module constants, cached finding codes) come here in practice.
_CODE_CACHE: dict[int, tuple[Any, Dataset]] = {}


def _code_item(code: Any) -> Dataset:
    """The code sequence item highdicom writes for a Code or CodedConcept (a fresh copy)."""
    entry = _CODE_CACHE.get(id(code))
    if entry is not None and entry[0] is code:
        return _clone(entry[1])
    tpl = _plain(code if isinstance(code, CodedConcept) else CodedConcept.from_code(code))
    if len(_CODE_CACHE) < 512:
        _CODE_CACHE[id(code)] = (code, tpl)
    return _clone(tpl)


def _content_item(relationship: str | None, value_type: str, name: Any, *elems: DataElement) -> Dataset:
    """highdicom's ContentItem: ValueType, ConceptNameCodeSequence, RelationshipType, + ``elems``."""
    ds = _ds(_el(_T_VALUE_TYPE, "CS", value_type), _el(_T_CONCEPT_NAME, "SQ", [_code_item(name)]), *elems)
    if relationship is not None:
        ds._dict[_T_RELATIONSHIP] = _el(_T_RELATIONSHIP, "CS", relationship)
    return ds


_ITEM_CACHE: dict[tuple[Any, ...], Dataset] = {}


def _cached(key: tuple[Any, ...], build: Any) -> Dataset:
    """A fresh copy of the content item ``build()`` makes, built once per key (bounded; items
    are never modified, so a race costs at most a second, equal build)."""
    tpl = _ITEM_CACHE.get(key)
    if tpl is None:
        tpl = build()
        if len(_ITEM_CACHE) < 2048:
            _ITEM_CACHE[key] = tpl
    return _clone(tpl)


def _code(relationship: str, name: Any, value: Any) -> Dataset:
    return _content_item(relationship, "CODE", name, _el(_T_CONCEPT_CODE, "SQ", [_code_item(value)]))


def _text_item(relationship: str, name: Any, value: str) -> Dataset:
    return _content_item(relationship, "TEXT", name, _el(_T_TEXT_VALUE, "UT", str(value)))


def _measured_value(value: int | float, unit: Any) -> Dataset:
    """highdicom NumContentItem's MeasuredValueSequence item."""
    item = _ds(
        _el(_T_NUMERIC_VALUE, "DS", DS(value, auto_format=True)),
        _el(_T_MEASUREMENT_UNITS, "SQ", [_code_item(unit)]),
    )
    if isinstance(value, float):
        item._dict[_T_FLOAT_VALUE] = _el(_T_FLOAT_VALUE, "FD", value)
    return item


def _num_item(relationship: str, name: Any, value: int | float, unit: Any) -> Dataset:
    return _content_item(relationship, "NUM", name, _el(_T_MEASURED_VALUE, "SQ", [_measured_value(value, unit)]))


def _container(relationship: str, name: Any, items: list[Dataset]) -> Dataset:
    return _content_item(
        relationship, "CONTAINER", name, _el(_T_CONTINUITY, "CS", "CONTINUOUS"), _el(_T_CONTENT_SEQ, "SQ", items)
    )


def _sop_ref(sop_class: Any, sop_instance: Any) -> Dataset:
    return _ds(_el(_T_REF_SOP_CLASS, "UI", sop_class), _el(_T_REF_SOP_INSTANCE, "UI", sop_instance))


_CONTAINS = RelationshipTypeValues.CONTAINS.value
_HAS_ACQ_CONTEXT = RelationshipTypeValues.HAS_ACQ_CONTEXT.value


@functools.lru_cache(maxsize=256)
def _sr_series_uid(study_uid: str, model_name: str, model_version: str) -> UID:
    return _uid("sr-series", study_uid, model_name, model_version)


@functools.lru_cache(maxsize=64)
def _modality_code_cached(modality: str) -> CodedConcept:
    return _modality_code(modality)


_C_MODALITY = codes.DCM.Modality
_C_FRAME_OF_REFERENCE = codes.DCM.FrameOfReferenceUID
_C_ROWS = codes.DCM.PixelDataRows
_C_COLUMNS = codes.DCM.PixelDataColumns
_C_ORIENTATION_ROW = codes.DCM.PatientOrientationRow
_C_ORIENTATION_COLUMN = codes.DCM.PatientOrientationColumn
_C_H_SPACING = codes.DCM.HorizontalPixelSpacing
_C_V_SPACING = codes.DCM.VerticalPixelSpacing
_C_MM = codes.UCUM.Millimeter
_C_IMAGE_LIBRARY_GROUP = codes.DCM.ImageLibraryGroup
_C_IMAGE_LIBRARY = codes.DCM.ImageLibrary
_C_FINDING = codes.DCM.Finding
_C_COMMENT = codes.DCM.Comment


def _image_library_fast(source: Dataset) -> Dataset:
    """:func:`_image_library` in plain pydicom (same elements, ~20x faster).  Descriptor items
    are cached by their value (a site has few modalities, sizes, orientations, spacings)."""
    acq = _HAS_ACQ_CONTEXT
    modality = _text(source, "Modality") or "OT"
    descriptors = [
        _cached(("modality", modality), lambda: _code(acq, _C_MODALITY, _modality_code_cached(modality)))
    ]
    if _text(source, "FrameOfReferenceUID"):
        descriptors.append(
            _content_item(acq, "UIDREF", _C_FRAME_OF_REFERENCE, _el(_T_UID, "UI", str(source.FrameOfReferenceUID)))
        )
    for code, kw in ((_C_ROWS, "Rows"), (_C_COLUMNS, "Columns")):
        if kw in source and source[kw].value:
            n = int(source[kw].value)
            descriptors.append(_cached((kw, n), lambda code=code, n=n: _num_item(acq, code, n, _PIXELS)))
    orientation, spacing = _orientation_and_spacing(source)
    if orientation is not None:
        row, col = orientation
        descriptors.append(_cached(("orientation-row", row), lambda: _text_item(acq, _C_ORIENTATION_ROW, row)))
        descriptors.append(_cached(("orientation-col", col), lambda: _text_item(acq, _C_ORIENTATION_COLUMN, col)))
    if spacing is not None:
        row_mm, col_mm = spacing
        descriptors.append(
            _cached(("h-spacing", repr(col_mm)), lambda: _num_item(acq, _C_H_SPACING, col_mm, _C_MM))
        )
        descriptors.append(
            _cached(("v-spacing", repr(row_mm)), lambda: _num_item(acq, _C_V_SPACING, row_mm, _C_MM))
        )
    image = _content_item(
        _CONTAINS, "IMAGE", _SOURCE,
        _el(_T_REF_SOP_SEQ, "SQ", [_sop_ref(str(source.SOPClassUID), str(source.SOPInstanceUID))]),
        _el(_T_CONTENT_SEQ, "SQ", descriptors),
    )
    group = _container(_CONTAINS, _C_IMAGE_LIBRARY_GROUP, [image])
    return _container(_CONTAINS, _C_IMAGE_LIBRARY, [group])


def _qualitative_evaluations_fast(result: TriageResult) -> Dataset:
    """:func:`_qualitative_evaluations` in plain pydicom."""
    predicted, priority = result.predicted_class, result.priority
    items = [
        _cached(("finding", predicted), lambda: _code(_CONTAINS, _C_FINDING, _finding_code_cached(predicted))),
        _cached(("priority", priority), lambda: _code(_CONTAINS, _PRIORITY, _PRIORITY_VALUES[priority])),
    ]
    reason = result.triage_reason.strip()
    if reason:
        items.append(_text_item(_CONTAINS, _TRIAGE_REASON, reason))
    items.append(_cached(("comment",), lambda: _text_item(_CONTAINS, _C_COMMENT, DISCLAIMER)))
    return _container(_CONTAINS, _QUALITATIVE_EVALUATIONS, items)


@functools.lru_cache(maxsize=256)
def _finding_code_cached(class_name: str) -> CodedConcept:
    return finding_code(class_name)  # read only: cloned by _code_item, never modified


@dataclass(frozen=True)
class _GroupSlots:
    """Where a class's TID 1501 group keeps its per-image values (indices into ContentSequence)."""

    class_name: str
    tracking_uid: int
    probability: int
    predicted: int
    image: int


@dataclass(frozen=True)
class _SRTemplate:
    sr: Dataset  # plain pydicom; never modified (copied with _clone)
    file_meta: Dataset
    preamble: bytes
    group_length_base: int  # File Meta Group Length without the SOP Instance UID's value
    library_at: int  # index in the root ContentSequence
    evaluations_at: int
    measurements_at: int
    groups: tuple[_GroupSlots, ...]


_TEMPLATE_UIDS = ("1.2.3.4.5.6.7.8.9.1", "1.2.3.4.5.6.7.8.9.2", "1.2.3.4.5.6.7.8.9.3")  # instance, study, series
_TEMPLATE_NOW = datetime(2000, 1, 1)
_TEMPLATES: OrderedDict[tuple[Any, ...], _SRTemplate] = OrderedDict()
_TEMPLATES_MAX = 16
_TEMPLATES_LOCK = threading.Lock()
_PIXEL_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation")


def _present(source: Dataset, kw: str) -> bool:
    """Whether :func:`_standin` copies ``kw`` (present with a non-empty value)."""
    return kw in source and source[kw].value not in (None, "")


def _template_key(
    source: Dataset, result: TriageResult, sop_class: str
) -> tuple[tuple[Any, ...], DataElement | None]:
    """Everything the template depends on.  From the source only what highdicom checks in the
    stand-in: SOP class (IOD lookup), Modality (disallowed modalities) and whether it has any
    image pixel description attribute (else highdicom refuses it as a source image).  Returns
    the key and the source's Modality element (None: absent or empty)."""
    modality = source["Modality"] if _present(source, "Modality") else None
    modality_key = None if modality is None else (modality.VR, repr(modality.value))
    return (
        result.model_name, result.model_version, result.model_sha256, result.model_precision,
        tuple(result.probabilities), tuple(sorted(result.thresholds.items())),
        sop_class, modality_key, any(_present(source, kw) for kw in _PIXEL_KEYWORDS),
    ), modality


def _find(items: Sequence[Dataset], pred: Any) -> int:
    found = [i for i, item in enumerate(items) if pred(item)]
    if len(found) != 1:
        raise RuntimeError("unexpected SR template layout (highdicom changed?)")
    return found[0]


def _concept_is(value: str, scheme: str | None = None) -> Any:
    def pred(item: Dataset) -> bool:
        c = item.ConceptNameCodeSequence[0]
        return str(c.CodeValue) == value and (scheme is None or str(c.CodingSchemeDesignator) == scheme)

    return pred


def _make_template(key: tuple[Any, ...], modality: DataElement | None, result: TriageResult) -> _SRTemplate:
    """An SR for a canonical source (placeholder UIDs, no identity) with the model of ``key``."""
    (*_model, classes, _thresholds, sop_class, _modality_key, has_pixels) = key
    canon = Dataset()
    canon.SOPClassUID = sop_class
    canon.SOPInstanceUID, canon.StudyInstanceUID, canon.SeriesInstanceUID = _TEMPLATE_UIDS
    if modality is not None:
        canon.add(_copy_element(modality))
    if has_pixels:
        canon.Rows = 1
    first = classes[0]
    canon_result = TriageResult(
        predicted_class=first,
        probabilities={c: 0.5 for c in classes},
        priority="routine",
        triage_reason="",
        thresholds=dict(result.thresholds),
        model_name=result.model_name,
        model_version=result.model_version,
        model_sha256=result.model_sha256,
        model_precision=result.model_precision,
    )
    ref = _build_sr_reference(canon, canon_result, now=_TEMPLATE_NOW)
    sr = _plain(ref)
    content = sr.ContentSequence
    measurements_at = _find(content, _concept_is(codes.DCM.ImagingMeasurements.value, "DCM"))
    groups = []
    for cls_name, group in zip(classes, content[measurements_at].ContentSequence, strict=True):
        items = group.ContentSequence
        groups.append(
            _GroupSlots(
                class_name=cls_name,
                tracking_uid=_find(items, _concept_is(codes.DCM.TrackingUniqueIdentifier.value, "DCM")),
                probability=_find(items, _concept_is(_PROBABILITY.value, _PROBABILITY.scheme_designator)),
                predicted=_find(items, _concept_is(_PREDICTED_CLASS.value, LOCAL_SCHEME)),
                image=_find(items, lambda i: i.ValueType == "IMAGE"),
            )
        )
    library_at = _find(content, _concept_is(codes.DCM.ImageLibrary.value, "DCM"))
    evaluations_at = _find(content, _concept_is(_QUALITATIVE_EVALUATIONS.value, "UMLS"))
    for at in (library_at, evaluations_at):  # rebuilt per image: not worth copying
        content[at] = _new_ds({})
    meta = _clone(ref.file_meta)
    instance = str(ref.file_meta.MediaStorageSOPInstanceUID)
    uid_len = len(instance) + len(instance) % 2
    return _SRTemplate(
        sr=sr,
        file_meta=meta,
        preamble=bytes(ref.preamble),
        group_length_base=int(ref.file_meta.FileMetaInformationGroupLength) - uid_len,
        library_at=library_at,
        evaluations_at=evaluations_at,
        measurements_at=measurements_at,
        groups=tuple(groups),
    )


def _template(source: Dataset, result: TriageResult, sop_class: str) -> _SRTemplate:
    key, modality = _template_key(source, result, sop_class)
    with _TEMPLATES_LOCK:  # one build per key even with several threads; templates are read only
        tpl = _TEMPLATES.get(key)
        if tpl is not None:
            _TEMPLATES.move_to_end(key)
            return tpl
        tpl = _make_template(key, modality, result)
        _TEMPLATES[key] = tpl
        while len(_TEMPLATES) > _TEMPLATES_MAX:
            _TEMPLATES.popitem(last=False)
        return tpl


#: The stand-in attributes that ``ContributingEquipment.for_image_acquisition`` reads (it also
#: reads InstitutionAddress and Acquisition Date/Time, which the stand-in never has).
_ACQ_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
    "InstitutionName", "InstitutionalDepartmentName", "StationName",
)
_ACQ_CACHE: OrderedDict[tuple[Any, ...], Dataset | None] = OrderedDict()
_ACQ_LOCK = threading.Lock()


def _acquisition_equipment(source: Dataset, sop_class: str) -> Dataset | None:
    """The item highdicom adds to ContributingEquipmentSequence for the stand-in's acquisition
    equipment (``ContributingEquipment.for_image_acquisition``), or None when it adds none."""
    present = [kw for kw in _ACQ_KEYWORDS if _present(source, kw)]
    if "Manufacturer" not in present:
        return None
    key = (sop_class, *((kw, source[kw].VR, repr(source[kw].value)) for kw in present))
    with _ACQ_LOCK:
        if key in _ACQ_CACHE:
            _ACQ_CACHE.move_to_end(key)
            tpl = _ACQ_CACHE[key]
        else:
            mini = Dataset()
            mini.SOPClassUID = sop_class
            for kw in present:
                mini.add(_copy_element(source[kw]))
            try:
                tpl = _plain(hd.ContributingEquipment.for_image_acquisition(mini))
            except Exception:  # what highdicom's _add_contributing_equipment does
                tpl = None
            _ACQ_CACHE[key] = tpl
            while len(_ACQ_CACHE) > 64:
                _ACQ_CACHE.popitem(last=False)
    return None if tpl is None else _clone(tpl)


def build_sr(source: pydicom.Dataset, result: TriageResult, *, now: datetime | None = None) -> pydicom.Dataset:
    """One SR per screened image, in the source study.

    A TID 1500 Measurement Report in a Comprehensive SR instance (see the module docstring for
    the tree and codes): new series (Modality SR, :data:`SERIES_DESCRIPTION`, number
    :data:`SR_SERIES_NUMBER`), UIDs from :func:`result_uids`, VerificationFlag UNVERIFIED,
    CompletionFlag COMPLETE, PreliminaryFlag PRELIMINARY (PS3.3 C.17.2), the source in
    CurrentRequestedProcedureEvidenceSequence (C.17.2), Patient and Study copied from the
    source.  ``now`` (default: local time now) sets Content and Instance Creation Date/Time and
    the contribution time.  Raises ValueError when the source lacks its UIDs or its SOP class is
    not a standard storage SOP class.
    """
    now = _now(now)
    sop_class, sop_uid, study_uid, _series = _require_uids(source)
    # result_uids(...).sr_series / .sr_instance; the series UID is the same for a whole study
    sr_series = _sr_series_uid(study_uid, result.model_name, result.model_version)
    instance = _uid("sr-instance", sop_uid, result.model_name, result.model_version)
    tpl = _template(source, result, sop_class)
    sr = _clone(tpl.sr)
    elems = sr._dict

    # File meta and SOP Common
    meta = FileMetaDataset()
    meta._dict = _clone(tpl.file_meta)._dict
    meta._dict[_T_MEDIA_SOP_INSTANCE] = _el(_T_MEDIA_SOP_INSTANCE, "UI", UID(str(instance)))
    meta._dict[_T_GROUP_LENGTH] = _el(_T_GROUP_LENGTH, "UL", tpl.group_length_base + len(instance) + len(instance) % 2)
    sr.file_meta = meta
    sr.preamble = tpl.preamble
    elems[_T_SOP_INSTANCE] = _el(_T_SOP_INSTANCE, "UI", str(instance))
    elems[_T_SERIES_UID] = _el(_T_SERIES_UID, "UI", str(sr_series))
    elems[_T_INSTANCE_NUMBER] = _el(_T_INSTANCE_NUMBER, "IS", _instance_number(source))
    date, time = _dicom_dt(now)
    elems[_T_CONTENT_DATE] = _el(_T_CONTENT_DATE, "DA", DA(date))
    elems[_T_CONTENT_TIME] = _el(_T_CONTENT_TIME, "TM", TM(time))

    # Evidence (the stand-in's own UID values, as highdicom collects them)
    evidence: Any = elems[_T_EVIDENCE].value  # the template's own items (DataElement values)
    study_ref = evidence[0]
    study_ref._dict[_T_STUDY_UID] = _el(_T_STUDY_UID, "UI", source["StudyInstanceUID"].value)
    series_ref = study_ref._dict[_T_REF_SERIES_SEQ].value[0]
    series_ref._dict[_T_SERIES_UID] = _el(_T_SERIES_UID, "UI", source["SeriesInstanceUID"].value)
    sop_ref = series_ref._dict[_T_REF_SOP_SEQ].value[0]
    sop_ref._dict[_T_REF_SOP_INSTANCE] = _el(_T_REF_SOP_INSTANCE, "UI", source["SOPInstanceUID"].value)

    # Content: per-class values, then the Image Library and Qualitative Evaluations
    content: Any = elems[_T_CONTENT_SEQ].value
    source_instance = source["SOPInstanceUID"].value
    groups = content[tpl.measurements_at]._dict[_T_CONTENT_SEQ].value
    for slots, group in zip(tpl.groups, groups, strict=True):
        items = group._dict[_T_CONTENT_SEQ].value
        cls_name = slots.class_name
        tracking = _uid("tracking", sop_uid, result.model_name, result.model_version, cls_name)
        items[slots.tracking_uid]._dict[_T_UID] = _el(_T_UID, "UI", tracking)
        image_ref = items[slots.image]._dict[_T_REF_SOP_SEQ].value[0]
        image_ref._dict[_T_REF_SOP_INSTANCE] = _el(_T_REF_SOP_INSTANCE, "UI", source_instance)
        measured = items[slots.probability]._dict[_T_MEASURED_VALUE].value[0]
        p = result.probabilities[cls_name]
        measured._dict[_T_NUMERIC_VALUE] = _el(_T_NUMERIC_VALUE, "DS", DS(p, auto_format=True))
        measured._dict[_T_FLOAT_VALUE] = _el(_T_FLOAT_VALUE, "FD", p)
        flag = _YES if cls_name == result.predicted_class else _NO
        items[slots.predicted]._dict[_T_CONCEPT_CODE] = _el(_T_CONCEPT_CODE, "SQ", [_code_item(flag)])
    content[tpl.library_at] = _image_library_fast(source)
    content[tpl.evaluations_at] = _qualitative_evaluations_fast(result)

    _copy_patient_and_study(source, sr)
    _set_common(sr, source, now)
    equipment: Any = elems[_T_CONTRIBUTING_EQUIPMENT].value
    acquisition = _acquisition_equipment(source, sop_class)
    if acquisition is not None:
        equipment.insert(0, acquisition)
    for item in equipment:  # as in _build_sr_reference
        if "ContributionDateTime" in item:
            item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f") + (_tz_offset(now) or "")
    log.debug(
        "built SR %s for source %s (model %s %s, %s, %s)",
        instance, sop_uid, result.model_name, result.model_version, result.predicted_class, result.priority,
    )
    return sr


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
