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

import json
import logging
import math
import re
import uuid
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
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import validate_value
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from worker.imaging import PreprocessSpec, decode, to_grey8

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
PRIORITIES: tuple[str, ...] = ("urgent", "routine")
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
    priority: str  # "urgent" | "routine"
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
    def from_job(cls, job: Any, card: Any) -> "TriageResult":
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
    for kw in _PATIENT_STUDY_KEYWORDS:
        if kw in target:
            del target[kw]
    dropped: list[str] = []
    for kw in _PATIENT_STUDY_KEYWORDS:
        elem = source[kw] if kw in source else None
        if elem is not None and (kw in _VERBATIM or _valid_value(elem)):
            target.add(_copy_element(elem))
            continue
        if elem is not None:
            dropped.append(kw)
        if kw in _TYPE2_COPIED:
            target.add(DataElement(tag_for_keyword(kw), dictionary_VR(kw), None))  # type: ignore[arg-type]
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
    missing = [kw for kw, v in zip(keywords, vals) if not v]
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
    orientation = source.get("PatientOrientation")
    if isinstance(orientation, (list, MultiValue)) and len(orientation) == 2 and all(orientation):
        descriptors.append(text(codes.DCM.PatientOrientationRow, str(orientation[0])))
        descriptors.append(text(codes.DCM.PatientOrientationColumn, str(orientation[1])))
    spacing = source.get("ImagerPixelSpacing")
    if isinstance(spacing, (list, MultiValue)) and len(spacing) == 2:
        try:
            row_mm, col_mm = float(spacing[0]), float(spacing[1])
        except (TypeError, ValueError):
            pass
        else:
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
            item.ContributionDateTime = now.strftime("%Y%m%d%H%M%S.%f") + (_tz_offset(now) or "")
    log.debug(
        "built SR %s for source %s (model %s %s, %s, %s)",
        uids.sr_instance, sop_uid, result.model_name, result.model_version, result.predicted_class, result.priority,
    )
    return sr


# --------------------------------------------------------------------------- SC


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in bitmap font (no FreeType, no font files): same pixels everywhere."""
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


def _is_lossy(source: Dataset) -> bool:
    """PS3.3 C.7.6.1.1.5: once lossy-compressed, always flagged, also in derived images."""
    if _text(source, "LossyImageCompression") == "01":
        return True
    meta = getattr(source, "file_meta", None)
    ts = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    return bool(ts) and ts.is_transfer_syntax and ts.is_compressed and not ts.is_lossless


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
