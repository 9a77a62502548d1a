"""worker.imaging: every grey-scale branch against known values, every transfer syntax against
its uncompressed original, every refusal with a readable reason, and the real chest DICOMs."""

from __future__ import annotations

import copy
import io
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from worker import imaging
from worker.imaging import PixelError, PreprocessSpec, codestream

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
DICOM_DIR = SHARED / "data" / "dicom"
PYDICOM_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def make_ds(
    pixels: np.ndarray,
    *,
    bits_allocated: int | None = None,
    bits_stored: int | None = None,
    signed: bool | None = None,
    photometric: str = "MONOCHROME2",
    pixel_bytes: bytes | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    **attrs: object,
) -> Dataset:
    """A CR image whose Pixel Data is ``pixels`` (or ``pixel_bytes`` verbatim)."""
    pixels = np.asarray(pixels)
    bits_allocated = bits_allocated or pixels.dtype.itemsize * 8
    signed = pixels.dtype.kind == "i" if signed is None else signed
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    for k, v in attrs.items():
        setattr(ds, k, v)
    if pixel_bytes is None:
        dt = f"<{'i' if signed else 'u'}{bits_allocated // 8}"
        pixel_bytes = pixels.astype(dt).tobytes()
        if len(pixel_bytes) % 2:
            pixel_bytes += b"\0"
    ds.PixelData = pixel_bytes
    return ds


def roundtrip(ds: Dataset, **write_args: object) -> Dataset:
    buf = io.BytesIO()
    if write_args:
        pydicom.dcmwrite(buf, ds, **write_args)
    else:
        ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf, force=True)


def half_up(y: float) -> int:
    return int(math.floor(min(max(y, 0.0), 255.0) + 0.5))


def ps33_linear(x: float, c: float, w: float) -> int:
    """PS3.3 C.11.2.1.2.1, written out independently of the module, ymin=0, ymax=255."""
    if x <= c - 0.5 - (w - 1) / 2:
        return 0
    if x > c - 0.5 + (w - 1) / 2:
        return 255
    return half_up(((x - (c - 0.5)) / (w - 1) + 0.5) * 255)


def grey(ds: Dataset, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    return imaging.to_grey8(ds, imaging.decode(ds, spec), spec)


def composed(ds: Dataset, spec: PreprocessSpec = PreprocessSpec()) -> np.ndarray:
    return imaging.grey_to_input(imaging.to_grey8(ds, imaging.decode(ds, spec), spec), spec)


def ramp12(rows: int = 64, cols: int = 48) -> np.ndarray:
    return ((np.arange(rows * cols).reshape(rows, cols) * 37) % 4096).astype(np.uint16)


def norm(v: int | np.ndarray, c: int, mean=MEAN, std=STD) -> np.ndarray:
    return np.float32((np.asarray(v, dtype=np.float64) / 255.0 - mean[c]) / std[c])


# ------------------------------------------------------------------------------------------
# PreprocessSpec
# ------------------------------------------------------------------------------------------


def test_spec_from_card_reads_every_key() -> None:
    card = {
        "input": {"size": [256, 192], "channels": 1, "mean": [0.5], "std": [0.25], "layout": "NCHW"},
        "preprocessing": {"voi": "minmax", "percentiles": [1, 99], "crop": "none"},
    }
    spec = PreprocessSpec.from_card(card)
    assert spec == PreprocessSpec(
        size=(256, 192), channels=1, mean=(0.5,), std=(0.25,), voi="minmax", percentiles=(1.0, 99.0), crop="none"
    )
    hash(spec)  # frozen, tuples: usable as a cache key


def test_spec_from_card_missing_keys_take_defaults() -> None:
    assert PreprocessSpec.from_card({}) == PreprocessSpec()
    assert PreprocessSpec.from_card({"input": {"size": [224, 224]}, "preprocessing": {}}) == PreprocessSpec()


def test_spec_constructor_normalises_lists_to_tuples() -> None:
    spec = PreprocessSpec(size=[10, 12], mean=[0.5, 0.5, 0.5], percentiles=[2, 98])  # type: ignore[arg-type]
    assert spec.size == (10, 12) and spec.mean == (0.5, 0.5, 0.5) and spec.percentiles == (2.0, 98.0)
    hash(spec)


@pytest.mark.parametrize(
    ("card", "key"),
    [
        ({"input": {"size": [224]}}, "input.size"),
        ({"input": {"size": [0, 224]}}, "input.size"),
        ({"input": {"size": "224"}}, "input.size"),
        ({"input": {"size": [224.0, 224]}}, "input.size"),
        ({"input": {"channels": 0}}, "input.channels"),
        ({"input": {"mean": [0.1, 0.2]}}, "input.mean"),
        ({"input": {"std": [0.2, 0.0, 0.2]}}, "input.std"),
        ({"input": {"layout": "NHWC"}}, "input.layout"),
        ({"input": [224, 224]}, "input"),
        ({"preprocessing": {"voi": "window"}}, "preprocessing.voi"),
        ({"preprocessing": {"percentiles": [99, 1]}}, "preprocessing.percentiles"),
        ({"preprocessing": {"percentiles": [0, 101]}}, "preprocessing.percentiles"),
        ({"preprocessing": {"crop": "pad"}}, "preprocessing.crop"),
    ],
)
def test_spec_from_card_bad_values_name_the_key(card: dict, key: str) -> None:
    with pytest.raises(ValueError, match=rf"model card {key}\b"):
        PreprocessSpec.from_card(card)


# ------------------------------------------------------------------------------------------
# decode: native data
# ------------------------------------------------------------------------------------------


def test_decode_native_16bit_unsigned() -> None:
    px = ramp12()
    out = imaging.decode(make_ds(px, bits_stored=12))
    assert out.dtype == np.uint16 and out.shape == px.shape
    np.testing.assert_array_equal(out, px)


def test_decode_masks_garbage_above_bits_stored() -> None:
    px = ramp12()
    dirty = px | np.uint16(0xA000)  # overlay/garbage bits above BitsStored (PS3.5 8.1.1)
    ds = make_ds(dirty, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    np.testing.assert_array_equal(imaging.decode(ds), px)
    clean = make_ds(px, bits_stored=12, WindowCenter=2048, WindowWidth=4096)
    np.testing.assert_array_equal(grey(ds), grey(clean))
    np.testing.assert_array_equal(imaging.preprocess(ds), imaging.preprocess(clean))
    # minmax path as well (statistics must ignore the garbage bits)
    del ds.WindowCenter, ds.WindowWidth, clean.WindowCenter, clean.WindowWidth
    np.testing.assert_array_equal(imaging.preprocess(ds), imaging.preprocess(clean))


def test_decode_signed_16bit() -> None:
    px = np.array([[-1000, 0, 1000], [-32768, 32767, -1]], dtype=np.int16)
    out = imaging.decode(make_ds(px))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, px)


def test_decode_signed_12bit_sign_extends_and_drops_garbage() -> None:
    px = np.array([[-2048, -5, 0], [5, 2047, -1]], dtype=np.int16)
    words = (px.astype(np.int32) & 0x0FFF) | 0x5000  # 12-bit two's complement + garbage high bits
    ds = make_ds(px, bits_stored=12, pixel_bytes=words.astype("<u2").tobytes())
    out = imaging.decode(ds)
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, px)


