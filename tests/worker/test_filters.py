"""worker.filters.check: one test per rule, on headers built here, plus the real chest DICOMs."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from worker import filters

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
DICOM_DIR = SHARED / "data" / "dicom"

CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
SC_MF_BYTE = "1.2.840.10008.5.1.4.1.1.7.2"
SC_MF_WORD = "1.2.840.10008.5.1.4.1.1.7.3"
SC_MF_TRUE_COLOUR = "1.2.840.10008.5.1.4.1.1.7.4"
CT = "1.2.840.10008.5.1.4.1.1.2"

# Some tests use lower-case or padded CS values on purpose, as real senders do.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR CS:UserWarning")


def header(
    *,
    sop_class: str = CR,
    modality: str | None = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    photometric: str | None = "MONOCHROME2",
    samples: int = 1,
    pixels: bool = True,
    **attrs: object,
) -> Dataset:
    """A radiograph header; Pixel Data is garbage on purpose (the filter must not decode it)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    if modality is not None:
        ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    if photometric is not None:
        ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = samples
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    if pixels:
        ds.PixelData = encapsulate([b"not a JPEG at all"])
    return ds


@pytest.fixture(autouse=True)
def _never_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to decode pixels during a filter test fails the test."""
    import pydicom.pixels.decoders.base as base

    monkeypatch.setattr(base, "get_decoder", lambda *a, **k: pytest.fail("filter decoded pixel data"))
    monkeypatch.setattr(Dataset, "pixel_array", property(lambda self: pytest.fail("filter read pixel_array")))


def test_cr_and_dx_chest_pass() -> None:
    assert filters.check(header()) is None
    assert filters.check(header(sop_class=DX, modality="DX", view="AP", photometric="MONOCHROME1")) is None


def test_accepted_modalities() -> None:
    assert filters.ACCEPTED_MODALITIES == frozenset({"CR", "DX"})


def test_no_pixel_data() -> None:
    assert filters.check(header(pixels=False)) == "no pixel data"


@pytest.mark.parametrize(("modality", "shown"), [("CT", "CT"), ("MG", "MG"), (None, "(missing)"), ("", "(missing)")])
def test_other_modalities_are_skipped(modality: str | None, shown: str) -> None:
    reason = filters.check(header(sop_class=CT, modality=modality))
    assert reason == f"modality {shown} is not CR or DX"


def test_dx_passes_whatever_the_sop_class_and_without_body_part() -> None:
    """Like the NIH ChestX-ray14 DICOM: SC SOP class, Modality DX, no body part or view."""
    ds = header(sop_class=SC, modality="DX", body_part=None, view=None, StudyDescription="No Finding")
    assert filters.check(ds) is None
    assert filters.check(header(modality="CR", body_part=None, view=None)) is None


@pytest.mark.parametrize("sop_class", [SC, SC_MF_BYTE, SC_MF_WORD])
@pytest.mark.parametrize(
    "evidence",
    [
        {"body_part": "CHEST"},
        {"body_part": "THORAX"},
        {"StudyDescription": "XR Chest PA"},
        {"SeriesDescription": "Thorax 1 view"},
        {"ProtocolName": "LUNG"},
        {"StudyDescription": "CXR portable"},
        {"SeriesDescription": "COVID-19 screening"},
        {"StudyDescription": "suspected pneumonia"},
    ],
)
def test_secondary_capture_needs_chest_evidence(sop_class: str, evidence: dict) -> None:
    kwargs = {"body_part": None, **evidence}
    assert filters.check(header(sop_class=sop_class, modality="OT", view=None, **kwargs)) is None


@pytest.mark.parametrize("sop_class", [SC, SC_MF_BYTE, SC_MF_WORD])
def test_secondary_capture_without_evidence_is_skipped(sop_class: str) -> None:
    reason = filters.check(header(sop_class=sop_class, modality="OT", body_part=None, StudyDescription="Abdomen"))
    assert reason is not None and reason.startswith("secondary capture (OT) without chest evidence")


def test_colour_secondary_capture_class_is_not_an_exception() -> None:
    reason = filters.check(header(sop_class=SC_MF_TRUE_COLOUR, modality="OT", StudyDescription="chest"))
    assert reason == "modality OT is not CR or DX"


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LAT", "LLD", "RLD", " ll "])
def test_lateral_views_are_skipped(view: str) -> None:
    assert filters.check(header(view=view)) == "lateral view"


def test_lateral_view_code_sequence_is_skipped() -> None:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "R-10236", "SRT", "left lateral"
    ds = header(sop_class=DX, modality="DX", view=None)
    ds.ViewCodeSequence = Sequence([code])
    assert filters.check(ds) == "lateral view"
    code.CodeMeaning = "postero-anterior"
    assert filters.check(ds) is None


@pytest.mark.parametrize("view", ["AP", "PA", "", None])
def test_frontal_or_unknown_views_pass(view: str | None) -> None:
    assert filters.check(header(view=view)) is None


def test_oblique_views_are_skipped() -> None:
    assert filters.check(header(view="RAO")) == "oblique view (RAO)"


@pytest.mark.parametrize("part", ["KNEE", "SKULL", "abdomen", "HAND"])
def test_non_chest_body_part_is_skipped(part: str) -> None:
    assert filters.check(header(body_part=part)) == f"body part {part.upper()} is not chest"


@pytest.mark.parametrize("part", ["CHEST", "THORAX", "Chest", "LUNG", "CHEST_PA", "PORT CHEST", ""])
def test_chest_like_body_parts_pass(part: str) -> None:
    assert filters.check(header(body_part=part)) is None


def test_dx_for_processing_is_skipped() -> None:
    ds = header(sop_class="1.2.840.10008.5.1.4.1.1.1.1.1", modality="DX", PresentationIntentType="FOR PROCESSING")
    assert filters.check(ds) == "DX for processing (raw detector data, not for presentation)"
    ds.PresentationIntentType = "FOR PRESENTATION"
    assert filters.check(ds) is None


@pytest.mark.parametrize(
    ("photometric", "reason"),
    [
        ("RGB", "not greyscale (RGB)"),
        ("YBR_FULL_422", "not greyscale (YBR_FULL_422)"),
        ("PALETTE COLOR", "not greyscale (PALETTE COLOR)"),
        (None, "not greyscale (no PhotometricInterpretation)"),
    ],
)
def test_colour_is_skipped(photometric: str | None, reason: str) -> None:
    assert filters.check(header(photometric=photometric)) == reason


def test_samples_per_pixel_must_be_one() -> None:
    reason = filters.check(header(samples=3))
    assert reason == "SamplesPerPixel 3 is not 1 (not single-channel greyscale)"


def test_first_failing_rule_wins() -> None:
    ds = header(modality="CT", view="LL", body_part="KNEE", photometric="RGB")
    assert filters.check(ds) == "modality CT is not CR or DX"
    ds.Modality = "CR"
    assert filters.check(ds) == "lateral view"
    ds.ViewPosition = "PA"
    assert filters.check(ds) == "body part KNEE is not chest"


@pytest.mark.shared
@pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"shared data not found at {DICOM_DIR.resolve()}")
def test_real_chest_dicoms_pass() -> None:
    files = sorted(DICOM_DIR.glob("*.dcm"))
    assert len(files) == 3
    for path in files:
        ds = pydicom.dcmread(path, force=True)
        assert filters.check(ds) is None, path.name


def test_own_result_objects_are_never_screened() -> None:
    """A Secondary Capture we produced, routed back by PACS, must not be screened again."""
    from support import SC_STORAGE, make_image

    sc = make_image(sop_class=SC_STORAGE, modality="OT", body_part=None)
    sc.StudyDescription = "CHEST PA"
    assert filters.check(sc) is None  # chest evidence alone would pass it
    sc.SeriesDescription = "AI triage - not for diagnosis"
    assert filters.check(sc) == "a cxr-triage result object, not a source image"
    cr = make_image()
    cr.Manufacturer = "cxr-triage"
    assert "result object" in filters.check(cr)


# ------------------------------------------------------------------ descriptions when Body Part Examined is empty (issue 19)


@pytest.mark.parametrize(
    ("attrs", "word"),
    [
        ({"StudyDescription": "XR HAND LEFT 2 VIEWS"}, "HAND (StudyDescription)"),
        ({"SeriesDescription": "Knee AP"}, "KNEE (SeriesDescription)"),
        ({"ProtocolName": "L-SPINE LAT"}, "L-SPINE (ProtocolName)"),
        ({"StudyDescription": "XR PELVIS 1 VIEW"}, "PELVIS (StudyDescription)"),
        ({"StudyDescription": "XR", "SeriesDescription": "ANKLE RIGHT"}, "ANKLE (SeriesDescription)"),
    ],
)
def test_empty_body_part_reads_the_descriptions(attrs: dict, word: str) -> None:
    for modality, sop_class in (("CR", CR), ("DX", DX)):
        reason = filters.check(header(sop_class=sop_class, modality=modality, body_part=None, **attrs))
        assert reason == f"body part {word} is not chest (Body Part Examined is empty)"


@pytest.mark.parametrize(
    "attrs",
    [
        {},  # no descriptions: passes as before (the tag is optional)
        {"StudyDescription": "XR PORTABLE"},  # names no body part
        {"StudyDescription": "XR CHEST AND ABDOMEN"},  # the chest is named too
        {"StudyDescription": "TRAUMA", "SeriesDescription": "Thorax AP", "ProtocolName": "SHOULDER"},
        {"StudyDescription": "HANDLING CHECK"},  # whole words only
    ],
)
def test_descriptions_without_other_anatomy_still_pass(attrs: dict) -> None:
    assert filters.check(header(modality="CR", body_part=None, **attrs)) is None


def test_a_body_part_that_is_set_wins_over_the_descriptions() -> None:
    assert filters.check(header(modality="CR", body_part="CHEST", StudyDescription="XR HAND")) is None
    assert filters.check(header(modality="CR", body_part="KNEE", StudyDescription="XR CHEST")) == "body part KNEE is not chest"
