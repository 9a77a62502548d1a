"""worker.imaging decoder choice and fallback: valid JPEG 2000 that the reduced-resolution path
refuses is decoded in full; every compressed file pydicom ships as test data, and the project's
samples, either decode to pydicom's pixels or are refused with a reason, never a crash."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000, UID, JPEG2000Lossless
from support import j2k_dataset, make_image, tile_cod_codestream

from worker import imaging
from worker.imaging import PixelError, PreprocessSpec, codestream, decoding

REPO = Path(__file__).resolve().parents[2]
PYDICOM_FILES = Path(pydicom.__file__).resolve().parent / "data" / "test_files"
#: Transfer syntaxes of the families the issue names: JPEG, JPEG-LS, JPEG 2000 (incl. HTJ2K), RLE.
FAMILIES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")
#: Reduced-resolution tolerance (docs/architecture.md, "Decoders"): model input vs the full
#: decode's, in grey levels of the 8-bit image: mean under 1, 99th percentile at most 6.
TOL_MEAN, TOL_P99 = 1.0, 6.0


# ------------------------------------------------------------------ a codestream Pillow refuses


def _radiograph(rows: int = 1000, cols: int = 1200, bits: int = 12) -> np.ndarray:
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    img = 0.3 + 0.4 * yy / rows + 0.2 * np.sin(xx / cols * 6.0)
    img += 0.15 * np.exp(-(((yy / rows - 0.5) ** 2 + (xx / cols - 0.4) ** 2) / 0.02))
    return (img / img.max() * ((1 << bits) - 1)).astype(np.uint16)


@pytest.mark.parametrize("ts", [JPEG2000Lossless, JPEG2000], ids=["lossless", "lossy"])
def test_jpeg2000_the_reduced_path_refuses_is_decoded_in_full(ts: str) -> None:
    pix = _radiograph()
    cs = tile_cod_codestream(pix, 12, lossy=ts == JPEG2000)
    # the reproduction: the reduced decode (what worker/imaging.py used to give up on) fails ...
    header = codestream._j2k_header(cs)
    assert header is not None and header.levels == 5
    r = codestream._j2k_reduction(header, PreprocessSpec())
    assert r == 1
    with pytest.raises(OSError, match="broken data stream"):
        decoding._decode_j2k_reduced(cs, header, r)
    # ... while the data are valid: pydicom's full decode reads them, and so does the worker now
    ds = j2k_dataset(cs, pix, 12, ts)
    full = ds.pixel_array
    assert full.shape == pix.shape
    if ts == JPEG2000Lossless:
        assert np.array_equal(full, pix)
    got = imaging.decode(ds, PreprocessSpec())
    assert np.array_equal(got, full)
    assert np.array_equal(imaging.preprocess(ds), imaging.preprocess(ds, PreprocessSpec(j2k_reduce=False)))


def test_jpeg2000_every_decoder_failing_is_refused_with_each_reason() -> None:
    from pydicom.uid import JPEG2000Lossless as TS

    pix = _radiograph()
    imagecodecs = pytest.importorskip("imagecodecs")
    cs = bytes(imagecodecs.jpeg2k_encode(pix, level=0, codecformat="J2K", bitspersample=12, reversible=True))
    sot = cs.find(b"\xff\x90")
    broken = cs[: sot + 14] + bytes(range(256)) * 50 + b"\xff\xd9"  # a valid header, garbage tile data
    ds = j2k_dataset(broken, pix, 12, TS)
    with pytest.raises(PixelError) as err:
        imaging.preprocess(ds)
    reason = str(err.value)
    assert reason.startswith(f"could not decode {TS.name} ({TS}) pixel data: ")
    assert "reduced-resolution decode (OpenJPEG via Pillow): broken data stream" in reason
    assert re.search(r"; pydicom: .*J2K", reason), reason
    assert "\n" not in reason


# ------------------------------------------------------------------ every compressed test file


def _transfer_syntax(path: Path) -> UID | None:
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        return UID(str(meta.TransferSyntaxUID))
    except Exception:  # not DICOM, or no file meta: not one of the files this test is about
        return None


def _local_pydicom_files() -> list[Path]:
    """pydicom's bundled test files of the compressed families (no download: get_testdata_files
    would try to fetch the pydicom-data files, and tests reach no network)."""
    files = []
    for p in sorted(PYDICOM_FILES.rglob("*")):
        if p.is_file() and p.suffix != ".py":
            ts = _transfer_syntax(p)
            if ts is not None and str(ts).startswith(FAMILIES):
                files.append(p)
    return files


def _online_pydicom_names() -> list[str]:
    """Files pydicom lists as downloadable from pydicom-data whose names mark a compressed
    syntax; used when they are in pydicom's cache, else skipped with the reason."""
    from pydicom.data.data_manager import online_test_file_dummy_paths

    pats = ("*J2K*", "*j2k*", "*JP2*", "*jp2*", "*jpeg*", "*JPEG*", "*JPG*", "*jpg*", "*JLS*", "*jls*", "*RLE*", "*rle*")
    names = {Path(str(v)).name for v in online_test_file_dummy_paths().values()}
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in pats))


