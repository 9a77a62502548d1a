"""Speed of worker.results: build_sr (fast path) against _build_sr_reference (the highdicom-only
builder, i.e. what build_sr was before the template cache), and build_sc.

    /work/venv/bin/python bench/results_speed.py [--rounds 200] [--sc-rounds 15] [--out bench/out/results_speed.json]

Fast and reference builds are interleaved (one reference build every ``--ref-every`` fast
builds), so both see the same machine load; reported are the median and the minimum of the
wall time (``perf_counter``) and the median of the thread CPU time (``thread_time``, less
disturbed by other processes on a shared machine).  Input: ``worker/testing/dicom.py`` ``make_image``
(CR, 256 x 200) with orientation and spacing, a three-class result; the SC uses a 3000 x 2500
12-bit image.  The first build_sr (template build, ~100 ms) is not counted.  Also checks that
both SR builders give the same bytes.

Encoding an SR (``--encode-rounds``): pydicom's ``save_as(buf, enforce_file_format=True)`` (what
the pipeline used before issue 18) against ``worker.results.encode`` (pre-encoded items spliced),
alternating on the same build_sr dataset, and checks that both give the same bytes as the
reference builder's SR.  Prints a table and ``cat /proc/loadavg`` (give ratios on a busy
machine).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from worker import results  # noqa: E402
from worker.results import sr_reference  # noqa: E402
from worker.testing.dicom import make_image  # noqa: E402

NOW = datetime(2026, 11, 26, 14, 30, 5, 123456, tzinfo=timezone(timedelta(hours=1)))


def _source(pixels: np.ndarray | None = None) -> Any:
    ds = make_image(pixels=pixels, stored=12) if pixels is not None else make_image()
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.143, 0.143]
    return ds


def _result() -> results.TriageResult:
    return results.TriageResult(
        predicted_class="covid19",
        probabilities={"normal": 0.05, "pneumonia": 0.04, "covid19": 0.91},
        priority="urgent",
        triage_reason="P(covid19)=0.91 >= 0.50",
        thresholds={"covid19": 0.5, "pneumonia": 0.5},
        model_name="cxr-hybrid",
        model_version="0.1.0",
        model_sha256="ab" * 32,
        model_precision="int8",
    )


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - w) * 1e3, (time.thread_time() - c) * 1e3


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall = [s[0] for s in samples]
    cpu = [s[1] for s in samples]
    return {
        "n": len(samples),
        "wall_median_ms": round(statistics.median(wall), 3),
        "wall_min_ms": round(min(wall), 3),
        "cpu_median_ms": round(statistics.median(cpu), 3),
    }


def _encoded(ds: Any) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="fast build_sr calls")
    ap.add_argument("--ref-every", type=int, default=10, help="one reference build per this many fast builds")
    ap.add_argument("--sc-rounds", type=int, default=15)
    ap.add_argument("--encode-rounds", type=int, default=200, help="SR encodings, each way")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "results_speed.json")
    args = ap.parse_args()

    src, result = _source(), _result()
    first = _timed(lambda: results.build_sr(src, result, now=NOW))
    same = _encoded(results.build_sr(src, result, now=NOW)) == _encoded(
        sr_reference._build_sr_reference(src, result, now=NOW)
    )
    fast: list[tuple[float, float]] = []
    ref: list[tuple[float, float]] = []
    for i in range(args.rounds):
        fast.append(_timed(lambda: results.build_sr(src, result, now=NOW)))
        if i % args.ref_every == 0:
            ref.append(_timed(lambda: sr_reference._build_sr_reference(src, result, now=NOW)))

    sr = results.build_sr(src, result, now=NOW)
    encode_same = results.encode(sr) == _encoded(sr) == _encoded(sr_reference._build_sr_reference(src, result, now=NOW))
    enc_old: list[tuple[float, float]] = []
    enc_new: list[tuple[float, float]] = []
    for _ in range(args.encode_rounds):
        enc_old.append(_timed(lambda: _encoded(sr)))
        enc_new.append(_timed(lambda: results.encode(sr)))

    rng = np.random.default_rng(1)
    big = _source(rng.integers(0, 4096, (3000, 2500)).astype(np.uint16))
    results.build_sc(big, result, now=NOW)
    sc = [_timed(lambda: results.build_sc(big, result, now=NOW)) for _ in range(args.sc_rounds)]

    report = {
        "build_sr_fast": _summary(fast),
        "build_sr_reference_highdicom": _summary(ref),
        "build_sr_first_call_template_build_ms": round(first[0], 1),
        "build_sr_same_bytes_as_reference": same,
        "build_sc_3000x2500": _summary(sc),
        "encode_sr_pydicom_save_as": _summary(enc_old),
        "encode_sr_worker_results_encode": _summary(enc_new),
        "encode_sr_same_bytes_as_save_as_and_reference": encode_same,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None,
    }
    old_cpu, new_cpu = report["encode_sr_pydicom_save_as"], report["encode_sr_worker_results_encode"]
    print(f"{'SR encode':34} {'cpu median ms':>14} {'wall median ms':>15} {'wall min ms':>12}")
    for name, row in (("pydicom save_as", old_cpu), ("worker.results.encode", new_cpu)):
        print(f"{name:34} {row['cpu_median_ms']:>14.3f} {row['wall_median_ms']:>15.3f} {row['wall_min_ms']:>12.3f}")
    ratio = old_cpu["cpu_median_ms"] / new_cpu["cpu_median_ms"]
    print(f"ratio (cpu medians): {ratio:.1f}x; loadavg {report['loadavg']}")
    print(json.dumps(report, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
