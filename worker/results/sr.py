"""The Comprehensive SR (TID 1500) per screened image, fast path: a highdicom-built template
per (model, source SOP class, modality), copied and patched per image with plain pydicom.

Same dataset as :func:`worker.results.sr_reference._build_sr_reference`, element for element, in
a few ms instead of about 100 (the package docstring says what is built and why).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept, RelationshipTypeValues
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
)
from pydicom.valuerep import DA, DS, TM

from worker.results.common import (
    _NO,
    _PIXELS,
    _PREDICTED_CLASS,
    _PRIORITY,
    _PRIORITY_VALUES,
    _PROBABILITY,
    _QUALITATIVE_EVALUATIONS,
    _SOURCE,
    _TRIAGE_REASON,
    _YES,
    DISCLAIMER,
    LOCAL_SCHEME,
    TriageResult,
    _copy_element,
    _copy_patient_and_study,
    _dicom_dt,
    _instance_number,
    _now,
    _require_uids,
    _set_common,
    _text,
    _tz_offset,
    _uid,
    finding_code,
)
from worker.results.encoding import EncodedItem, freeze
from worker.results.plain import _clone, _ds, _el, _new_ds, _plain
from worker.results.sr_reference import _build_sr_reference, _modality_code, _orientation_and_spacing

log = logging.getLogger(__name__)

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
#   in a small LRU cache.  Templates are never modified: each SR starts from a copy.  The items
#   that no SR changes (codes, observation context, algorithm identification, ...; most of the
#   ~160 items) are frozen into read-only worker.results.encoding.EncodedItem objects that keep
#   their own encoding: shared by the copies, not copied, and spliced into the file by
#   worker.results.encoding.encode instead of being encoded again per SR.
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

#: id(code object) -> (the object, its item).  Holding the object keeps its id unique; only
#: long-lived code objects (module constants, cached finding codes) come here in practice.
_CODE_CACHE: dict[int, tuple[Any, Dataset]] = {}


def _code_item(code: Any) -> Dataset:
    """The code sequence item highdicom writes for a Code or CodedConcept: read only and
    pre-encoded (:func:`~worker.results.encoding.freeze`), shared by every SR."""
    entry = _CODE_CACHE.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1]
    tpl = freeze(_plain(code if isinstance(code, CodedConcept) else CodedConcept.from_code(code)))
    if len(_CODE_CACHE) < 512:
        _CODE_CACHE[id(code)] = (code, tpl)
    return tpl if type(tpl) is EncodedItem else _clone(tpl)


def _content_item(relationship: str | None, value_type: str, name: Any, *elems: DataElement) -> Dataset:
    """highdicom's ContentItem: ValueType, ConceptNameCodeSequence, RelationshipType, + ``elems``."""
    ds = _ds(_el(_T_VALUE_TYPE, "CS", value_type), _el(_T_CONCEPT_NAME, "SQ", [_code_item(name)]), *elems)
    if relationship is not None:
        ds._dict[_T_RELATIONSHIP] = _el(_T_RELATIONSHIP, "CS", relationship)
    return ds


_ITEM_CACHE: dict[tuple[Any, ...], Dataset] = {}


def _cached(key: tuple[Any, ...], build: Any) -> Dataset:
    """The content item ``build()`` makes, built once per key (bounded; a race costs at most a
    second, equal build), read only and pre-encoded, shared by every SR (a copy if it cannot be
    frozen)."""
    tpl = _ITEM_CACHE.get(key)
    if tpl is None:
        tpl = freeze(build())
        if len(_ITEM_CACHE) < 2048:
            _ITEM_CACHE[key] = tpl
    return tpl if type(tpl) is EncodedItem else _clone(tpl)


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
    _freeze_constant_items(sr, _patched_items(sr, library_at, evaluations_at, measurements_at, groups))
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


def _patched_items(
    sr: Dataset, library_at: int, evaluations_at: int, measurements_at: int, groups: Sequence[_GroupSlots]
) -> set[int]:
    """ids of the template's items that build_sr patches or replaces, and of their ancestors."""
    content = sr.ContentSequence
    keep = [content[library_at], content[evaluations_at], content[measurements_at]]
    study = sr.CurrentRequestedProcedureEvidenceSequence[0]
    series = study.ReferencedSeriesSequence[0]
    keep += [study, series, series.ReferencedSOPSequence[0]]
    keep += list(sr.ContributingEquipmentSequence)  # ContributionDateTime
    for slots, group in zip(groups, content[measurements_at].ContentSequence, strict=True):
        items = group.ContentSequence
        image, probability = items[slots.image], items[slots.probability]
        keep += [group, items[slots.tracking_uid], items[slots.predicted], image, probability]
        keep += [image.ReferencedSOPSequence[0], probability.MeasuredValueSequence[0]]
    return {id(item) for item in keep}


def _freeze_constant_items(ds: Dataset, patched: set[int]) -> None:
    """Replace, in place, every item below ``ds`` that build_sr never changes by its read-only,
    pre-encoded copy (:func:`~worker.results.encoding.freeze`); recurse into the others."""
    for elem in ds._dict.values():
        if elem.VR != "SQ":
            continue
        items: list[Dataset] = elem.value._list  # type: ignore[union-attr]
        for i, item in enumerate(items):
            if id(item) in patched:
                _freeze_constant_items(item, patched)
            else:
                items[i] = freeze(item)


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
