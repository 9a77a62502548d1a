"""Hostile and broken input, one test per case (issue 7).

Every case ends in one of: a failure status with a row in ``intake_events`` (the sender keeps
the object), a ``skipped``/``failed`` job with a reason a person can read, or (network-level
garbage) the connection closed; after each the node still answers C-ECHO. Cases that declare
huge sizes also check that the test process (the node runs in it) did not grow by more than
``RSS_BOUND_MB``.

Objects that are well-formed DICOM go through pynetdicom; everything else is sent byte by byte
with ``rawdicom`` (pynetdicom and dcmtk refuse to send malformed data).
"""

from __future__ import annotations

import os
import resource
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from rawdicom import EXPLICIT_LE, IMPLICIT_LE, VERIFICATION, RawAssociation, associate_rq, p_data, pdu
from support import CR_STORAGE, make_image, send

#: Allowed growth of the peak RSS of this process for a case that declares gigabytes.
RSS_BOUND_MB = 200

FAILURE = "failure"


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def bounded_memory() -> Iterator[None]:
    before = _maxrss_mb()
    yield
    grown = _maxrss_mb() - before
    assert grown < RSS_BOUND_MB, f"peak RSS grew by {grown:.0f} MB"


def encode(ds: Dataset, *, implicit: bool = False) -> bytes:
    """The data set alone (no file meta), as sent in P-DATA: Explicit (or Implicit) VR LE."""
    from pynetdicom.dsutils import encode as _encode

    return _encode(ds, implicit, True)


def raw_store(screening, sop_uid: str, body: bytes, *, ts: str = EXPLICIT_LE, sop_class: str = CR_STORAGE) -> int | None:
    a = RawAssociation(screening.port)
    try:
        assert a.associate([(1, sop_class, [ts])]), "association refused"
        assert 1 in a.accepted, "presentation context refused"
        return a.store(1, sop_class, sop_uid, body)
    finally:
        a.release()


def outcome(screening, sop_uid: str, status: int | None) -> tuple[str, str]:
    """("refused"|"skipped"|"failed"|"done"|"closed", reason); asserts the node still answers."""
    result = ("?", "")
    try:
        if status is None:
            result = ("closed", "association ended without a response")
            return result
        if status != 0x0000:
            evs = [e for e in screening.events() if e["status"] == f"0x{status:04X}"]
            assert evs, f"status 0x{status:04X} without an intake event"
            result = ("refused", f"0x{status:04X} {evs[-1]['reason']}")
            return result
        screening.drain()
        row = screening.row(sop_uid)
        assert row is not None, "acknowledged but not in the database"
        result = (row.state, row.reason or "")
        return result
    finally:
        assert screening.alive(), "node does not answer C-ECHO any more"
        log = os.environ.get("CXR_TRIAGE_CORPUS_LOG")  # a table of outcomes for docs/reliability.md
        if log:
            case = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
            with open(log, "a") as f:
                f.write(f"| `{case}` | {result[0]} | {result[1][:200]} |\n")


def assert_not_screened(result: tuple[str, str], *expect: str) -> None:
    """A failure status or a skipped/failed row, with a readable reason containing ``expect``."""
    state, reason = result
    assert state in ("refused", "skipped", "failed"), result
    assert reason and reason.isprintable(), result
    for e in expect:
        assert e.lower() in reason.lower(), result


def test_corpus_node_healthy_baseline(screening) -> None:
    ds = make_image(rows=64, cols=64)
    (status,) = send([ds], screening.port)
    assert outcome(screening, ds.SOPInstanceUID, status)[0] == "done"


# ------------------------------------------------------------------ network level (raw PDUs)


def _connection_dropped(screening, data: bytes, *, then_close: bool = False) -> None:
    a = RawAssociation(screening.port)
    try:
        a.send(data)
        if then_close:
            a.close()
        else:
            assert a.closed_by_peer(timeout=10), "node kept a hostile connection open"
    finally:
        a.close()
    assert screening.alive()


