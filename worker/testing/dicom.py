"""DICOM objects built in memory for tests and benchmarks: a CR/DX radiograph with any pixels,
bit depth and header (:func:`make_image`), its PS3.10 bytes, and JPEG 2000 codestreams that
real decoders refuse to reduce.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

def make_image(
    pixels: np.ndarray | None = None,
    *,
    rows: int = 256,
    cols: int = 200,
    bits: int = 16,
    stored: int | None = None,
    photometric: str = "MONOCHROME2",
    sop_class: str = CR_STORAGE,
    modality: str = "CR",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    patient_name: str = "Test^Patient",
    patient_id: str = "TEST-0001",
    seed: int = 0,
) -> Dataset:
    """A small greyscale radiograph with realistic header fields and file meta."""
    if pixels is None:
        rng = np.random.default_rng(seed)
        hi = (1 << (stored or bits)) - 1
        yy, xx = np.mgrid[0:rows, 0:cols]
        pixels = ((yy / rows) * 0.6 * hi + rng.integers(0, max(hi // 8, 1), (rows, cols))).astype(
            np.uint16 if bits == 16 else np.uint8
        )
    rows, cols = pixels.shape
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = "ACC0001"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20261126"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = (stored or bits) - 1
    ds.PixelRepresentation = 0
    if slope is not None or intercept is not None:
        ds.RescaleSlope = slope if slope is not None else 1
        ds.RescaleIntercept = intercept if intercept is not None else 0
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()

# ------------------------------------------------------------------ JPEG 2000 Pillow cannot reduce


def _marker_segments(cs: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset, length) of the main header's segments up to the first SOT."""
    out, i = [], 2
    while True:
        marker, length = cs[i + 1], int.from_bytes(cs[i + 2 : i + 4], "big")
        out.append((marker, i, length))
        if marker == 0x90:
            return out
        i += 2 + length


def tile_cod_codestream(pixels: np.ndarray, bits: int, *, lossy: bool) -> bytes:
    """A valid JPEG 2000 codestream whose main-header COD says 5 wavelet levels while the (only)
    tile's own COD, in its tile-part header, says 0 (ISO 15444-1 A.6.1: a tile-part COD overrides
    the main one).  ``lossy``: the reversible wavelet with its layers cut at 50 dB PSNR (PS3.5
    A.4.4 allows that for the lossy syntax).  OpenJPEG reads it in full; through Pillow it cannot reduce it
    ("broken data stream when reading image file"), the refusal the issue reports for two public files."""
    import pytest

    imagecodecs = pytest.importorskip("imagecodecs")
    cs = bytes(
        imagecodecs.jpeg2k_encode(
            pixels, level=50 if lossy else 0, codecformat="J2K", bitspersample=bits, reversible=True, resolutions=1
        )
    )
    segs = _marker_segments(cs)
    _, ci, cl = next(s for s in segs if s[0] == 0x52)
    cod = cs[ci : ci + 2 + cl]
    sot = segs[-1][1]
    # main COD: the same coding style with 5 levels and default precincts (no per-level sizes)
    main_cod = b"\xff\x52\x00\x0c" + bytes([cod[4] & 0xFE]) + cod[5:9] + b"\x05" + cod[10:14]
    main = cs[:ci] + main_cod + cs[ci + 2 + cl : sot]
    sot_seg = bytearray(cs[sot : sot + 12])
    psot = int.from_bytes(sot_seg[6:10], "big")
    if psot:
        sot_seg[6:10] = (psot + len(cod)).to_bytes(4, "big")
    return bytes(main) + bytes(sot_seg) + cod + cs[sot + 12 :]


def j2k_dataset(cs: bytes, pixels: np.ndarray, bits: int, ts: str) -> Dataset:
    """A CR image (make_image) whose Pixel Data is the one JPEG 2000 frame ``cs``."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000

    ds = make_image(pixels, stored=bits)
    ds.PixelData = encapsulate([cs])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(ts)
    if ts == JPEG2000:
        ds.LossyImageCompression = "01"
    return ds