def test_decode_8bit_odd_length_with_padding_byte() -> None:
    px = np.arange(15, dtype=np.uint8).reshape(3, 5) * 17
    ds = make_ds(px)
    assert len(ds.PixelData) == 16  # 15 + pad byte
    np.testing.assert_array_equal(imaging.decode(ds), px)


def test_decode_multiframe_returns_first_frame() -> None:
    frames = np.stack([ramp12(8, 6), ramp12(8, 6)[::-1]])
    ds = make_ds(frames[0], bits_stored=12, pixel_bytes=frames.astype("<u2").tobytes(), NumberOfFrames=2)
    np.testing.assert_array_equal(imaging.decode(ds), frames[0])


def test_decode_file_without_meta_implicit_vr() -> None:
    px = ramp12()
    ds = make_ds(px, bits_stored=12)
    ds.file_meta = FileMetaDataset()
    back = roundtrip(ds, implicit_vr=True, little_endian=True)
    assert not back.file_meta.get("TransferSyntaxUID")
    np.testing.assert_array_equal(imaging.decode(back), px)


def test_decode_deflated_explicit_vr_le() -> None:
    px = ramp12()
    ds = make_ds(px, bits_stored=12, transfer_syntax=DeflatedExplicitVRLittleEndian)
    back = roundtrip(ds)
    assert back.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(imaging.decode(back), px)


def test_decode_explicit_vr_big_endian() -> None:
    px = ramp12() | np.uint16(0x3000)  # garbage high bits too
    ds = make_ds(px, bits_stored=12, transfer_syntax=ExplicitVRBigEndian, pixel_bytes=px.astype(">u2").tobytes())
    back = roundtrip(ds)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    np.testing.assert_array_equal(imaging.decode(back), ramp12())


# ------------------------------------------------------------------------------------------
# decode: compressed transfer syntaxes, lossless ones must give the original pixels
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
@pytest.mark.parametrize("kind", ["u12", "s16", "u8"])
def test_pydicom_lossless_compression_decodes_to_original(ts: str, kind: str) -> None:
    if kind == "u12":
        px, ds = ramp12(), make_ds(ramp12(), bits_stored=12, WindowCenter=1500, WindowWidth=3000)
    elif kind == "s16":
        px = (ramp12().astype(np.int16) - 2000) * 3
        ds = make_ds(px, RescaleSlope=1, RescaleIntercept=0)
    else:
        px = (ramp12() % 256).astype(np.uint8)
        ds = make_ds(px)
    original = copy.deepcopy(ds)
    ds.compress(ts)
    assert ds.file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(imaging.decode(ds), px)
    np.testing.assert_array_equal(imaging.preprocess(ds), imaging.preprocess(original))


