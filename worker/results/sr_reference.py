"""The Comprehensive SR (TID 1500) built with highdicom alone: the reference :func:`build_sr`
must equal element for element (tests/worker/test_results.py), and the builder of its templates.

About 100 ms per image, nearly all of it highdicom validating and copying; never on the hot path
except once per template (model, SOP class, modality).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import highdicom as hd
import pydicom
from highdicom.sr import CodedConcept, RelationshipTypeValues
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from worker.results.common import (
    _LOCAL_SCHEME_ITEM,
    _NO,
    _NO_UNITS,
    _PIXELS,
    _PREDICTED_CLASS,
    _PRIORITY,
    _PRIORITY_VALUES,
    _PROBABILITY,
    _PROCEDURE_REPORTED,
    _QUALITATIVE_EVALUATIONS,
    _SOURCE,
    _SR_CLASS,
    _THRESHOLD,
    _TRIAGE_REASON,
    _YES,
    DISCLAIMER,
    MANUFACTURER,
    SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    TriageResult,
    _contributing_equipment,
    _copy_patient_and_study,
    _dicom_dt,
    _instance_number,
    _now,
    _require_uids,
    _set_common,
    _standin,
    _text,
    _tz_offset,
    _uid,
    finding_code,
    result_uids,
)

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
