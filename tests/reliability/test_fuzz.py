"""Fuzzing decode-and-preprocess (issue 7): random headers and bytes into imaging.preprocess.

The contract: ``preprocess`` returns a finite float32 (3, 224, 224) array or raises
``imaging.PixelError``; never another exception, never a hang (hypothesis' deadline).

Bounded in CI: ``CXR_TRIAGE_FUZZ_EXAMPLES`` examples per test (default 60, a few seconds);
e.g. ``CXR_TRIAGE_FUZZ_EXAMPLES=20000 pytest tests/reliability/test_fuzz.py`` for a long run.
"""

from __future__ import annotations

import os
import struct
from datetime import timedelta

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the dev extra (pip install -e '.[dev]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from worker import imaging  # noqa: E402

EXAMPLES = int(os.environ.get("CXR_TRIAGE_FUZZ_EXAMPLES", "60"))
#: Small decode limit: the fuzzer must not make the test process allocate gigabytes.
SPEC = imaging.PreprocessSpec(max_bytes=8 * 2**20)

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),
    derandomize=EXAMPLES <= 200,  # CI: the same examples every run; long runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.100",
    "1.2.3.4",
    "not a uid",
]

small = st.integers(min_value=-3, max_value=70)
odd_int = st.one_of(small, st.sampled_from([0, 1, 2, 8, 12, 16, 32, 255, 256, 4096, 65535, 65536, 2**31 - 1, -(2**31)]))
text_num = st.one_of(st.integers(-70000, 70000).map(str), st.sampled_from(["", " ", "abc", "1e9", "nan", "-0", "3.5"]))


def _set(ds: Dataset, keyword: str, value: object) -> None:
    """Set an attribute; values pydicom refuses to hold are left out (the fuzzer wants data
    sets, not pydicom's own validation)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            setattr(ds, keyword, value)
        except (OverflowError, ValueError, TypeError, struct.error):
            pass


@st.composite
def headers(draw: st.DrawFn) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = draw(st.sampled_from(TRANSFER_SYNTAXES))
    for kw in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel"):
        if draw(st.booleans()) or kw in ("Rows", "Columns", "BitsAllocated"):
            _set(ds, kw, draw(odd_int))
    if draw(st.booleans()):
        _set(ds, "NumberOfFrames", draw(text_num))
    ds.PhotometricInterpretation = draw(st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "", "xyz"]))
    if draw(st.booleans()):
        _set(ds, "RescaleSlope", draw(st.sampled_from(["1", "0", "-1", "1e300", "nan", "inf", "x", ""])))
        _set(ds, "RescaleIntercept", draw(st.sampled_from(["0", "-1024", "1e300", "nan", "", "abc"])))
    if draw(st.booleans()):
        _set(ds, "WindowCenter", draw(st.sampled_from(["40", "0", "-1e308", "nan", "", "1\\2", "x"])))
        _set(ds, "WindowWidth", draw(st.sampled_from(["400", "0", "-5", "1e308", "nan", "", "1\\0"])))
        _set(ds, "VOILUTFunction", draw(st.sampled_from(["LINEAR", "SIGMOID", "LINEAR_EXACT", "BOGUS", ""])))
    if draw(st.booleans()):
        item = Dataset()
        item.LUTDescriptor = [draw(odd_int), draw(odd_int), draw(st.sampled_from([8, 16, 0, 3]))]
        item.LUTData = draw(st.binary(max_size=64))
        seq_kw = draw(st.sampled_from(["VOILUTSequence", "ModalityLUTSequence"]))
        setattr(ds, seq_kw, Sequence([item]))
    if draw(st.booleans()):
        ds.PixelPaddingValue = draw(st.integers(0, 65535))
    return ds


@st.composite
def pixel_data(draw: st.DrawFn, ds: Dataset) -> bytes:
    """Random bytes, sometimes of the size the header implies, sometimes encapsulated."""
    try:
        need = int(ds.Rows) * int(ds.Columns) * max(int(ds.BitsAllocated), 0) // 8
    except (AttributeError, TypeError, ValueError):
        need = 0
    kind = draw(st.sampled_from(["random", "exact", "encapsulated"]))
    if kind == "exact" and 0 < need <= 1 << 16:
        return draw(st.binary(min_size=need, max_size=need))
    if kind == "encapsulated":
        frames = draw(st.lists(st.binary(min_size=2, max_size=512), min_size=1, max_size=3))
        return encapsulate([f + b"\0" * (len(f) % 2) for f in frames])
    return draw(st.binary(max_size=4096))


def _check(ds: Dataset) -> None:
    try:
        out = imaging.preprocess(ds, SPEC)
    except imaging.PixelError as exc:
        assert str(exc)
        return
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    assert np.isfinite(out).all()


@FUZZ
@given(st.data())
def test_fuzz_random_headers_and_bytes(data: st.DataObject) -> None:
    ds = data.draw(headers())
    ds.PixelData = data.draw(pixel_data(ds))
    _check(ds)


@FUZZ
@given(
    rows=st.integers(1, 96), cols=st.integers(1, 96), bits=st.sampled_from([8, 16]), stored=st.integers(1, 16),
    signed=st.booleans(), seed=st.integers(0, 2**32 - 1), photometric=st.sampled_from(["MONOCHROME1", "MONOCHROME2"]),
    slope=st.sampled_from([None, 1.0, 0.5, -1.0, 1e-6, 1e6]), window=st.sampled_from([None, (40, 400), (0, 1), (1e6, 1e-3)]),
)
def test_fuzz_well_formed_native_images(rows, cols, bits, stored, signed, seed, photometric, slope, window) -> None:  # type: ignore[no-untyped-def]
    stored = min(stored, bits)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 1 << bits, (rows, cols), dtype=np.uint32).astype(np.uint16 if bits == 16 else np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, cols, bits, stored, stored - 1
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, int(signed), photometric
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.tobytes()
    _check(ds)