def _cached(name: str) -> Path | None:
    from pydicom.data.download import get_data_dir

    p = Path(get_data_dir()) / name
    return p if p.is_file() else None


def _corpus() -> list[object]:
    params: list[object] = [pytest.param(p, id=f"pydicom/{p.name}") for p in _local_pydicom_files()]
    for name in _online_pydicom_names():
        cached = _cached(name)
        mark = [] if cached else [pytest.mark.skip(reason=f"{name}: in pydicom-data, not installed (needs a download)")]
        params.append(pytest.param(cached or Path(name), id=f"pydicom-data/{name}", marks=mark))
    params += [pytest.param(p, id=f"samples/{p.name}") for p in sorted((REPO / "samples").glob("*.dcm"))]
    return params


def _grey_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and 99th percentile of |a - b| in 8-bit grey levels (model inputs, channel 0)."""
    d = np.abs(a[0] - b[0]) * 0.229 * 255
    return float(d.mean()), float(np.percentile(d, 99))


def test_the_corpus_covers_every_family() -> None:
    syntaxes = {str(_transfer_syntax(p)) for p in _local_pydicom_files()}
    for prefix in ("1.2.840.10008.1.2.4.5", "1.2.840.10008.1.2.4.7", "1.2.840.10008.1.2.4.8",
                   "1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.5"):
        assert any(s.startswith(prefix) for s in syntaxes), prefix


@pytest.mark.parametrize("path", _corpus())
def test_every_compressed_test_file_decodes_like_pydicom_or_is_refused_with_a_reason(path: Path) -> None:
    ds = pydicom.dcmread(path)
    try:
        tensor = imaging.preprocess(ds)
    except PixelError as exc:  # what the pipeline records as skipped, "pixel data: <reason>"
        reason = str(exc)
        assert len(reason) > 10 and "\n" not in reason, reason
        return
    assert tensor.shape == (3, 224, 224) and np.isfinite(tensor).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ds.pixel_array  # pydicom's own full decode
    if reference.ndim == 3:
        reference = reference[0]
    full_spec = PreprocessSpec(j2k_reduce=False)
    stored = imaging.decode(ds, full_spec)
    assert stored.shape == reference.shape
    assert np.array_equal(stored, reference), f"{path.name}: the full decode differs from pydicom's"
    reduced = imaging.decode(ds, PreprocessSpec())
    if reduced.shape == reference.shape:  # not reduced: the same pixels, the same model input
        assert np.array_equal(reduced, reference)
        assert np.array_equal(tensor, imaging.preprocess(ds, full_spec))
    else:
        mean, p99 = _grey_diff(tensor, imaging.preprocess(ds, full_spec))
        assert mean < TOL_MEAN and p99 <= TOL_P99, (path.name, mean, p99)


def test_compressed_samples_are_in_the_corpus() -> None:
    kinds = {str(_transfer_syntax(p)) for p in (REPO / "samples").glob("*.dcm")}
    assert any(k.startswith("1.2.840.10008.1.2.4.9") for k in kinds)
    assert any(k.startswith("1.2.840.10008.1.2.4.7") for k in kinds)
    assert os.path.isdir(PYDICOM_FILES)


# ------------------------------------------------------------------ the faster decoders


needs_dcmtk = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dcmcjpeg", "dcmcjpls", "dcmcrle")), reason="dcmtk dcmcjpeg/dcmcjpls/dcmcrle not on PATH"
)


def _dcmtk(ds: pydicom.Dataset, tool: str, options: list[str], tmp: Path) -> pydicom.Dataset:
    src, dst = tmp / "src.dcm", tmp / f"{tool}{''.join(options)}.dcm"
    ds.save_as(src, enforce_file_format=True)
    subprocess.run([tool, *options, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return pydicom.dcmread(dst)


def _noisy(bits: int, signed: bool) -> pydicom.Dataset:
    rng = np.random.default_rng(bits)
    hi = (1 << bits) - 1
    pix = np.clip(rng.normal(hi / 2, hi / 6, (300, 240)), 0, hi).astype(np.uint16 if bits > 8 else np.uint8)
    ds = make_image(pix, bits=16 if bits > 8 else 8, stored=bits)
    if signed:  # the same bit patterns read as two's complement of BitsStored bits
        ds.PixelRepresentation = 1
    return ds


@needs_dcmtk
@pytest.mark.parametrize("bits,signed", [(12, False), (16, False), (8, False), (12, True)])
@pytest.mark.parametrize(
    "tool,options,expect",
    [
        ("dcmcjpeg", ["+e1"], "imagecodecs"),  # process 14 SV1 (1.2.840.10008.1.2.4.70)
        ("dcmcjpeg", ["+el", "+sv", "3"], "imagecodecs"),  # process 14, selection value 3 (.57)
        ("dcmcjpls", [], "pyjpegls"),
        ("dcmcrle", [], "pylibjpeg-rle"),
    ],
    ids=["jpeg-sv1", "jpeg-p14-sv3", "jpeg-ls", "rle"],
)
def test_the_faster_decoder_gives_pydicoms_pixels(
    tool: str, options: list[str], expect: str, bits: int, signed: bool, tmp_path: Path
) -> None:
    ds = _dcmtk(_noisy(bits, signed), tool, options, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ds.pixel_array
    g = codestream._geometry(ds, PreprocessSpec())
    frame = codestream._first_frame(ds, g)
    from pydicom.pixels.decoders.base import get_decoder

    failures: list[str] = []
    fast = decoding._try_fast_decoders(ds, frame, g, get_decoder(g.transfer_syntax), failures)
    assert failures == []
    chosen = [d.name for d in decoding.fast_decoders(g.transfer_syntax)]
    if expect == "imagecodecs" and (signed or not chosen):
        assert fast is None  # signed JPEG lossless (or no imagecodecs): pydicom's own decoder
    else:
        assert fast is not None and any(expect in name for name in chosen), chosen
        assert fast.dtype == reference.dtype and np.array_equal(fast, reference)
    assert np.array_equal(imaging.decode(ds), reference)


def test_a_failing_faster_decoder_falls_back_to_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.decoders import FastDecoder

    def broken(frame: object, decoder: object) -> np.ndarray:
        raise RuntimeError("no\nluck")

    def wrong(frame: object, decoder: object) -> np.ndarray:
        return np.zeros((2, 2), np.uint16)

    ds = _noisy(12, False)
    ds.compress(pydicom.uid.RLELossless)
    monkeypatch.setattr(decoding, "fast_decoders", lambda ts: (FastDecoder("broken", broken), FastDecoder("wrong", wrong)))
    assert np.array_equal(imaging.decode(ds), ds.pixel_array)
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + bytes(60)])  # an RLE header claiming 1 segment at offset 0
    with pytest.raises(PixelError) as err:
        imaging.decode(ds)
    reason = str(err.value)
    assert "broken: no luck; wrong: returned uint16 (2, 2), expected uint16 (300, 240); pydicom: " in reason, reason
