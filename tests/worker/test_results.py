"""worker.results: the SR and SC datasets sent back to PACS (no network here).

Every object is checked with dciodvfy (dicom3tools) for IOD errors, read back after a round trip
through a Part 10 file, and compared with the inputs.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import numpy as np
import pydicom
import pytest
import support
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from worker.results import (
    LOCAL_SCHEME,
    SC_MAX_SIDE,
    SC_SERIES_NUMBER,
    SERIES_DESCRIPTION,
    SR_SERIES_NUMBER,
    ResultUIDs,
    TriageResult,
    build_sc,
    build_sr,
    finding_code,
    result_uids,
    sc,
    sr_reference,
)
from worker.results.encoding import ReadOnlyItemError

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
SNOMED = {"normal": "17621005", "pneumonia": "233604007", "covid19": "840539006"}
DICOM_DIR = support.SHARED / "data" / "dicom"
REAL_FILES = [
    "rsna_c64d5667-a776-4f95-9e21-bfabafb07740.dcm",
    "nih_dx_110503645592756492463169821050252582267888.dcm",
    "fodicom_CR-MONO1-10-chest.dcm",
]
NOW = datetime(2026, 11, 26, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1)))


# --------------------------------------------------------------------------- helpers


def make_result(
    predicted: str = "covid19", *, version: str = "0.1.0", name: str = "cxr-hybrid", **kw: object
) -> TriageResult:
    probs = {"normal": 0.05, "pneumonia": 0.04, "covid19": 0.91}
    others = [c for c in probs if c != predicted]
    if predicted in probs:  # make `predicted` the most probable, keep the sum at 1
        probs = {c: (0.8125 if c == predicted else (0.0625 if c == others[0] else 0.125)) for c in probs}
    fields: dict[str, object] = dict(
        predicted_class=predicted,
        probabilities=probs,
        priority="urgent" if predicted in ("covid19", "pneumonia") else "routine",
        triage_reason=(
            f"P({predicted})={probs.get(predicted, 0):.2f} >= 0.50"
            if predicted != "normal"
            else "no thresholded class >= threshold"
        ),
        thresholds={"covid19": 0.5, "pneumonia": 0.5},
        model_name=name,
        model_version=version,
        model_sha256="0123456789abcdef" * 4,
        model_precision="int8",
    )
    fields.update(kw)
    return TriageResult(**fields)  # type: ignore[arg-type]


def source_image(**kw: object) -> Dataset:
    ds = support.make_image(patient_name="Sekret^Patientname", patient_id="PID-7F3A9-SECRET", **kw)  # type: ignore[arg-type]
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDescription = "XR CHEST PA"
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.143, 0.143]
    return ds


def roundtrip(ds: Dataset, path: Path) -> Dataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not on PATH")
    out = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stderr + "\n" + out.stdout).splitlines()
    return [ln for ln in lines if ln.startswith("Error")]


def load_real(name: str) -> Dataset:
    if not support.SHARED.is_dir():
        pytest.skip(f"{support.SHARED} (shared data checkout) is absent")
    path = DICOM_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        # The fo-dicom file is a bare ACR-NEMA-style stream: implicit VR little endian, no meta.
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta = meta
    return ds


def walk(items: pydicom.Sequence) -> list[Dataset]:
    """Every content item below ``items``, depth first."""
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        if "ContentSequence" in item:
            out.extend(walk(item.ContentSequence))
    return out


def concept(item: Dataset) -> tuple[str, str]:
    c = item.ConceptNameCodeSequence[0]
    return str(c.CodingSchemeDesignator), str(c.CodeValue)


def child(container: Dataset, scheme: str, value: str) -> Dataset:
    found = [i for i in container.ContentSequence if concept(i) == (scheme, value)]
    assert len(found) == 1, f"expected one ({scheme}, {value}) child, found {len(found)}"
    return found[0]


def groups_by_class_code(sr: Dataset) -> dict[str, Dataset]:
    """Measurement groups (TID 1501) keyed by the code value of their Finding."""
    measurements = child(sr, "DCM", "126010")
    out = {}
    for group in measurements.ContentSequence:
        assert concept(group) == ("DCM", "125007")
        finding = child(group, "DCM", "121071")
        out[str(finding.ConceptCodeSequence[0].CodeValue)] = group
    return out


def num_value(item: Dataset) -> float:
    mv = item.MeasuredValueSequence[0]
    return float(mv.FloatingPointValue) if "FloatingPointValue" in mv else float(mv.NumericValue)


PATIENT_STUDY = [
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDescription",
]


# --------------------------------------------------------------------------- UIDs


def test_result_uids_are_deterministic_valid_and_distinct() -> None:
    a = result_uids("1.2.3.4", "1.2.3", "cxr-hybrid", "0.1.0")
    assert a == result_uids("1.2.3.4", "1.2.3", "cxr-hybrid", "0.1.0")
    uids = [a.sr_series, a.sr_instance, a.sc_series, a.sc_instance]
    assert len(set(uids)) == 4, "SR and SC objects and series never share a UID"
    for uid in uids:
        assert uid.startswith("2.25.") and len(uid) <= 64 and UID_RE.match(uid), uid


def test_result_uids_change_with_model_version_and_name_but_series_are_per_study() -> None:
    a = result_uids("1.2.3.4", "1.2.3", "cxr-hybrid", "0.1.0")
    v2 = result_uids("1.2.3.4", "1.2.3", "cxr-hybrid", "0.2.0")
    other = result_uids("1.2.3.4", "1.2.3", "cxr-other", "0.1.0")
    def every(u: ResultUIDs) -> set[str]:
        return {u.sr_series, u.sr_instance, u.sc_series, u.sc_instance}

    for b in (v2, other):
        assert not every(a) & every(b)
    same_study = result_uids("1.2.3.5", "1.2.3", "cxr-hybrid", "0.1.0")
    assert (same_study.sr_series, same_study.sc_series) == (a.sr_series, a.sc_series)
    assert (same_study.sr_instance, same_study.sc_instance) != (a.sr_instance, a.sc_instance)
    other_study = result_uids("1.2.3.4", "1.2.4", "cxr-hybrid", "0.1.0")
    assert other_study.sr_series != a.sr_series and other_study.sr_instance == a.sr_instance


def test_result_uids_are_not_fooled_by_concatenation() -> None:
    # pydicom's generate_uid joins entropy strings with "", so ("ab", "c") == ("a", "bc") there.
    assert result_uids("1.2", "1.2", "ab", "c") != result_uids("1.2", "1.2", "a", "bc")


def test_resultuids_is_a_frozen_dataclass() -> None:
    u = ResultUIDs("1", "2", "3", "4")
    with pytest.raises(AttributeError):
        u.sr_series = "5"  # type: ignore[misc]


# --------------------------------------------------------------------------- codes and result


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("normal", "17621005"), ("Normal", "17621005"), ("pneumonia", "233604007"),
        ("bacterial_pneumonia", "53084003"), ("Viral pneumonia", "75570004"),
        ("covid19", "840539006"), ("COVID-19", "840539006"), ("covid", "840539006"),
    ],
)
def test_finding_code_snomed(name: str, value: str) -> None:
    code = finding_code(name)
    assert (code.scheme_designator, code.value) == ("SCT", value)
    assert 0 < len(code.meaning) <= 64


def test_finding_code_unknown_class_gets_a_local_code() -> None:
    code = finding_code("tuberculosis")
    assert (code.scheme_designator, code.value, code.meaning) == (LOCAL_SCHEME, "TUBERCULOSIS", "tuberculosis")
    long = finding_code("pleural effusion with loculation")
    assert long.scheme_designator == LOCAL_SCHEME and len(long.value) <= 16
    assert long == finding_code("pleural effusion with loculation")
    assert long.value != finding_code("pleural effusion without loculation").value


def test_triage_result_validates_and_freezes() -> None:
    probs = {"normal": np.float32(0.25), "pneumonia": 0.5, "covid19": 0.25}
    r = make_result(probabilities=probs, predicted_class="pneumonia")
    assert type(r.probabilities["normal"]) is float and r.probability == 0.5
    with pytest.raises(TypeError):
        r.probabilities["normal"] = 1.0  # type: ignore[index]
    with pytest.raises(ValueError, match="priority"):
        make_result(priority="stat")
    with pytest.raises(ValueError, match="predicted_class"):
        make_result(predicted_class="tb")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_result(probabilities={"normal": 1.5, "pneumonia": 0.0, "covid19": 0.0}, predicted_class="normal")
    with pytest.raises(ValueError, match="model_precision"):
        make_result(model_precision="fp64")
    with pytest.raises(ValueError, match="thresholds"):
        make_result(thresholds={"tb": 0.5})


def test_triage_result_from_job_row_and_card() -> None:
    job = SimpleNamespace(
        predicted_class="covid19", probabilities={"covid19": 0.91, "normal": 0.05, "pneumonia": 0.04},
        priority="urgent", triage_reason="P(covid19)=0.91 >= 0.50",
        model_name="cxr-hybrid", model_version="0.1.0", model_precision="bf16",
    )
    card = SimpleNamespace(
        name="cxr-hybrid", version="0.1.0", classes=("normal", "pneumonia", "covid19"), precision="f32",
        thresholds={"covid19": 0.5, "pneumonia": 0.5}, bin_sha256="ab" * 32,
    )
    r = TriageResult.from_job(job, card)
    assert list(r.probabilities) == ["normal", "pneumonia", "covid19"]  # card class order
    assert (r.model_precision, r.model_sha256, dict(r.thresholds)) == ("bf16", "ab" * 32, card.thresholds)


# --------------------------------------------------------------------------- SR


def test_sr_header(tmp_path: Path) -> None:
    src = source_image()
    result = make_result()
    sr = roundtrip(build_sr(src, result, now=NOW), tmp_path / "sr.dcm")
    uids = result_uids(src.SOPInstanceUID, src.StudyInstanceUID, result.model_name, result.model_version)

    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sr.SOPClassUID == COMPREHENSIVE_SR == sr.file_meta.MediaStorageSOPClassUID
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID) == (uids.sr_instance, uids.sr_series)
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert (sr.Modality, sr.SeriesDescription, sr.SeriesNumber) == ("SR", SERIES_DESCRIPTION, SR_SERIES_NUMBER)
    assert (sr.VerificationFlag, sr.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    for kw in PATIENT_STUDY:
        assert sr[kw].value == src[kw].value, kw
    assert (sr.ContentDate, sr.ContentTime[:6], sr.TimezoneOffsetFromUTC) == ("20261126", "143005", "+0100")

    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    series = evidence.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID

    ours = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "cxr-triage"]
    assert len(ours) == 1
    eq = ours[0]
    assert (eq.ManufacturerModelName, eq.SoftwareVersions) == ("cxr-hybrid", "0.1.0")
    purpose = eq.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeValue) == ("DCM", "109102")
    assert result.model_sha256 in eq.ContributionDescription
    assert any(i.CodingSchemeDesignator == LOCAL_SCHEME for i in sr.CodingSchemeIdentificationSequence)


@pytest.mark.parametrize("predicted", ["normal", "pneumonia", "covid19"])
def test_sr_content_tree(tmp_path: Path, predicted: str) -> None:
    src = source_image()
    result = make_result(predicted)
    sr = roundtrip(build_sr(src, result, now=NOW), tmp_path / "sr.dcm")

    assert concept(sr) == ("DCM", "126000")  # Imaging Measurement Report, TID 1500
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # The coded finding for the predicted class, with its SNOMED CT code.
    evaluations = child(sr, "UMLS", "C0034375")
    finding = child(evaluations, "DCM", "121071").ConceptCodeSequence[0]
    assert (finding.CodingSchemeDesignator, finding.CodeValue) == ("SCT", SNOMED[predicted])
    priority = child(evaluations, "SCT", "260870009").ConceptCodeSequence[0]
    assert priority.CodeValue == result.priority.upper()
    assert child(evaluations, LOCAL_SCHEME, "TRIAGEREASON").TextValue == result.triage_reason
    assert child(evaluations, "DCM", "121106").TextValue == "AI triage - not for diagnosis"

    # One measurement group per class: probability (exact, read back), threshold, predicted flag.
    groups = groups_by_class_code(sr)
    assert set(groups) == {SNOMED[c] for c in result.probabilities}
    for cls, p in result.probabilities.items():
        g = groups[SNOMED[cls]]
        prob = child(g, "DCM", "122157")
        assert num_value(prob) == p
        unit = prob.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
        assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "1")
        thresholds = [i for i in g.ContentSequence if concept(i) == ("DCM", "122411")]
        if cls in result.thresholds:
            assert [num_value(i) for i in thresholds] == [result.thresholds[cls]]
        else:
            assert thresholds == []
        flag = child(g, LOCAL_SCHEME, "PREDICTEDCLASS").ConceptCodeSequence[0].CodeValue
        assert flag == ("373066001" if cls == predicted else "373067005")
        # Algorithm identification (TID 4019) and the source image.
        assert child(g, "DCM", "111001").TextValue == result.model_name
        assert child(g, "DCM", "111003").TextValue == result.model_version
        params = [i.TextValue for i in g.ContentSequence if concept(i) == ("DCM", "111002")]
        assert f"sha256={result.model_sha256}" in params and "precision=int8" in params
        image = [i for i in g.ContentSequence if i.ValueType == "IMAGE"]
        assert image and image[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID

    # Image library references the source, with the descriptors it has.
    library = child(sr, "DCM", "111028")
    entries = [i for i in walk(library.ContentSequence) if i.ValueType == "IMAGE"]
    assert [e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for e in entries] == [src.SOPInstanceUID]
    descriptors = {concept(d) for d in entries[0].ContentSequence}
    assert {("DCM", "121139"), ("DCM", "110910"), ("DCM", "111044"), ("DCM", "111026")} <= descriptors

    # Observer is the device (the model), identified by name and version.
    texts = {concept(i): i.get("TextValue") for i in sr.ContentSequence}
    assert texts[("DCM", "121013")] == result.model_name


def test_sr_reads_back_with_highdicom(tmp_path: Path) -> None:
    src = source_image()
    result = make_result("pneumonia")
    path = tmp_path / "sr.dcm"
    build_sr(src, result).save_as(path, enforce_file_format=True)
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    probs = {}
    for g in groups:
        (m,) = [m for m in g.get_measurements() if m.name.value == "122157"]
        probs[g.finding_type.value] = m.value
    assert probs == {SNOMED[c]: p for c, p in result.probabilities.items()}


def test_sr_for_unknown_class_uses_local_code(tmp_path: Path) -> None:
    src = source_image()
    result = make_result(
        "tuberculosis",
        probabilities={"normal": 0.2, "tuberculosis": 0.7, "covid19": 0.1},
        thresholds={"tuberculosis": 0.5},
        priority="urgent",
        triage_reason="P(tuberculosis)=0.70 >= 0.50",
    )
    path = tmp_path / "sr.dcm"
    sr = roundtrip(build_sr(src, result), path)
    finding = child(child(sr, "UMLS", "C0034375"), "DCM", "121071").ConceptCodeSequence[0]
    assert (finding.CodingSchemeDesignator, finding.CodeValue) == (LOCAL_SCHEME, "TUBERCULOSIS")
    assert dciodvfy_errors(path) == []


def test_sr_rebuild_is_identical_and_new_version_is_new_object() -> None:
    src = source_image()
    a = build_sr(src, make_result(), now=NOW)
    b = build_sr(src, make_result(), now=NOW)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)
    c = build_sr(src, make_result(version="0.2.0"), now=NOW)
    assert c.SOPInstanceUID != a.SOPInstanceUID and c.SeriesInstanceUID != a.SeriesInstanceUID


def test_sr_passes_dciodvfy(tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    build_sr(source_image(), make_result()).save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_missing_type2_attributes_are_written_empty(tmp_path: Path) -> None:
    src = source_image()
    type2 = ("AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDate", "StudyTime", "PatientBirthDate", "PatientSex")
    for kw in (*type2, "StudyDescription"):
        del src[kw]
    with pydicom.config.disable_value_validation():
        src.PatientAge = "68"  # invalid AS (no unit): not copied, not guessed
    result = make_result()
    for kind, build in (("sr", build_sr), ("sc", build_sc)):
        path = tmp_path / f"{kind}.dcm"
        ds = roundtrip(build(src, result), path)
        for kw in type2:
            assert kw in ds and ds[kw].value in ("", None), (kind, kw)
        assert "StudyDescription" not in ds and "PatientAge" not in ds
        assert dciodvfy_errors(path) == [], kind


def test_source_without_uids_or_with_unknown_sop_class_is_refused() -> None:
    src = source_image()
    del src.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_sr(src, make_result())
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        build_sc(src, make_result())
    with pytest.raises(ValueError, match="SOP Class"):
        build_sr(source_image(sop_class="1.2.3.4.5.6"), make_result())


def test_building_does_not_modify_the_source() -> None:
    src = source_image()
    before = support.to_bytes(src)
    build_sr(src, make_result())
    build_sc(src, make_result())
    assert support.to_bytes(src) == before


# --------------------------------------------------------------------------- SC


def test_sc_image_and_header(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    pixels = (rng.integers(0, 4096, (2000, 1600))).astype(np.uint16)
    src = source_image(pixels=pixels, stored=12)
    result = make_result("pneumonia")
    path = tmp_path / "sc.dcm"
    sc = roundtrip(build_sc(src, result, now=NOW), path)
    uids = result_uids(src.SOPInstanceUID, src.StudyInstanceUID, result.model_name, result.model_version)

    assert sc.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sc.SOPClassUID == SC_STORAGE
    assert (sc.SOPInstanceUID, sc.SeriesInstanceUID) == (uids.sc_instance, uids.sc_series)
    assert sc.SeriesInstanceUID not in (src.SeriesInstanceUID, uids.sr_series)
    assert (sc.SeriesDescription, sc.SeriesNumber, sc.ConversionType) == (SERIES_DESCRIPTION, SC_SERIES_NUMBER, "WSD")
    assert sc.BurnedInAnnotation == "YES"
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel) == ("MONOCHROME2", 1)
    assert (sc.BitsAllocated, sc.BitsStored, sc.HighBit, sc.PixelRepresentation) == (8, 8, 7, 0)
    assert max(sc.Rows, sc.Columns) <= SC_MAX_SIDE
    assert sc.Rows / sc.Columns > 2000 / 1600  # aspect kept, banner added on top
    for kw in PATIENT_STUDY:
        assert sc[kw].value == src[kw].value, kw
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    eq = sc.ContributingEquipmentSequence[0]
    assert (eq.Manufacturer, eq.ManufacturerModelName, eq.SoftwareVersions) == ("cxr-triage", "cxr-hybrid", "0.1.0")

    arr = sc.pixel_array
    assert arr.dtype == np.uint8 and arr.shape == (sc.Rows, sc.Columns)
    banner_rows = sc.Rows - round(sc.Columns * 2000 / 1600)
    assert banner_rows > 20
    banner = arr[:banner_rows]
    assert (banner == 255).any() and (banner == 0).mean() > 0.5  # white text on black
    assert dciodvfy_errors(path) == []


def test_sc_small_image_is_not_enlarged_and_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = np.zeros((300, 240), np.uint16)
    pixels[:, 120:] = 1000  # right half: high stored values
    src = source_image(pixels=pixels, photometric="MONOCHROME1", stored=12, window=(500, 1000))
    sc = build_sc(src, make_result("normal"))
    assert sc.Columns == 240 and sc.Rows > 300
    img = sc.pixel_array[sc.Rows - 300:]
    assert img[:, :100].mean() > img[:, 140:].mean()  # MONOCHROME1: high values display dark


def test_sc_rebuild_has_the_same_uids_and_pixels() -> None:
    src = source_image()
    a, b = build_sc(src, make_result(), now=NOW), build_sc(src, make_result(), now=NOW)
    assert (a.SOPInstanceUID, a.SeriesInstanceUID, a.PixelData) == (b.SOPInstanceUID, b.SeriesInstanceUID, b.PixelData)
    sr = build_sr(src, make_result(), now=NOW)
    assert a.SOPInstanceUID != sr.SOPInstanceUID and a.SeriesInstanceUID != sr.SeriesInstanceUID


def test_sc_of_lossy_source_stays_flagged_lossy() -> None:
    src = source_image()
    src.LossyImageCompression = "01"
    src.LossyImageCompressionMethod = "ISO_10918_1"
    sc = build_sc(src, make_result())
    assert (sc.LossyImageCompression, sc.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert build_sc(source_image(), make_result()).LossyImageCompression == "00"


@pytest.mark.parametrize(
    ("syntax", "lossy"),
    [(pydicom.uid.JPEGBaseline8Bit, True), (pydicom.uid.JPEG2000, True), (pydicom.uid.JPEGLSNearLossless, True),
     (pydicom.uid.JPEGLosslessSV1, False), (pydicom.uid.JPEG2000Lossless, False), (pydicom.uid.RLELossless, False),
     (ExplicitVRLittleEndian, False)],
)
def test_lossy_by_transfer_syntax_alone(syntax: str, lossy: bool) -> None:
    """A source without LossyImageCompression is lossy when its transfer syntax is (PS3.3
    C.7.6.1.1.5); this raised AttributeError for every compressed syntax before (found by mypy)."""
    src = source_image()
    src.file_meta.TransferSyntaxUID = syntax
    assert "LossyImageCompression" not in src
    assert sc._is_lossy(src) is lossy


# --------------------------------------------------------------------------- privacy


def test_patient_identity_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    # A caret-less name is what makes highdicom warn with the Patient's Name in the message; an
    # invalid Patient's Age makes pydicom's validation log values.  Neither may reach our logs,
    # nor warnings (a service with logging.captureWarnings(True) turns those into log records).
    secrets = ("Sekretname Nocaret", "PID-7F3A9-SECRET", "Referrer^Rita")
    src = source_image()
    src.PatientName = secrets[0]
    with pydicom.config.disable_value_validation():
        src.PatientAge = "68"
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_sr(src, make_result())
        build_sc(src, make_result())
    assert caplog.records, "expected some log records to check"
    texts = [f"{r.name}: {r.getMessage()} {r.args!r}" for r in caplog.records]
    texts += [f"warning: {w.message}" for w in caught]
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked: {text}"


# --------------------------------------------------------------------------- real files


@pytest.mark.shared
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_files(tmp_path: Path, name: str) -> None:
    src = load_real(name)
    for predicted in ("normal", "pneumonia", "covid19"):
        result = make_result(predicted)
        sr_path, sc_path = tmp_path / f"sr-{predicted}.dcm", tmp_path / f"sc-{predicted}.dcm"
        sr = roundtrip(build_sr(src, result), sr_path)
        sc = roundtrip(build_sc(src, result), sc_path)
        assert dciodvfy_errors(sr_path) == [], (name, "SR")
        assert dciodvfy_errors(sc_path) == [], (name, "SC")

        finding = child(child(sr, "UMLS", "C0034375"), "DCM", "121071").ConceptCodeSequence[0]
        assert finding.CodeValue == SNOMED[predicted]
        groups = groups_by_class_code(sr)
        assert {code: num_value(child(g, "DCM", "122157")) for code, g in groups.items()} == {
            SNOMED[c]: p for c, p in result.probabilities.items()
        }
        for ds in (sr, sc):
            assert ds.StudyInstanceUID == src.StudyInstanceUID
            assert str(ds.PatientName) == str(src.get("PatientName", ""))
            assert ds.PatientID == src.get("PatientID", "")
            assert ds.AccessionNumber == src.get("AccessionNumber", "")
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert max(sc.Rows, sc.Columns) <= SC_MAX_SIDE


def test_results_module_imports_no_torch_or_openvino() -> None:
    code = "import sys, worker.results; print(sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'openvino'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=support.REPO, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- fast SR path
#
# build_sr copies a per-model template and builds the per-image parts with plain pydicom; it
# must give exactly what the highdicom-only reference builder gives: same elements, VRs, value
# types and values, same file meta and preamble, same bytes.


def _dataset_differences(fast: Dataset, ref: Dataset, path: str = "") -> list[str]:
    out: list[str] = []
    fast_tags, ref_tags = set(fast.keys()), set(ref.keys())
    out += [f"{path}{t} only in fast" for t in sorted(fast_tags - ref_tags)]
    out += [f"{path}{t} only in reference" for t in sorted(ref_tags - fast_tags)]
    for tag in sorted(fast_tags & ref_tags):
        a, b = fast[tag], ref[tag]
        where = f"{path}{a.keyword or tag}"
        if a.VR != b.VR:
            out.append(f"{where}: VR {a.VR} != {b.VR}")
        elif a.VR == "SQ":
            if len(a.value) != len(b.value):
                out.append(f"{where}: {len(a.value)} items != {len(b.value)}")
            else:
                for i, (x, y) in enumerate(zip(a.value, b.value, strict=True)):
                    out += _dataset_differences(x, y, f"{where}[{i}].")
        elif type(a.value) is not type(b.value) or a.value != b.value or str(a.value) != str(b.value):
            out.append(f"{where}: {type(a.value).__name__} {a.value!r} != {type(b.value).__name__} {b.value!r}")
    return out


def _encoded(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def assert_same_as_reference(src: Dataset, result: TriageResult, now: datetime | None = NOW) -> Dataset:
    fast = build_sr(src, result, now=now)
    ref = sr_reference._build_sr_reference(src, result, now=now)
    diffs = _dataset_differences(fast, ref) + _dataset_differences(fast.file_meta, ref.file_meta, "file_meta.")
    assert diffs == []
    assert fast.preamble == ref.preamble
    assert _encoded(fast) == _encoded(ref)
    return fast


def _source_variant(kind: str) -> Dataset:
    src = source_image()
    if kind == "plain":
        pass
    elif kind == "dx-with-equipment":
        src = source_image(sop_class=support.DX_STORAGE, modality="DX")
        src.Manufacturer = "ACME Medical"
        src.ManufacturerModelName = "DR-1"
        src.SoftwareVersions = ["1.0", "2.3b"]
        src.DeviceSerialNumber = "SN-1"
        src.InstitutionName = "General Hospital"
        src.InstitutionalDepartmentName = "Radiology"
        src.StationName = "XR1"
    elif kind == "bare":  # no orientation/spacing, odd instance number, frame of reference
        del src.PatientOrientation, src.ImagerPixelSpacing
        src.InstanceNumber = "0"
        src.FrameOfReferenceUID = "1.2.3.4.5.6.7"
    elif kind == "odd-values":  # invalid spacing, empty orientation part, unknown modality, multi-frame
        src.ImagerPixelSpacing = [0.1, 0.2, 0.3]  # not a pair: no spacing descriptors
        src.PatientOrientation = ["P", ""]
        src.Modality = "XX"
        src.NumberOfFrames = 1
        src.InstanceNumber = 2**31
    elif kind == "charset-and-missing":
        src.SpecificCharacterSet = "ISO_IR 100"
        src.PatientName = "Müller^Jürgen"
        src.StudyDescription = "Thorax p.a."
        type2 = ("AccessionNumber", "ReferringPhysicianName", "StudyID", "StudyDate", "PatientSex", "PatientBirthDate")
        for kw in type2:
            del src[kw]
        with pydicom.config.disable_value_validation():
            src.PatientAge = "68"
            src.PatientBirthDate = "1970.01.01"
    elif kind == "no-rows":  # Columns only (Rows absent, still an image for highdicom)
        del src.Rows
        src.Manufacturer = "ACME Medical"
    else:
        raise AssertionError(kind)
    return src


def _result_variant(kind: str) -> TriageResult:
    if kind in ("normal", "pneumonia", "covid19"):
        return make_result(kind)
    if kind == "unknown-class-no-sha":
        return make_result(
            "tuberculosis",
            probabilities={"normal": 0.2, "tuberculosis": 0.7, "covid19": 0.1},
            thresholds={"tuberculosis": 0.5},
            model_sha256=None,
            model_precision="f16",
        )
    if kind == "long-names-empty-reason":
        return make_result(
            "pleural effusion with loculation and more words",
            probabilities={"normal": 1e-7, "pleural effusion with loculation and more words": 0.9999999},
            thresholds={},
            triage_reason="  ",
            priority="routine",
            name="m" * 70,
            version="v" * 70,
            model_precision="f32",
        )
    if kind == "extreme-probabilities":
        return make_result(
            "covid19",
            probabilities={"normal": 0.0, "pneumonia": 1 / 3, "covid19": 1.0},
            thresholds={"covid19": 1.0, "pneumonia": 0.0, "normal": 0.123456789012345678},
        )
    raise AssertionError(kind)


SOURCE_KINDS = ["plain", "dx-with-equipment", "bare", "odd-values", "charset-and-missing", "no-rows"]
RESULT_KINDS = [
    "normal", "pneumonia", "covid19", "unknown-class-no-sha", "long-names-empty-reason", "extreme-probabilities",
]


@pytest.mark.parametrize("source_kind", SOURCE_KINDS)
@pytest.mark.parametrize("result_kind", RESULT_KINDS)
def test_fast_sr_equals_highdicom_reference(source_kind: str, result_kind: str) -> None:
    src, result = _source_variant(source_kind), _result_variant(result_kind)
    assert_same_as_reference(src, result)
    assert_same_as_reference(src, result)  # second build: from the cached template


@pytest.mark.parametrize(
    "now",
    [
        None,
        datetime(2026, 1, 2, 3, 4, 5),  # naive: no TimezoneOffsetFromUTC
        datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
    ],
)
def test_fast_sr_equals_reference_at_any_time(now: datetime | None) -> None:
    if now is None:
        now = datetime.now().astimezone()  # what both use by default, fixed for the comparison
    assert_same_as_reference(source_image(), make_result(), now=now)


def test_fast_sr_equipment_item_of_the_source_is_kept(tmp_path: Path) -> None:
    src = _source_variant("dx-with-equipment")
    sr = assert_same_as_reference(src, make_result())
    assert [str(e.Manufacturer) for e in sr.ContributingEquipmentSequence][:2] == ["ACME Medical", "cxr-triage"]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []


def test_fast_sr_templates_are_not_changed_by_callers() -> None:
    src, result = source_image(), make_result()
    first = build_sr(src, result, now=NOW)
    expected = _encoded(first)
    # A caller that edits its SR (values, nested items, sequences) must not affect the next one;
    # the items every SR shares are read only (pre-encoded): changing one raises.
    first.PatientName = "Changed^Name"
    with pytest.raises(ReadOnlyItemError):
        first.ContentSequence[0].ConceptNameCodeSequence[0].CodeMeaning = "changed"
    editable = copy.deepcopy(first.ContentSequence[0])
    editable.ConceptNameCodeSequence[0].CodeMeaning = "changed"
    first.ContentSequence[0] = editable
    first.ContentSequence.append(Dataset())
    first.ContributingEquipmentSequence[-1].Manufacturer = "changed"
    first.file_meta.ImplementationVersionName = "changed"
    assert _encoded(build_sr(src, result, now=NOW)) == expected


def test_fast_sr_is_thread_safe() -> None:
    sources = [source_image() for _ in range(4)]
    results_ = [make_result(p, version=f"9.{i}") for i, p in enumerate(("normal", "pneumonia", "covid19", "covid19"))]
    expected = [_encoded(sr_reference._build_sr_reference(s, r, now=NOW)) for s, r in zip(sources, results_, strict=True)]
    got: list[list[bytes]] = [[] for _ in sources]

    def work(i: int) -> None:
        for _ in range(5):
            got[i].append(_encoded(build_sr(sources[i], results_[i], now=NOW)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, exp in enumerate(expected):
        assert got[i] == [exp] * 5


@pytest.mark.parametrize("kind", ["unknown-sop-class", "sr-modality", "no-pixel-description"])
def test_fast_sr_refuses_what_the_reference_refuses(kind: str) -> None:
    if kind == "unknown-sop-class":
        src = source_image(sop_class="1.2.3.4.5.6")
    elif kind == "sr-modality":
        src = source_image()
        src.Modality = "SR"
    else:
        src = source_image()
        for kw in ("Rows", "Columns", "SamplesPerPixel", "PixelRepresentation"):
            del src[kw]
    with pytest.raises(ValueError) as ref_exc:
        sr_reference._build_sr_reference(src, make_result(), now=NOW)
    with pytest.raises(ValueError) as fast_exc:
        build_sr(src, make_result(), now=NOW)
    assert str(fast_exc.value) == str(ref_exc.value)


@pytest.mark.shared
@pytest.mark.parametrize("name", REAL_FILES)
def test_fast_sr_equals_reference_on_real_files(tmp_path: Path, name: str) -> None:
    src = load_real(name)
    for kind in ("normal", "pneumonia", "covid19", "unknown-class-no-sha"):
        sr = assert_same_as_reference(src, _result_variant(kind))
        path = tmp_path / f"sr-{kind}.dcm"
        sr.save_as(path, enforce_file_format=True)
        assert dciodvfy_errors(path) == [], (name, kind)


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
