"""worker/overlay.py: the heatmap Secondary Capture and its reference from the SR (issue 17).

Built the way tests/worker/test_results.py builds the banner SC: every object round-trips through
a file and is checked with dciodvfy (dicom3tools) for IOD errors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_results import REAL_FILES, dciodvfy_errors, load_real, make_result, roundtrip, source_image

from worker import overlay
from worker.results import LOCAL_SCHEME, build_sc, build_sr, result_uids

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _cams(size: int = 224) -> dict[str, np.ndarray]:
    """covid19 looks at the top-left, pneumonia at the bottom-right."""
    a = np.zeros((size, size), np.float32)
    a[16:80, 16:80] = 1.0
    b = np.zeros((size, size), np.float32)
    b[150:210, 150:210] = 1.0
    return {"covid19": a, "pneumonia": b}


def _reddish(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0].astype(int) - rgb[..., 2].astype(int) > 60) & (rgb[..., 0] > 120)


def test_heatmap_sc_header_pixels_and_dciodvfy(tmp_path: Path) -> None:
    src = source_image()
    result = make_result()
    sc = roundtrip(overlay.build_heatmap_sc(src, result, _cams()), tmp_path / "hm.dcm")
    assert dciodvfy_errors(tmp_path / "hm.dcm") == []
    series, instance = overlay.heatmap_uids(src.SOPInstanceUID, src.StudyInstanceUID, result.model_name, result.model_version)
    assert (sc.SOPClassUID, sc.SOPInstanceUID, sc.SeriesInstanceUID) == (SC_STORAGE, instance, series)
    assert sc.file_meta.MediaStorageSOPInstanceUID == instance
    banner = result_uids(src.SOPInstanceUID, src.StudyInstanceUID, result.model_name, result.model_version)
    assert instance not in (banner.sc_instance, banner.sr_instance) and series != banner.sc_series
    assert sc.StudyInstanceUID == src.StudyInstanceUID and sc.PatientID == src.PatientID
    assert sc.SeriesDescription == "AI heatmap - not for diagnosis" and sc.SeriesNumber == overlay.HEATMAP_SERIES_NUMBER
    assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.PlanarConfiguration) == (3, "RGB", 0)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    rgb = sc.pixel_array
    assert rgb.shape == (sc.Rows, sc.Columns, 3) and max(rgb.shape[:2]) <= overlay.MAX_SIDE
    # two panels side by side: the left (covid19) red at its top-left, the right (pneumonia) at its bottom-right
    red = _reddish(rgb)
    ys, xs = np.nonzero(red)
    assert red.sum() > 100
    mid = sc.Columns // 2
    left, right = xs < mid, xs >= mid
    assert left.any() and right.any()
    assert ys[left].mean() < ys[right].mean()  # top vs bottom
    # grey where there is no heat: R == G == B
    panel_top = rgb.shape[0] // 3
    assert (rgb[panel_top:, :, 0] == rgb[panel_top:, :, 2]).mean() > 0.5


def test_heatmap_sc_is_deterministic_and_one_panel_for_one_class() -> None:
    src = source_image()
    cams = {"covid19": _cams()["covid19"]}
    a, b = overlay.build_heatmap_sc(src, make_result(), cams), overlay.build_heatmap_sc(src, make_result(), cams)
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.PixelData == b.PixelData
    two = overlay.build_heatmap_sc(src, make_result(), _cams())
    assert two.Columns > a.Columns
    other = overlay.build_heatmap_sc(src, make_result(version="0.2.0"), cams)
    assert other.SOPInstanceUID != a.SOPInstanceUID
    with pytest.raises(ValueError, match="at least one heatmap"):
        overlay.build_heatmap_sc(src, make_result(), {})


def test_sr_references_the_heatmap_sc_and_stays_valid(tmp_path: Path) -> None:
    src = source_image()
    result = make_result()
    sc = overlay.build_heatmap_sc(src, result, _cams())
    plain = build_sr(src, result)
    sr = overlay.reference_in_sr(build_sr(src, result), sc)
    roundtrip(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []
    qual = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"][0]
    image = qual.ContentSequence[-1]
    assert (image.ValueType, image.RelationshipType) == ("IMAGE", "CONTAINS")
    assert image.ConceptNameCodeSequence[0].CodingSchemeDesignator == LOCAL_SCHEME
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    ev = sr.PertinentOtherEvidenceSequence[0]
    assert ev.StudyInstanceUID == src.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sc.SOPInstanceUID
    # the SR builder's cached container is not changed: the next SR has no heatmap reference
    again = build_sr(src, result)
    qual2 = [i for i in again.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"][0]
    assert len(qual2.ContentSequence) == len(qual.ContentSequence) - 1
    assert "PertinentOtherEvidenceSequence" not in plain


@pytest.mark.parametrize("name", REAL_FILES)
def test_heatmap_sc_of_real_chest_files_passes_dciodvfy(tmp_path: Path, name: str) -> None:
    src = load_real(name)
    sc = roundtrip(overlay.build_heatmap_sc(src, make_result(), _cams()), tmp_path / "hm.dcm")
    assert dciodvfy_errors(tmp_path / "hm.dcm") == []
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.LossyImageCompression == build_sc(src, make_result()).LossyImageCompression


def test_colourize_leaves_zero_attention_grey_and_tints_full_attention() -> None:
    grey = np.full((4, 4), 100, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    rgb = overlay.colourize(grey, heat)
    assert (rgb[1:, :] == 100).all()
    r, g, b = rgb[0, 0].tolist()
    assert r > 150 and b < 60  # red end of the scale