def test_garbage_bytes_instead_of_a_pdu(screening) -> None:
    _connection_dropped(screening, os.urandom(4096))


def test_unknown_pdu_type(screening) -> None:
    _connection_dropped(screening, pdu(0x09, b"\0" * 32))


def test_truncated_pdu_header(screening) -> None:
    _connection_dropped(screening, b"\x01\x00\x00", then_close=True)


def test_pdu_length_longer_than_sent_then_silence(screening) -> None:
    # 1000 bytes declared, 40 sent: the node waits at most network_timeout (3 s here), then closes.
    _connection_dropped(screening, struct.pack(">BBL", 0x01, 0, 1000) + b"\0" * 40)


def test_pdu_declaring_4_gb_is_not_allocated(screening) -> None:
    with bounded_memory():
        _connection_dropped(screening, pdu(0x01, b"\0" * 100, length=0xFFFFFFFF))


def test_associate_rq_of_length_zero(screening) -> None:
    _connection_dropped(screening, pdu(0x01, b""))


def test_associate_rq_item_longer_than_pdu(screening) -> None:
    rq = bytearray(associate_rq([(1, VERIFICATION, [IMPLICIT_LE])]))
    i = rq.index(b"\x20\x00", 74)  # presentation context item: claim 0xFFFF bytes
    rq[i + 2 : i + 4] = b"\xff\xff"
    _connection_dropped(screening, bytes(rq))


def test_pdv_length_longer_than_pdu(screening) -> None:
    a = RawAssociation(screening.port)
    try:
        assert a.associate([(1, VERIFICATION, [IMPLICIT_LE])])
        a.send(p_data(1, b"\0" * 20, command=True, pdv_length=100_000))
        assert a.closed_by_peer(timeout=10)
    finally:
        a.close()
    assert screening.alive()


def test_p_data_on_a_context_never_negotiated(screening) -> None:
    a = RawAssociation(screening.port)
    try:
        assert a.associate([(1, VERIFICATION, [IMPLICIT_LE])])
        a.send(p_data(99, b"\0" * 20, command=True))
        assert a.read_status() is None  # aborted, no response
    finally:
        a.close()
    assert screening.alive()


def test_silent_connection_does_not_block_others(screening) -> None:
    a = RawAssociation(screening.port)
    try:
        assert screening.alive()  # another association is served meanwhile
        assert a.closed_by_peer(timeout=10)  # dropped after acse_timeout (3 s here)
    finally:
        a.close()


