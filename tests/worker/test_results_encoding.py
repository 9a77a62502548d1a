"""worker.results.encoding: the SR's file encoding with shared, read-only, pre-encoded items.

The encoder must give exactly the bytes of pydicom's ``save_as(buf, enforce_file_format=True)``
of the same dataset, and of the highdicom-only reference builder's SR, for many sources and
results; a shared item must refuse every change; whatever the encoder does not handle itself
must still come out as pydicom writes it.
"""

from __future__ import annotations

import copy
import pickle
from datetime import datetime, timedelta, timezone
from io import BytesIO

import pydicom
import pytest
import support
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from worker import overlay
from worker.results import TriageResult, build_sc, build_sr, encode, sr_reference
from worker.results.encoding import EncodedItem, ReadOnlyItemError, freeze, is_frozen, walk_items

NOW = datetime(2026, 11, 26, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1)))
LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 37  # 64 characters, the UI maximum


def save_as(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def source(kind: str) -> Dataset:
    if kind == "mono1":
        ds = support.make_image(photometric="MONOCHROME1", patient_name="Doe^Jane")
    elif kind == "dx-manufacturer":
        ds = support.make_image(sop_class=support.DX_STORAGE, modality="DX", patient_name="Roe^Rick")
        ds.Manufacturer = "ACME Medical"
        ds.ManufacturerModelName = "DR-1"
        ds.StationName = "XR1"
    else:
        ds = support.make_image(patient_name="Sekret^Patientname", patient_id="PID-7F3A9")
    if kind in ("plain", "mono1", "dx-manufacturer", "latin1", "utf8"):
        ds.PatientOrientation = ["P", "F"]
        ds.ImagerPixelSpacing = [0.143, 0.143]
    if kind == "latin1":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"
        ds.StudyDescription = "Thorax p.a. Lunge, Überprüfung"
    elif kind == "utf8":
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = "山田^太郎=やまだ^たろう"
        ds.StudyDescription = "Brustkorb – Ödem? 胸部"
    elif kind == "long-uids-odd-values":
        ds.SOPInstanceUID = LONG_UID
        ds.StudyInstanceUID = "1.2.3.45"  # odd length
        ds.SeriesInstanceUID = LONG_UID[:-2] + "9"  # odd length
        ds.FrameOfReferenceUID = "1.2.3"
        ds.PatientID = "ODD"
        ds.AccessionNumber = "A1234"
        ds.StudyDescription = "XR CHEST PA 1 VIEW"[:-1]
        ds.PatientOrientation = ["A", "FL"]
        ds.ImagerPixelSpacing = [0.1, 0.15]
    return ds


def result(kind: str) -> TriageResult:
    base: dict[str, object] = dict(
        thresholds={"covid19": 0.5, "pneumonia": 0.5},
        model_name="cxr-hybrid",
        model_version="0.1.0",
        model_sha256="ab" * 32,
        model_precision="int8",
    )
    if kind == "normal":
        fields = dict(predicted_class="normal", probabilities={"normal": 0.8, "pneumonia": 0.1, "covid19": 0.1},
                      priority="routine", triage_reason="no thresholded class >= threshold")
    elif kind == "pneumonia-no-reason":
        fields = dict(predicted_class="pneumonia", probabilities={"normal": 0.1, "pneumonia": 0.8, "covid19": 0.1},
                      priority="urgent", triage_reason="")
    elif kind == "covid19-extremes":
        fields = dict(predicted_class="covid19", probabilities={"normal": 1e-7, "pneumonia": 0.0, "covid19": 1.0},
                      priority="urgent", triage_reason="P(covid19)=1.00 >= 0.50")
    elif kind == "other-model":
        fields = dict(predicted_class="tuberculosis", probabilities={"normal": 0.3, "tuberculosis": 0.7},
                      priority="routine", triage_reason="odd", thresholds={"tuberculosis": 0.5},
                      model_name="tb-net", model_version="2.0.0-rc1", model_sha256=None, model_precision="f16")
    else:
        raise AssertionError(kind)
    return TriageResult(**{**base, **fields})  # type: ignore[arg-type]


SOURCES = ["plain", "bare", "mono1", "dx-manufacturer", "latin1", "utf8", "long-uids-odd-values"]
RESULTS = ["normal", "pneumonia-no-reason", "covid19-extremes", "other-model"]


def heatmap_stand_in(src: Dataset) -> Dataset:
    """What reference_in_sr reads from a heatmap SC."""
    sc = Dataset()
    sc.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    sc.SOPInstanceUID = "2.25.12345678901234567890123456789"
    sc.SeriesInstanceUID = "2.25.98765432109876543210"
    sc.StudyInstanceUID = src.StudyInstanceUID
    return sc


@pytest.mark.parametrize("source_kind", SOURCES)
@pytest.mark.parametrize("result_kind", RESULTS)
def test_encoding_equals_pydicom_and_the_reference_builder(source_kind: str, result_kind: str) -> None:
    src, res = source(source_kind), result(result_kind)
    sr = build_sr(src, res, now=NOW)
    expected = save_as(sr_reference._build_sr_reference(src, res, now=NOW))
    assert save_as(sr) == expected
    assert encode(sr) == expected
    assert encode(build_sr(src, res, now=NOW)) == expected  # template and items from the caches
    assert encode(sr) == expected  # encoding twice: nothing was changed by the first


@pytest.mark.parametrize("source_kind", ["plain", "utf8", "long-uids-odd-values"])
def test_encoding_with_the_heatmap_reference(source_kind: str) -> None:
    src, res = source(source_kind), result("covid19-extremes")
    sc = heatmap_stand_in(src)
    sr = overlay.reference_in_sr(build_sr(src, res, now=NOW), sc)
    # highdicom's own content sequences take only its content items: its SR as plain pydicom
    ref = pydicom.dcmread(BytesIO(save_as(sr_reference._build_sr_reference(src, res, now=NOW))))
    ref = overlay.reference_in_sr(ref, sc)
    assert "PertinentOtherEvidenceSequence" in sr
    assert encode(sr) == save_as(sr) == save_as(ref)


def test_most_items_are_shared_pre_encoded_items() -> None:
    src, res = source("plain"), result("normal")
    one, two = build_sr(src, res, now=NOW), build_sr(src, res, now=NOW)
    items = list(walk_items(one))
    frozen = [i for i in items if is_frozen(i)]
    assert len(items) > 100 and len(frozen) > 0.7 * len(items)
    # the same objects in both SRs: shared, not copied
    assert [id(i) for i in frozen] == [id(i) for i in walk_items(two) if is_frozen(i)]


def test_a_shared_item_cannot_be_changed_silently() -> None:
    src, res = source("plain"), result("normal")
    sr = build_sr(src, res, now=NOW)
    expected = save_as(sr)
    item = sr.ContentSequence[0]
    assert isinstance(item, EncodedItem)
    code = item.ConceptNameCodeSequence[0]
    changes = [
        lambda: setattr(code, "CodeMeaning", "changed"),
        lambda: setattr(code, "is_undefined_length_sequence_item", True),
        lambda: code.__setitem__(0x00080104, DataElement(0x00080104, "LO", "changed")),
        lambda: code.__delitem__(0x00080104),
        lambda: delattr(code, "CodeMeaning"),
        lambda: setattr(code["CodeMeaning"], "value", "changed"),
        lambda: setattr(code["CodeMeaning"], "VR", "SH"),
        lambda: code.add_new(0x00080105, "CS", "X"),
        lambda: code.update({"CodeMeaning": "changed"}),
        lambda: code.clear(),
        lambda: code.pop(0x00080104),
        lambda: item.ConceptNameCodeSequence.append(Dataset()),
        lambda: item.ConceptNameCodeSequence.__setitem__(0, Dataset()),
        lambda: item.ConceptNameCodeSequence.__delitem__(0),
        lambda: item.ConceptNameCodeSequence.clear(),
        lambda: setattr(item.ConceptNameCodeSequence, "is_undefined_length", True),
        lambda: setattr(item["ConceptNameCodeSequence"], "is_undefined_length", True),
    ]
    for change in changes:
        with pytest.raises((ReadOnlyItemError, TypeError)):
            change()
    with pytest.raises(ReadOnlyItemError):
        code.CodeMeaning = "changed"
    assert save_as(sr) == encode(sr) == expected
    # Reading works as for any dataset.
    assert str(code.CodeMeaning) and "CodeMeaning" in code and code == copy.deepcopy(code)
    assert "Language" in str(sr)


def test_a_deep_copy_is_editable_and_encodes_as_pydicom_does() -> None:
    src, res = source("plain"), result("normal")
    sr = build_sr(src, res, now=NOW)
    editable = copy.deepcopy(sr)
    assert not any(is_frozen(i) for i in walk_items(editable))
    assert encode(editable) == save_as(sr)
    item = copy.deepcopy(sr.ContentSequence[0])
    item.ConceptNameCodeSequence[0].CodeMeaning = "Language of Content Item"
    sr.ContentSequence[0] = item
    assert encode(sr) == save_as(sr) != save_as(build_sr(src, res, now=NOW))
    again = pickle.loads(pickle.dumps(build_sr(src, res, now=NOW)))
    assert encode(again) == save_as(build_sr(src, res, now=NOW))


def test_a_pre_encoded_item_follows_the_character_set_of_its_sr() -> None:
    plain = Dataset()
    plain.CodeValue, plain.CodingSchemeDesignator, plain.CodeMeaning = "X1", "99TEST", "Größe"
    item = freeze(plain)
    assert is_frozen(item) and item == plain
    outs = {}
    for charset in (None, "ISO_IR 100", "ISO_IR 192", ["", "ISO 2022 IR 100"]):
        ds = build_sr(source("plain"), result("normal"), now=NOW)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.ConceptNameCodeSequence = [item]
        outs[str(charset)] = encode(ds)
        assert outs[str(charset)] == save_as(ds), charset
    assert "Größe".encode() in outs["ISO_IR 192"] and "Größe".encode("latin-1") in outs["ISO_IR 100"]


def test_what_is_not_frozen() -> None:
    multi = Dataset()
    multi.ImageType = ["ORIGINAL", "PRIMARY"]  # a MultiValue: mutable
    assert freeze(multi) is multi
    ambiguous = Dataset()
    ambiguous.add_new(0x00280106, "US or SS", 0)  # Smallest Image Pixel Value
    assert freeze(ambiguous) is ambiguous
    undefined = Dataset()
    undefined.CodeValue = "1"
    undefined.is_undefined_length_sequence_item = True
    assert freeze(undefined) is undefined
    with pytest.raises(TypeError):
        EncodedItem()


def test_what_the_encoder_leaves_to_pydicom_comes_out_as_pydicom_writes_it() -> None:
    src, res = source("latin1"), result("normal")
    sr = build_sr(src, res, now=NOW)
    expected = save_as(sr)
    # read back from a file: raw elements everywhere
    back = pydicom.dcmread(BytesIO(expected))
    assert encode(back) == save_as(back) == expected
    # undefined-length sequence and item, an ambiguous VR element, an empty sequence
    odd = build_sr(src, res, now=NOW)
    odd["ContentSequence"].is_undefined_length = True
    odd.ContentSequence[-1].is_undefined_length_sequence_item = True
    odd.ReferencedPerformedProcedureStepSequence = Sequence([])
    assert encode(odd) == save_as(odd)
    amb = build_sr(src, res, now=NOW)
    extra = Dataset()
    extra.add_new(0x00280106, "US or SS", 1)
    amb.ReferencedImageSequence = [extra]
    assert encode(amb) == save_as(amb)
    # another transfer syntax
    implicit = build_sr(src, res, now=NOW)
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    assert encode(implicit) == save_as(implicit)
    # a Secondary Capture (pixel data)
    sc = build_sc(source("plain"), res, now=NOW)
    assert encode(sc) == save_as(sc)
    # pydicom's own errors stay pydicom's
    bad = build_sr(src, res, now=NOW)
    bad.add_new(0x00020002, "UI", "1.2.3")
    with pytest.raises(ValueError, match="File Meta Information"):
        save_as(bad)
    with pytest.raises(ValueError, match="File Meta Information"):
        encode(bad)