def _dcmcjpeg(tmp_path: Path, ds: Dataset, option: str) -> Dataset:
    src, dst = tmp_path / "in.dcm", tmp_path / f"out{option}.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run(["dcmcjpeg", option, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return pydicom.dcmread(dst)


needs_dcmcjpeg = pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk dcmcjpeg not on PATH")


@pytest.mark.dcmtk
@needs_dcmcjpeg
@pytest.mark.parametrize(
    ("option", "ts"),
    [("+e1", "1.2.840.10008.1.2.4.70"), ("+el", "1.2.840.10008.1.2.4.57")],
    ids=["lossless-sv1", "lossless-process14"],
)
def test_dcmtk_jpeg_lossless_decodes_to_original(tmp_path: Path, option: str, ts: str) -> None:
    px = ramp12()
    ds = make_ds(px, bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    out = _dcmcjpeg(tmp_path, ds, option)
    assert out.file_meta.TransferSyntaxUID == ts
    np.testing.assert_array_equal(imaging.decode(out), px)
    np.testing.assert_array_equal(imaging.preprocess(out), imaging.preprocess(ds))


@pytest.mark.dcmtk
@needs_dcmcjpeg
@pytest.mark.parametrize(
    ("option", "ts", "kind"),
    [("+eb", JPEGBaseline8Bit, "u8"), ("+ee", "1.2.840.10008.1.2.4.51", "u12")],
    ids=["baseline", "extended-12bit"],
)
def test_dcmtk_jpeg_lossy_decodes_close_to_original(tmp_path: Path, option: str, ts: str, kind: str) -> None:
    yy, xx = np.mgrid[0:64, 0:48]
    if kind == "u8":
        px = (yy * 3 + xx).astype(np.uint8)  # smooth: JPEG at quality 90 is near-exact
        ds, tol = make_ds(px), 3
    else:
        px = (yy * 40 + xx * 10).astype(np.uint16)
        ds, tol = make_ds(px, bits_stored=12), 40
    out = _dcmcjpeg(tmp_path, ds, option)
    assert out.file_meta.TransferSyntaxUID == ts
    got = imaging.decode(out)
    assert got.shape == px.shape
    assert np.abs(got.astype(np.int32) - px.astype(np.int32)).mean() < tol


MR_SMALL_SAME_PIXELS = [
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_implicit.dcm",
]


@pytest.mark.parametrize("name", MR_SMALL_SAME_PIXELS)
def test_pydicom_bundled_files_decode_like_the_uncompressed_original(name: str) -> None:
    if not (PYDICOM_FILES / name).exists():
        pytest.skip(f"pydicom test file {name} not bundled with this pydicom")
    ref = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")  # signed 16-bit, explicit VR LE
    other = pydicom.dcmread(PYDICOM_FILES / name)
    expected = imaging.decode(ref)
    assert expected.dtype == np.int16
    np.testing.assert_array_equal(expected, ref.pixel_array)
    np.testing.assert_array_equal(imaging.decode(other), expected)


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm", "image_dfl.dcm"])
def test_pydicom_bundled_files_match_pydicom(name: str) -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / name)
    ref = ds.pixel_array
    ref = ref[0] if ref.ndim == 3 else ref
    np.testing.assert_array_equal(imaging.decode(ds), ref)


def test_pydicom_bundled_padded_and_truncated_files_are_refused() -> None:
    # MR_small_padded has 128 bytes past the image: our rule is "at most one pad byte".
    with pytest.raises(PixelError, match="too long"):
        imaging.decode(pydicom.dcmread(PYDICOM_FILES / "MR_small_padded.dcm"))
    with pytest.raises(PixelError, match="truncated"):
        imaging.decode(pydicom.dcmread(PYDICOM_FILES / "MR_truncated.dcm"))


# ------------------------------------------------------------------------------------------
# decode: refusals
# ------------------------------------------------------------------------------------------


def test_truncated_native_pixel_data() -> None:
    ds = make_ds(ramp12())
    ds.PixelData = ds.PixelData[:-100]
    with pytest.raises(PixelError, match=r"truncated: 6044 bytes, expected 6144"):
        imaging.decode(ds)


def test_too_long_native_pixel_data() -> None:
    ds = make_ds(ramp12())
    ds.PixelData = ds.PixelData * 2  # pydicom alone would read this as 2 frames
    with pytest.raises(PixelError, match="too long"):
        imaging.decode(ds)
    with pytest.raises(PixelError, match="too long"):
        imaging.preprocess(ds)


@pytest.mark.parametrize(("rows", "cols"), [(0, 0), (0, 10), (10, 0), (None, 10)])
def test_empty_or_missing_size(rows: int | None, cols: int) -> None:
    ds = make_ds(np.zeros((2, 2), np.uint16))
    if rows is None:
        del ds.Rows
    else:
        ds.Rows = rows
    ds.Columns = cols
    with pytest.raises(PixelError, match="empty or missing"):
        imaging.decode(ds)