def test_connection_dropped_mid_object_stores_nothing(screening) -> None:
    ds = make_image(rows=256, cols=256)
    body = encode(ds)
    a = RawAssociation(screening.port)
    assert a.associate([(1, CR_STORAGE, [EXPLICIT_LE])])
    from rawdicom import c_store_rq

    a.send(p_data(1, c_store_rq(CR_STORAGE, ds.SOPInstanceUID), command=True))
    a.send(p_data(1, body[: len(body) // 2], command=False, last=False))
    a.close()
    time.sleep(0.5)
    assert screening.row(ds.SOPInstanceUID) is None
    assert not list(screening.node.spool.root.glob("*/.tmp-*"))
    assert screening.alive()


def test_unsupported_transfer_syntax_is_refused_in_negotiation(screening) -> None:
    a = RawAssociation(screening.port)
    try:
        assert a.associate([(1, CR_STORAGE, ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.100"])])
        assert 1 not in a.accepted  # Explicit VR Big Endian, MPEG2: context refused
        a.send(p_data(1, b"\0" * 20, command=True))  # used anyway
        assert a.read_status() is None
    finally:
        a.close()
    assert screening.alive()


# ------------------------------------------------------------------ UIDs and data sets at intake


@pytest.mark.parametrize(
    ("uid", "reason"),
    [
        ("../../x", "characters other than digits"),
        ("1.2.3/../../etc/passwd", "characters other than digits"),
        ("1." + "2" * 70, "at most 64"),
        ("1.2.abc.4", "characters other than digits"),
        ("1..2", "characters other than digits"),
    ],
    ids=["path-traversal", "path-with-digits", "over-long", "letters", "empty-component"],
)
def test_invalid_sop_instance_uid(screening, uid: str, reason: str) -> None:
    ds = make_image(rows=32, cols=32)
    ds.SOPInstanceUID = uid
    status = raw_store(screening, uid, encode(ds))
    # also over 64 characters: a failure status and a reason, not an aborted association (issue 19)
    assert status == 0xC000
    assert_not_screened(outcome(screening, uid, status), reason)
    assert not list(screening.node.spool.root.rglob("*passwd*")) and not (screening.node.spool.root.parent / "x.dcm").exists()


def test_over_long_uid_is_refused_and_the_association_goes_on(screening) -> None:
    """A sender retries an aborted association for ever; a failure status per object it logs and moves on."""
    long_uid = "1.2." + "3" * 80
    bad, good = make_image(rows=32, cols=32), make_image(rows=32, cols=32)
    bad.SOPInstanceUID = long_uid
    a = RawAssociation(screening.port)
    try:
        assert a.associate([(1, CR_STORAGE, [EXPLICIT_LE])]) and 1 in a.accepted
        assert a.store(1, CR_STORAGE, long_uid, encode(bad)) == 0xC000
        assert a.store(1, CR_STORAGE, good.SOPInstanceUID, encode(good)) == 0x0000
    finally:
        a.release()
    (ev,) = [e for e in screening.events() if e["sop_instance_uid"] == long_uid[:128]]
    assert ev["kind"] == "refused" and ev["status"] == "0xC000"
    assert ev["reason"] == "invalid SOP Instance UID: UID is 84 characters long (at most 64)"
    assert screening.row(long_uid) is None and screening.row(good.SOPInstanceUID) is not None
    assert not [p for p in screening.node.spool.root.rglob("*.dcm") if "3333333333" in p.name]


def test_invalid_study_instance_uid(screening) -> None:
    ds = make_image(rows=32, cols=32)
    ds.StudyInstanceUID = "../../study"
    status = raw_store(screening, ds.SOPInstanceUID, encode(ds))
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "StudyInstanceUID")


def test_request_uid_differs_from_data_set(screening) -> None:
    ds = make_image(rows=32, cols=32)
    status = raw_store(screening, generate_uid(), encode(ds))
    assert status == 0xA900
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "differ")


def test_random_bytes_as_data_set(screening) -> None:
    uid = generate_uid()
    status = raw_store(screening, uid, os.urandom(2000))
    assert status in (0xA900, 0xC000)
    assert_not_screened(outcome(screening, uid, status))


def test_empty_data_set(screening) -> None:
    uid = generate_uid()
    status = raw_store(screening, uid, b"")
    assert status in (0xA900, 0xC000)
    assert_not_screened(outcome(screening, uid, status))


def test_deflate_transfer_syntax_with_a_body_that_is_not_deflated(screening) -> None:
    ds = make_image(rows=32, cols=32)
    status = raw_store(screening, ds.SOPInstanceUID, encode(ds), ts=DeflatedExplicitVRLittleEndian)
    assert status in (0xA900, 0xC000)
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status))


def test_object_over_max_object_mb(screening) -> None:
    ds = make_image(np.zeros((2200, 2200), np.uint16))  # 9.7 MB > listener.max_object_mb = 8
    (status,) = send([ds], screening.port)
    assert status == 0xA700
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "max_object_mb")


def _nested(levels: int) -> bytes:
    """Explicit VR LE bytes of a sequence nested ``levels`` deep, undefined lengths throughout."""
    open_level = struct.pack("<HH2sHL", 0x0040, 0x0275, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    close_level = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return open_level * levels + close_level * levels


def _with_element(ds: Dataset, raw: bytes) -> bytes:
    """The data set's bytes with ``raw`` spliced in before (0040,0275)'s place: after (0028,xxxx)
    and before (7FE0,0010), keeping tag order."""
    body = encode(ds)
    i = body.index(b"\xe0\x7f\x10\x00")  # Pixel Data tag, little endian
    return body[:i] + raw + body[i:]


@pytest.mark.parametrize("levels", [1_000, 100_000], ids=["1000-levels", "100000-levels"])
def test_deeply_nested_sequence(screening, levels: int) -> None:
    ds = make_image(rows=64, cols=64)
    body = _with_element(ds, _nested(levels))
    with bounded_memory():
        status = raw_store(screening, ds.SOPInstanceUID, body)
        result = outcome(screening, ds.SOPInstanceUID, status)
    # The sequence is an optional attribute nobody reads: the image may be screened normally,
    # and nothing recurses into it (no RecursionError, bounded memory).
    assert result[0] in ("refused", "skipped", "failed", "done"), result
    if result[0] != "done":
        assert_not_screened(result)


def test_element_length_near_4_gb_before_pixel_data(screening) -> None:
    ds = make_image(rows=64, cols=64)
    raw = struct.pack("<HH2sHL", 0x0009, 0x1001, b"OB", 0, 0xFFFFFFF0) + b"\0" * 64
    body = encode(ds)
    i = body.index(b"\x10\x00\x10\x00")  # (0010,0010) PatientName: the 4 GB element goes before it
    with bounded_memory():
        status = raw_store(screening, ds.SOPInstanceUID, body[:i] + raw + body[i:])
        assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "truncated", "(0009,1001)")


def test_pixel_data_length_near_4_gb(screening) -> None:
    ds = make_image(rows=64, cols=64)
    body = encode(ds)
    i = body.index(b"\xe0\x7f\x10\x00")
    # 8192 bytes follow: exactly 64 x 64 x 16 bits, so only the declared length is wrong.
    raw = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0xFFFFFFF0) + b"\0" * 8192
    with bounded_memory():
        status = raw_store(screening, ds.SOPInstanceUID, body[:i] + raw)
        assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "truncated")


