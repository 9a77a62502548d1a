"""What every result object shares: the result itself (:class:`TriageResult`), its codes,
its deterministic UIDs and the header copied from the source (Patient, Study, SOP Common).

See the package docstring (``worker/results/__init__.py``) for the choices behind them.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
)
from pydicom.valuerep import validate_value

from worker.priority import PRIORITIES  # ("urgent", "high", "routine")

log = logging.getLogger(__name__)

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
        """From a finished :class:`worker.store.Instance` row and the
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