def test_huge_declared_size_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = make_ds(np.zeros((4, 4), np.uint16))
    ds.Rows = ds.Columns = 65535
    enc = make_ds(ramp12())
    enc.compress(RLELossless)
    enc.Rows = enc.Columns = 65535
    monkeypatch.setattr(np, "frombuffer", lambda *a, **k: pytest.fail("decoded before the size check"))
    with pytest.raises(PixelError, match=r"exceeds the limit of 536870912 bytes"):
        imaging.decode(ds)
    # encapsulated: the decoder must not even be looked up
    import pydicom.pixels.decoders.base as base

    monkeypatch.setattr(base, "get_decoder", lambda uid: pytest.fail("decoder called before the size check"))
    with pytest.raises(PixelError, match="exceeds the limit"):
        imaging.preprocess(enc)


def test_max_bytes_follows_the_spec() -> None:
    ds = make_ds(ramp12())  # 64*48*2 = 6144 bytes
    imaging.decode(ds, PreprocessSpec(max_bytes=6144))
    with pytest.raises(PixelError, match="6144 bytes"):
        imaging.decode(ds, PreprocessSpec(max_bytes=6143))


def test_rgb_is_refused() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    ds = make_ds(rgb[..., 0], photometric="RGB", pixel_bytes=rgb.tobytes())
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    with pytest.raises(PixelError, match="SamplesPerPixel is 3"):
        imaging.decode(ds)
    # single-sample but not MONOCHROME (e.g. PALETTE COLOR): decoded, then refused by to_grey8
    pal = make_ds(np.zeros((4, 4), np.uint8), photometric="PALETTE COLOR")
    with pytest.raises(PixelError, match=r"not greyscale \(PALETTE COLOR\)"):
        imaging.preprocess(pal)


@pytest.mark.parametrize("ts", [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit], ids=lambda u: u.name)
def test_corrupt_encapsulated_fragment(ts: str) -> None:
    ds = make_ds(np.zeros((16, 16), np.uint8), transfer_syntax=ts)
    ds.PixelData = encapsulate([bytes(range(7, 207))])
    ds["PixelData"].VR = "OB"
    with pytest.raises(PixelError, match=rf"could not decode {re.escape(ts.name)}|decoded image has shape"):
        imaging.decode(ds)


@pytest.mark.parametrize(
    ("uid", "reason"),
    [("1.2.840.10008.1.2.4.100", "no decoder|unsupported"), ("1.2.3.4.5", "unsupported transfer syntax")],
)
def test_unsupported_transfer_syntax(uid: str, reason: str) -> None:
    ds = make_ds(ramp12(), transfer_syntax=uid)
    with pytest.raises(PixelError, match=reason):
        imaging.decode(ds)


def test_no_pixel_data_float_data_and_bits_allocated_32() -> None:
    ds = make_ds(ramp12())
    del ds.PixelData
    with pytest.raises(PixelError, match="no pixel data"):
        imaging.decode(ds)
    ds.FloatPixelData = np.zeros(64 * 48, np.float32).tobytes()
    with pytest.raises(PixelError, match="float pixel data is not supported"):
        imaging.decode(ds)
    px32 = make_ds(np.zeros((2, 2), np.uint32))
    with pytest.raises(PixelError, match="BitsAllocated 32 is not supported"):
        imaging.decode(px32)


def test_pixel_error_is_a_value_error() -> None:
    assert issubclass(PixelError, ValueError)


# ------------------------------------------------------------------------------------------
# to_grey8: modality LUT, VOI, MONOCHROME1
# ------------------------------------------------------------------------------------------


def test_window_linear_exact_values() -> None:
    # c=100, w=21: lower edge 89.5, upper edge 109.5 (PS3.3 C.11.2.1.2.1)
    x = np.array([[0, 89, 90, 99, 100, 109, 110, 4000]], dtype=np.uint16)
    g = grey(make_ds(x, WindowCenter=100, WindowWidth=21))
    np.testing.assert_array_equal(g, [[0, 0, 6, 121, 134, 249, 255, 255]])
    assert [ps33_linear(v, 100, 21) for v in x[0].tolist()] == g[0].tolist()


def test_window_width_one_is_a_step() -> None:
    x = np.array([[99, 100, 101]], dtype=np.uint16)
    np.testing.assert_array_equal(grey(make_ds(x, WindowCenter=100, WindowWidth=1)), [[0, 255, 255]])


def test_window_uses_the_first_of_several_values() -> None:
    x = np.array([[89, 90, 100, 110]], dtype=np.uint16)
    ds = make_ds(x, WindowCenter=[100, 1000], WindowWidth=[21, 500])
    np.testing.assert_array_equal(grey(ds), [[0, 6, 134, 255]])