def test_native_pixel_data_with_undefined_length(screening) -> None:
    ds = make_image(rows=64, cols=64)
    body = encode(ds)
    i = body.index(b"\xe0\x7f\x10\x00")
    raw = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 0xFFFFFFFF) + b"\0" * 8192
    status = raw_store(screening, ds.SOPInstanceUID, body[:i] + raw)
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status))


def test_same_sop_instance_uid_for_another_patient(screening) -> None:
    first = make_image(rows=64, cols=64, seed=1)
    other = make_image(rows=64, cols=64, seed=2, patient_id="SOMEONE-ELSE")
    other.SOPInstanceUID = first.SOPInstanceUID
    other.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    # A UID collision is refused (0xC000), so its sender keeps the image; the first one is screened.
    assert send([first, other], screening.port) == [0x0000, 0xC000]
    (ev,) = [e for e in screening.events(first.SOPInstanceUID)]
    assert ev["kind"] == "refused" and "already stored for another" in ev["reason"]
    assert outcome(screening, first.SOPInstanceUID, 0)[0] == "done"
    assert dcmread(screening.node.spool.path(screening.row(first.SOPInstanceUID).path)).PatientID == "TEST-0001"


def test_non_ascii_strings_without_and_with_a_wrong_character_set(screening) -> None:
    a = make_image(rows=64, cols=64)
    a.PatientName = "Müller^Zoë"  # no Specific Character Set: not ASCII
    a.StudyDescription = "Thorax p.a. — 胸部"
    b = make_image(rows=64, cols=64)
    b.SpecificCharacterSet = "ISO_IR 999"  # unknown character set
    b.PatientName = "Ωmega^Ünknown"
    statuses = send([a, b], screening.port)
    for ds, status in zip((a, b), statuses, strict=True):
        # Names do not matter to screening: the image is screened, the result built.
        assert outcome(screening, ds.SOPInstanceUID, status)[0] == "done"