def test_window_after_rescale_slope_intercept() -> None:
    stored = np.arange(0, 200, 7, dtype=np.uint16).reshape(1, -1)
    ds = make_ds(stored, RescaleSlope=2.5, RescaleIntercept=-100, WindowCenter=150, WindowWidth=301)
    expected = [ps33_linear(2.5 * s - 100, 150, 301) for s in stored[0].tolist()]
    np.testing.assert_array_equal(grey(ds)[0], expected)
    assert grey(ds)[0, 0] == 0 and grey(ds)[0, -1] == 255


def test_voi_lut_function_linear_exact_and_sigmoid() -> None:
    x = np.array([[90, 95, 100, 110, 111]], dtype=np.uint16)
    exact = grey(make_ds(x, WindowCenter=100, WindowWidth=20, VOILUTFunction="LINEAR_EXACT"))
    np.testing.assert_array_equal(exact, [[0, 64, 128, 255, 255]])  # ((x-c)/w + 0.5) * 255
    sig = grey(make_ds(x, WindowCenter=100, WindowWidth=20, VOILUTFunction="SIGMOID"))
    expected = [half_up(255 / (1 + math.exp(-4 * (v - 100) / 20))) for v in x[0].tolist()]
    assert expected == [30, 69, 128, 225, 230]  # 255/(1+e^2)=30.40, ..., 255/(1+e^-2.2)=229.56
    np.testing.assert_array_equal(sig[0], expected)


def test_invalid_window_falls_back_to_minmax() -> None:
    x = np.arange(100, dtype=np.uint16).reshape(10, 10) * 10
    bad = make_ds(x, WindowCenter=100, WindowWidth=0)
    np.testing.assert_array_equal(grey(bad), grey(make_ds(x)))


def _lut_item(descriptor: list[int], data: list[int]) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.LUTData = data
    return item


def test_voi_lut_sequence_values_and_precedence() -> None:
    x = np.array([[0, 10, 11, 12, 13, 20]], dtype=np.uint16)
    ds = make_ds(x, WindowCenter=5, WindowWidth=2)  # must be ignored: the VOI LUT comes first
    ds.VOILUTSequence = Sequence([_lut_item([4, 10, 8], [0, 50, 100, 255])])
    np.testing.assert_array_equal(grey(ds), [[0, 0, 50, 100, 255, 255]])
    # 12-bit entries are scaled by 255 / 4095
    ds.VOILUTSequence = Sequence([_lut_item([3, 10, 12], [0, 2048, 4095])])
    np.testing.assert_array_equal(grey(ds), [[0, 0, 128, 255, 255, 255]])
    # voi="minmax" ignores header VOI altogether
    mm = grey(ds, PreprocessSpec(voi="minmax", percentiles=(0, 100)))
    np.testing.assert_array_equal(mm, [[0, 128, 140, 153, 166, 255]])


def test_voi_lut_sequence_after_file_roundtrip() -> None:
    x = np.array([[0, 10, 11, 12, 13, 20]], dtype=np.uint16)
    ds = make_ds(x)
    item = Dataset()
    item.LUTDescriptor = [4, 10, 8]
    item.add_new(0x00283006, "OW", np.array([0, 50, 100, 255], "<u2").tobytes())  # LUTData as OW words
    ds.VOILUTSequence = Sequence([item])
    back = roundtrip(ds)
    assert isinstance(back.VOILUTSequence[0].LUTData, bytes)
    np.testing.assert_array_equal(grey(back), [[0, 0, 50, 100, 255, 255]])


def test_modality_lut_sequence_replaces_rescale() -> None:
    x = np.array([[0, 1, 2, 3, 9]], dtype=np.uint16)
    ds = make_ds(x, RescaleSlope=100, RescaleIntercept=5, WindowCenter=250, WindowWidth=300, VOILUTFunction="LINEAR_EXACT")
    ds.ModalityLUTSequence = Sequence([_lut_item([4, 0, 16], [100, 200, 300, 400])])
    # modality out: 100, 200, 300, 400, 400 (clamped to the last entry)
    np.testing.assert_array_equal(grey(ds), [[0, 85, 170, 255, 255]])