def test_over_long_strings(screening) -> None:
    ds = make_image(rows=64, cols=64)
    ds.AccessionNumber = "A" * 10_000  # SH: at most 16
    ds.StudyDescription = "x" * 100_000  # LO: at most 64
    ds.PatientName = "N" * 70_000
    status = raw_store(screening, ds.SOPInstanceUID, encode(ds))
    state, reason = outcome(screening, ds.SOPInstanceUID, status)
    row = screening.row(ds.SOPInstanceUID)
    if row is not None:  # clipped to the column width (PostgreSQL would refuse the row otherwise)
        assert len(row.accession_number) <= 64
    # Not refused (an over-long description is common in the wild); the database keeps at most
    # the column width; the result is built with clipped values or the job fails with a reason.
    assert state in ("done", "refused", "failed", "skipped"), (state, reason)
    if state != "done":
        assert_not_screened((state, reason))


def test_over_long_modality(screening) -> None:
    ds = make_image(rows=64, cols=64)
    ds.Modality = "CR" + "-" * 40 + "X"  # CS: at most 16; the database column holds 16
    status = raw_store(screening, ds.SOPInstanceUID, encode(ds))
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "is not CR or DX")
    assert len(screening.row(ds.SOPInstanceUID).modality) == 16


# ------------------------------------------------------------------ pixel data (skipped with a reason)


def _store_and_screen(screening, ds: Dataset) -> tuple[str, str]:
    (status,) = send([ds], screening.port)
    return outcome(screening, ds.SOPInstanceUID, status)


def test_zero_by_zero_image(screening) -> None:
    ds = make_image(rows=16, cols=16)
    ds.Rows, ds.Columns = 0, 0
    assert_not_screened(_store_and_screen(screening, ds), "0x0")


def test_65535_by_65535_declared_image(screening) -> None:
    ds = make_image(rows=16, cols=16)
    ds.Rows, ds.Columns = 65535, 65535
    with bounded_memory():
        assert_not_screened(_store_and_screen(screening, ds), "exceeds the limit")


def test_huge_number_of_frames(screening) -> None:
    ds = make_image(rows=64, cols=64)
    ds.NumberOfFrames = 1_000_000
    with bounded_memory():
        assert_not_screened(_store_and_screen(screening, ds), "exceeds the limit")


def test_pixel_data_shorter_than_declared(screening) -> None:
    ds = make_image(rows=64, cols=64)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert_not_screened(_store_and_screen(screening, ds), "truncated")


def test_pixel_data_twice_as_long_as_declared(screening) -> None:
    # pydicom would decode this as two frames without a word; refused as "too long".
    ds = make_image(rows=64, cols=64)
    ds.PixelData = ds.PixelData * 2
    assert_not_screened(_store_and_screen(screening, ds), "too long")


def test_bits_allocated_32(screening) -> None:
    ds = make_image(rows=16, cols=16)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = np.zeros(256, np.uint32).tobytes()
    assert_not_screened(_store_and_screen(screening, ds), "BitsAllocated 32")


def test_samples_per_pixel_3_but_monochrome(screening) -> None:
    ds = make_image(rows=16, cols=16)
    ds.SamplesPerPixel = 3
    assert_not_screened(_store_and_screen(screening, ds), "SamplesPerPixel")


def test_rows_with_two_values(screening) -> None:
    ds = make_image(rows=16, cols=16)
    ds.Rows = [16, 16]
    assert_not_screened(_store_and_screen(screening, ds), "Rows")


def test_number_of_frames_not_a_number(screening) -> None:
    ds = make_image(rows=16, cols=16)
    ds.NumberOfFrames = "-5"
    assert_not_screened(_store_and_screen(screening, ds), "NumberOfFrames")


def _jpeg_ls(rows: int = 64, cols: int = 64) -> Dataset:
    ds = make_image(rows=rows, cols=cols, bits=16, stored=12)
    ds.compress(JPEGLSLossless)
    return ds