def test_robust_minmax_known_values() -> None:
    x = np.arange(10000, dtype=np.uint16).reshape(100, 100)
    g = grey(make_ds(x))
    lo, hi = np.percentile(x, [0.5, 99.5], method="inverted_cdf")
    assert (lo, hi) == (49, 9949)
    expected = np.floor(np.clip((x - 49.0) * 255.0 / 9900.0, 0, 255) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(g, expected)
    assert g[0, 0] == 0 and g[0, 49] == 0 and g[49, 99] == 128 and g[99, 49] == 255


def test_robust_minmax_ignores_outliers_and_padding() -> None:
    x = np.full((100, 100), 1000, dtype=np.uint16)
    x[:, 50:] = 2000
    x[0, :10] = 65535  # 0.1% hot pixels: beyond the 99.5th percentile
    g = grey(make_ds(x))
    assert g[50, 0] == 0 and g[50, 99] == 255 and g[0, 0] == 255
    # Pixel Padding Value is excluded from the statistics (PS3.3 C.7.5.1.1.2)
    x2 = x.copy()
    x2[:, :50] = 0
    x2[:, 50:] = np.tile(np.arange(1000, 1050, dtype=np.uint16), (100, 1))
    padded = make_ds(x2, PixelPaddingValue=0)
    g2 = grey(padded)
    assert g2[50, 50] == 0 and g2[50, 99] == 255  # contrast spread over the real values only
    assert grey(make_ds(x2))[50, 50] > 200  # without the tag, 0 would be the low bound


def test_flat_images_give_zeros_not_nan() -> None:
    for photometric in ("MONOCHROME1", "MONOCHROME2"):
        ds = make_ds(np.full((40, 30), 1234, np.uint16), photometric=photometric)
        g = grey(ds)
        assert g.dtype == np.uint8 and not g.any()
        x = imaging.preprocess(ds)
        assert np.isfinite(x).all()
        np.testing.assert_array_equal(x[1], np.full((224, 224), norm(0, 1)))


def test_monochrome1_is_inverted() -> None:
    x = np.array([[0, 100, 4095]], dtype=np.uint16)
    m2 = grey(make_ds(x, bits_stored=12, WindowCenter=2048, WindowWidth=4096))
    m1 = grey(make_ds(x, bits_stored=12, WindowCenter=2048, WindowWidth=4096, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m2, [[0, 6, 255]])
    np.testing.assert_array_equal(m1, [[255, 249, 0]])  # the bright stored value becomes dark
    big = (ramp12() % 4000).astype(np.uint16)
    np.testing.assert_array_equal(
        grey(make_ds(big, photometric="MONOCHROME1")), 255 - grey(make_ds(big, photometric="MONOCHROME2"))
    )


def test_signed_data_window() -> None:
    x = np.array([[-1000, -500, 0, 500, 1000]], dtype=np.int16)
    ds = make_ds(x, WindowCenter=0, WindowWidth=1001)
    expected = [ps33_linear(v, 0, 1001) for v in x[0].tolist()]
    assert expected == [0, 0, 128, 255, 255]
    np.testing.assert_array_equal(grey(ds)[0], expected)
    ds2 = make_ds(x, WindowCenter=0, WindowWidth=2001)
    np.testing.assert_array_equal(grey(ds2)[0], [ps33_linear(v, 0, 2001) for v in x[0].tolist()])


def test_8bit_without_voi_is_kept_as_grey_levels() -> None:
    """8-bit data with no VOI are already display values (like the training PNGs)."""
    x = np.array([[10, 50, 90, 130]], dtype=np.uint8)
    np.testing.assert_array_equal(grey(make_ds(x)), x)
    np.testing.assert_array_equal(grey(make_ds(x, photometric="MONOCHROME1")), 255 - x)
    stretched = grey(make_ds(x), PreprocessSpec(voi="minmax", percentiles=(0, 100)))
    np.testing.assert_array_equal(stretched, [[0, 85, 170, 255]])


def test_missing_photometric_is_refused() -> None:
    ds = make_ds(ramp12())
    del ds.PhotometricInterpretation
    with pytest.raises(PixelError, match="not greyscale"):
        grey(ds)


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_ds(ramp12(), bits_stored=12, WindowCenter=1500, WindowWidth=2000),
        lambda: make_ds(ramp12(), bits_stored=12, photometric="MONOCHROME1"),
        lambda: make_ds((ramp12().astype(np.int16) - 2048), bits_stored=12, RescaleSlope=0.5, RescaleIntercept=3),
        lambda: make_ds((ramp12() % 256).astype(np.uint8), WindowCenter=128, WindowWidth=100, VOILUTFunction="SIGMOID"),
        lambda: make_ds((ramp12() % 256).astype(np.uint8)),
    ],
)
def test_lookup_table_and_elementwise_paths_agree(make) -> None:
    ds = make()
    stored = imaging.decode(ds)
    np.testing.assert_array_equal(imaging.to_grey8(ds, stored.astype(np.int32)), imaging.to_grey8(ds, stored))
    np.testing.assert_array_equal(imaging.to_grey8(ds, stored.astype(np.float64)), imaging.to_grey8(ds, stored))


# ------------------------------------------------------------------------------------------
# grey_to_input: crop, resize, normalise, replicate
# ------------------------------------------------------------------------------------------


def test_constant_image_gives_exact_normalised_value() -> None:
    out = imaging.grey_to_input(np.full((300, 500), 77, np.uint8))
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    for c in range(3):
        expected = np.float32((77 / 255 - MEAN[c]) / STD[c])
        assert np.all(out[c] == expected)


def test_centre_square_crop_keeps_the_middle() -> None:
    wide = np.zeros((100, 300), np.uint8)
    wide[:, 100:200] = 200  # exactly the centre square
    out = imaging.grey_to_input(wide)
    assert np.all(out[0] == norm(200, 0))
    tall = wide.T.copy()
    assert np.all(imaging.grey_to_input(tall)[2] == norm(200, 2))
    squashed = imaging.grey_to_input(wide, PreprocessSpec(crop="none"))
    assert squashed[0, :, 0].max() == norm(0, 0) and squashed[0, :, 112].min() == norm(200, 0)


def test_resize_is_pillow_bilinear_with_reducing_gap() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (1000, 1000), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BILINEAR, reducing_gap=2.0))
    out = imaging.grey_to_input(img)
    for c in range(3):
        np.testing.assert_array_equal(out[c], norm(expected, c))
    # a step edge stays a step away from the border region
    half = np.zeros((448, 448), np.uint8)
    half[:, 224:] = 200
    step = imaging.grey_to_input(half)[0]
    assert np.all(step[:, :100] == norm(0, 0)) and np.all(step[:, 124:] == norm(200, 0))


def test_image_of_target_size_is_not_resampled() -> None:
    img = np.random.default_rng(2).integers(0, 256, (224, 224), dtype=np.uint8)
    out = imaging.grey_to_input(img)
    np.testing.assert_array_equal(out[1], norm(img, 1))


def test_channel_replication_and_custom_size() -> None:
    img = np.random.default_rng(3).integers(0, 256, (64, 64), dtype=np.uint8)
    spec = PreprocessSpec(size=(32, 48), mean=(0.5,), std=(0.25,))
    out = imaging.grey_to_input(img, spec)
    assert out.shape == (3, 32, 48)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    one = imaging.grey_to_input(img, PreprocessSpec(channels=1, mean=(0.5,), std=(0.25,)))
    assert one.shape == (1, 224, 224)


def test_grey_to_input_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        imaging.grey_to_input(np.zeros((10, 10), np.uint16))
    with pytest.raises(ValueError, match="2-D uint8"):
        imaging.grey_to_input(np.zeros((10, 10, 3), np.uint8))


# ------------------------------------------------------------------------------------------
# preprocess == the composition of the public steps
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", ["center_square", "none"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: make_ds(ramp12(600, 400) | np.uint16(0x8000), bits_stored=12),
        lambda: make_ds(ramp12(300, 700), bits_stored=12, WindowCenter=1000, WindowWidth=800, photometric="MONOCHROME1"),
        lambda: make_ds(ramp12(301, 299).astype(np.int16) - 2048, RescaleSlope=2, RescaleIntercept=-7),
        lambda: make_ds((ramp12(257, 255) % 256).astype(np.uint8)),
    ],
)
def test_preprocess_equals_composition(make, crop: str) -> None:
    ds = make()
    spec = PreprocessSpec(crop=crop)
    fast = imaging.preprocess(ds, spec)
    assert fast.shape == (3, 224, 224) and fast.dtype == np.float32
    np.testing.assert_array_equal(fast, composed(ds, spec))
    enc = copy.deepcopy(ds)
    enc.compress(RLELossless)
    np.testing.assert_array_equal(imaging.preprocess(enc, spec), fast)


def test_large_image_uses_a_subsample_for_statistics() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(2000, 300, (2000, 1500)).clip(0, 4095).astype(np.uint16)
    ds = make_ds(x, bits_stored=12)
    g = grey(ds)
    lo, hi = np.percentile(x, [0.5, 99.5])
    # the subsampled bounds are close to the exact ones
    assert g[x <= lo - 30].max(initial=0) == 0
    assert int(g[x >= hi + 30].min(initial=255)) == 255
    np.testing.assert_array_equal(imaging.preprocess(ds), composed(ds))


# ------------------------------------------------------------------------------------------
# image files (training) and PNG/DICOM parity
# ------------------------------------------------------------------------------------------


def test_load_png_8bit_equals_dicom_8bit(tmp_path: Path) -> None:
    """A training PNG and an 8-bit DICOM SC of the same pixels give identical tensors."""
    px = np.random.default_rng(5).integers(0, 256, (256, 256), dtype=np.uint8)
    Image.fromarray(px).save(tmp_path / "x.png")
    from_png = imaging.load_image_file(tmp_path / "x.png")
    from_dicom = imaging.preprocess(make_ds(px))
    np.testing.assert_array_equal(from_png, from_dicom)
    np.testing.assert_array_equal(from_png, imaging.grey_to_input(px))


def test_load_png_16bit_min_max(tmp_path: Path) -> None:
    px = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(px).save(tmp_path / "x16.png")
    expected_grey = np.array([[0, 64], [128, 255]], dtype=np.uint8)  # (x-1000)/4000*255, half up
    out = imaging.load_image_file(tmp_path / "x16.png", PreprocessSpec(size=(2, 2)))
    np.testing.assert_array_equal(out, imaging.grey_to_input(expected_grey, PreprocessSpec(size=(2, 2))))