def test_jpeg_ls_codestream_declaring_a_huge_image(screening) -> None:
    # DICOM header: 64x64. Codestream (SOF55): 20000x20000, i.e. 800 MB once decoded. Before the
    # guard in worker/imaging.py the decoder allocated about 1.5 GB before failing.
    ds = _jpeg_ls()
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    i = frame.index(b"\xff\xf7")
    frame[i + 5 : i + 9] = struct.pack(">HH", 20000, 20000)
    ds.PixelData = encapsulate([bytes(frame)])
    with bounded_memory():
        assert_not_screened(_store_and_screen(screening, ds), "declares 20000x20000", "before decoding")


def test_small_jpeg_ls_file_with_huge_rows_and_columns(screening) -> None:
    ds = _jpeg_ls()
    ds.Rows, ds.Columns = 20000, 20000  # 800 MB declared > model.max_image_mb = 64
    with bounded_memory():
        assert_not_screened(_store_and_screen(screening, ds), "exceeds the limit")


def test_encapsulated_pixel_data_without_sequence_delimiter(screening) -> None:
    # pydicom reads such a file as a data set without Pixel Data, silently.
    ds = _jpeg_ls()
    body = encode(ds)
    assert body.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    status = raw_store(screening, ds.SOPInstanceUID, body[:-8], ts=JPEGLSLossless)
    assert_not_screened(outcome(screening, ds.SOPInstanceUID, status), "pixel data")


def test_encapsulated_frame_that_fails_to_decode(screening) -> None:
    # Right size in the frame header, an end marker, but a scan header naming 7 components:
    # the decoders fail. (Garbage *inside* a scan, or no scan at all, decodes to garbage pixels
    # without an error: see docs/reliability.md.)
    ds = _jpeg_ls()
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[frame.index(b"\xff\xda") + 4] = 7
    ds.PixelData = encapsulate([bytes(frame)])
    assert_not_screened(_store_and_screen(screening, ds), "could not decode")


def test_truncated_jpeg_ls_scan(screening) -> None:
    ds = _jpeg_ls(128, 128)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    cut = frame[: len(frame) // 2]
    ds.PixelData = encapsulate([cut + b"\0" * (len(cut) % 2)])
    assert_not_screened(_store_and_screen(screening, ds), "truncated")


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk's dcmcjpeg encodes JPEG Lossless")
def test_truncated_jpeg_lossless_scan(screening, tmp_path: Path) -> None:
    # libjpeg decodes a JPEG Lossless scan cut in half to garbage without an error.
    src = make_image(rows=128, cols=128, bits=16, stored=12)
    src.save_as(tmp_path / "src.dcm", enforce_file_format=True)
    subprocess.run(["dcmcjpeg", "+e1", str(tmp_path / "src.dcm"), str(tmp_path / "jl.dcm")], check=True)
    ds = dcmread(tmp_path / "jl.dcm")
    assert ds.file_meta.TransferSyntaxUID == JPEGLosslessSV1
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    cut = frame[: len(frame) // 2]
    ds.PixelData = encapsulate([cut + b"\0" * (len(cut) % 2)])
    assert_not_screened(_store_and_screen(screening, ds), "truncated")


def test_rle_with_garbage_segments(screening) -> None:
    ds = make_image(rows=64, cols=64)
    ds.compress(RLELossless)
    ds.PixelData = encapsulate([struct.pack("<16L", 2, 64, 100_000, *([0] * 13)) + os.urandom(200)])
    assert_not_screened(_store_and_screen(screening, ds), "could not decode")


def test_rgb_photometric(screening) -> None:
    ds = make_image(rows=16, cols=16, photometric="RGB")
    assert_not_screened(_store_and_screen(screening, ds), "not greyscale")


def test_no_pixel_data(screening) -> None:
    ds = make_image(rows=16, cols=16)
    del ds.PixelData
    assert_not_screened(_store_and_screen(screening, ds), "no pixel data")