def test_load_rgb_png_and_jpeg(tmp_path: Path) -> None:
    rgb = np.zeros((50, 50, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    out = imaging.load_image_file(tmp_path / "c.png")
    level = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)  # Pillow's L = ITU-R 601-2 luma
    assert np.all(out[0] == norm(level, 0))
    Image.fromarray(np.full((60, 80), 120, np.uint8)).save(tmp_path / "g.jpg", quality=95)
    jpg = imaging.load_image_file(tmp_path / "g.jpg")
    assert np.allclose(jpg[0], norm(120, 0), atol=2 / 255 / STD[0])


# ------------------------------------------------------------------------------------------
# real chest DICOMs from ../shared
# ------------------------------------------------------------------------------------------


def _shared_files() -> list[Path]:
    if not DICOM_DIR.is_dir():
        return []
    return sorted(DICOM_DIR.glob("*.dcm"))


@pytest.mark.shared
@pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"shared data not found at {DICOM_DIR.resolve()}")
@pytest.mark.parametrize("path", _shared_files() or [None], ids=lambda p: p.name[:12] if p else "none")
def test_real_chest_dicoms_preprocess(path: Path | None) -> None:
    assert path is not None, "no .dcm files in the shared DICOM folder"
    ds = pydicom.dcmread(path, force=True)
    x = imaging.preprocess(ds)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and np.isfinite(x).all()
    np.testing.assert_array_equal(x, composed(ds))
    g = grey(ds)
    assert g.std() > 20  # a real image, not a flat or saturated one
    # bone is bright: the image centre (mediastinum) is brighter than the lungs' darkest tenth
    h, w = g.shape
    centre = g[h // 3 : 2 * h // 3, w // 2 - w // 20 : w // 2 + w // 20].mean()
    assert centre > np.percentile(g, 10) + 40
    assert len(_shared_files()) == 3


# ------------------------------------------------------------------ reduced-resolution JPEG 2000


def _smooth_image(rows: int, cols: int, stored: int) -> np.ndarray:
    """A radiograph-like smooth image (gradients and a few soft blobs), as CR images mostly are."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    hi = (1 << stored) - 1
    img = 0.3 + 0.4 * yy / rows + 0.2 * np.sin(xx / cols * 6.0)
    for cy, cx, s in ((0.4, 0.3, 0.08), (0.6, 0.7, 0.12)):
        img += 0.15 * np.exp(-(((yy / rows - cy) ** 2 + (xx / cols - cx) ** 2) / (2 * s * s)))
    return (img / img.max() * hi).astype(np.uint16)


@pytest.mark.parametrize("stored", [12, 16])
def test_large_jpeg2000_decodes_at_the_smallest_level_that_covers_the_input(stored: int) -> None:
    from support import make_image

    ds = make_image(_smooth_image(1000, 1200, stored), stored=stored)
    ds.compress(JPEG2000Lossless)
    reduced = imaging.decode(ds, PreprocessSpec())
    full = imaging.decode(ds, PreprocessSpec(j2k_reduce=False))
    assert full.shape == (1000, 1200) and reduced.shape == (500, 600)  # 1000/2 >= 2 * 224 > 1000/4
    # level 1's low-pass band vs 2x2 block means of the full image: same picture, same value range
    blocks = full.reshape(500, 2, 600, 2).mean(axis=(1, 3))
    assert np.abs(reduced.astype(float) - blocks).mean() < 0.01 * ((1 << stored) - 1)
    a = imaging.preprocess(ds, PreprocessSpec())
    b = imaging.preprocess(ds, PreprocessSpec(j2k_reduce=False))
    assert a.shape == b.shape == (3, 224, 224)
    assert np.abs(a - b).mean() * 0.229 * 255 < 1.0  # under 1 grey level on average


def test_jpeg2000_reduction_keeps_the_input_size_covered() -> None:
    hdr = codestream._J2KHeader(rows=2000, cols=2500, precision=12, signed=False, levels=5)
    assert codestream._j2k_reduction(hdr, PreprocessSpec()) == 2  # 500 >= 448 > 250
    assert codestream._j2k_reduction(hdr, PreprocessSpec(size=(256, 256))) == 1  # 500 < 512 <= 1000
    assert codestream._j2k_reduction(codestream._J2KHeader(2000, 2500, 12, False, levels=1), PreprocessSpec()) == 1
    assert codestream._j2k_reduction(codestream._J2KHeader(894, 2500, 12, False, levels=5), PreprocessSpec()) == 0  # 447 < 448
    assert codestream._j2k_reduction(codestream._J2KHeader(896, 2500, 12, False, levels=5), PreprocessSpec()) == 1


def test_small_and_odd_jpeg2000_take_the_full_decoder() -> None:
    from support import make_image

    ds = make_image(_smooth_image(800, 700, 12), stored=12)  # too small to reduce (700 / 2 < 448)
    ds.compress(JPEG2000Lossless)
    assert imaging.decode(ds, PreprocessSpec()).shape == (800, 700)
    assert codestream._j2k_header(b"\x00\x00\x00\x0cjP  \r\n\x87\n") is None  # a JP2 box, not a codestream
