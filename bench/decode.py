"""Benchmark: decode + preprocess of a 2,000 x 2,500 12-bit image per transfer syntax, on one core,
the old decoder path and the new one timed alternately in the same run (issue 18).

Run from the repository root:  .venv/bin/python bench/decode.py [--rounds 7] [--before REV] [--candidates]
Needs dcmtk (dcmcjpeg, dcmcjpls, dcmcrle).  Prints a table and writes bench/out/decode.json.
Not a test: timings depend on the machine and its load (os.getloadavg is recorded per row).

"before" is ``worker/imaging.py`` as of git revision REV (default: the last commit before issue
18, 105ed99), loaded from git into its own module; "after" is the working tree's.  Both see the
same in-memory data sets, one call each in turn, so that load from other processes hits both alike;
read the speed-up, not only the milliseconds, when the machine is busy.  The test image is a
gradient with Gaussian noise of sigma 200 (as bench/e2e.py), so it compresses about as badly as
detector data can: the worst case for every decoder.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core: before numpy loads
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from worker import imaging  # noqa: E402

ROWS, COLS = 2000, 2500
#: Issue 18's targets for decode + preprocess on one core, ms.
TARGETS = {
    "uncompressed": 8.0,
    "jpeg-lossless-sv1": 50.0,
    "jpeg-ls-lossless": 50.0,
    "jpeg2000-lossless": 70.0,
    "rle": None,
}
BEFORE_REV = "105ed99"


def load_before(rev: str) -> ModuleType:
    """``worker/imaging.py`` at ``rev`` as module ``imaging_before`` (it imports nothing of ours)."""
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{rev}:worker/imaging.py"], check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "imaging_before.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("imaging_before", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["imaging_before"] = mod
    spec.loader.exec_module(mod)
    return mod


def make_files(tmp: Path) -> dict[str, Path]:
    from worker.testing.dicom import make_image

    rng = np.random.default_rng(0)
    yy = np.linspace(0, 1, ROWS, dtype=np.float32)[:, None]
    pix = (yy * 2500 + rng.normal(0, 200, (ROWS, COLS))).clip(0, 4095).astype(np.uint16)
    ds = make_image(pix, stored=12, window=(2048.0, 4096.0))
    native = tmp / "uncompressed.dcm"
    ds.save_as(native, enforce_file_format=True)
    files = {"uncompressed": native}
    for kind, cmd in (
        ("jpeg-lossless-sv1", ["dcmcjpeg", "+e1"]),
        ("jpeg-ls-lossless", ["dcmcjpls"]),
        ("rle", ["dcmcrle"]),
    ):
        out = tmp / f"{kind}.dcm"
        subprocess.run([*cmd, str(native), str(out)], check=True, capture_output=True)
        files[kind] = out
    ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg, as bench/e2e.py
    files["jpeg2000-lossless"] = tmp / "jpeg2000-lossless.dcm"
    ds.save_as(files["jpeg2000-lossless"], enforce_file_format=True)
    order = ["uncompressed", "jpeg-lossless-sv1", "jpeg-ls-lossless", "jpeg2000-lossless", "rle"]
    return {k: files[k] for k in order}


def new_decoder_name(ds: pydicom.Dataset) -> str:
    ts = str(ds.file_meta.TransferSyntaxUID)
    if ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        return "native (np.frombuffer)"
    if ts in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
        return "reduced-resolution OpenJPEG via Pillow"
    names = [d.name for d in imaging.fast_decoders(ts)]
    return names[0] if names else "pydicom (its default plugin order)"


def bench(files: dict[str, Path], before: ModuleType, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for kind, path in files.items():
        ds = pydicom.dcmread(path)
        load0 = os.getloadavg()
        old_out, new_out = before.preprocess(ds), imaging.preprocess(ds)  # warm both (tables, plugins)
        t: dict[str, list[float]] = {"before": [], "after": [], "before_decode": [], "after_decode": []}
        for _ in range(rounds):
            for name, mod in (("before", before), ("after", imaging)):
                timings: dict[str, float] = {}
                t0 = time.perf_counter()
                mod.preprocess(ds, timings=timings)
                t[name].append((time.perf_counter() - t0) * 1e3)
                t[f"{name}_decode"].append(timings.get("decode_ms", float("nan")))
        load1 = os.getloadavg()
        med = {k: round(statistics.median(v), 1) for k, v in t.items()}
        target = TARGETS[kind]
        rows.append(
            {
                "transfer_syntax": kind,
                "uid": str(ds.file_meta.TransferSyntaxUID),
                "encoded_bytes": path.stat().st_size,
                "before_ms": med["before"],
                "after_ms": med["after"],
                "before_decode_ms": med["before_decode"],
                "after_decode_ms": med["after_decode"],
                "speedup": round(med["before"] / med["after"], 2),
                "after_min_ms": round(min(t["after"]), 1),
                "target_ms": target,
                "met": None if target is None else med["after"] <= target,
                "decoder_after": new_decoder_name(ds),
                "same_model_input": bool(np.array_equal(old_out, new_out)),
                "loadavg_before": [round(x, 2) for x in load0],
                "loadavg_after": [round(x, 2) for x in load1],
            }
        )
    return rows


def candidates(files: dict[str, Path], rounds: int) -> list[dict[str, Any]]:
    """Decode only, every installed decoder per syntax: pydicom's plugins one by one and the
    imagecodecs functions; bit-exact against pydicom's default choice.  How decoders.py was chosen."""
    from pydicom.encaps import generate_frames
    from pydicom.pixels.decoders.base import get_decoder

    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    direct = {
        "jpeg-lossless-sv1": ("jpeg8_decode", "ljpeg_decode"),
        "jpeg-ls-lossless": ("jpegls_decode",),
        "jpeg2000-lossless": ("jpeg2k_decode",),
    }
    out = []
    for kind, path in files.items():
        if kind == "uncompressed":
            continue
        ds = pydicom.dcmread(path)
        decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        reference, _ = decoder.as_array(ds, index=0)
        runs: dict[str, Any] = {
            f"pydicom/{p}": (lambda p=p, decoder=decoder, ds=ds: decoder.as_array(ds, index=0, decoding_plugin=p)[0])
            for p in decoder.available_plugins
        }
        for fn in direct.get(kind, ()) if imagecodecs is not None else ():
            runs[f"imagecodecs.{fn}"] = lambda fn=fn, frame=frame: getattr(imagecodecs, fn)(frame)
        for name, run in runs.items():
            load0 = os.getloadavg()[0]
            try:
                arr = run()
                times = []
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    run()
                    times.append((time.perf_counter() - t0) * 1e3)
            except Exception as exc:  # noqa: BLE001 - a decoder that cannot read it is a result too
                out.append({"transfer_syntax": kind, "decoder": name, "error": str(exc)[:200]})
                continue
            out.append({"transfer_syntax": kind, "decoder": name, "median_ms": round(statistics.median(times), 1),
                        "min_ms": round(min(times), 1), "bit_exact": bool(np.array_equal(arr, reference)),
                        "loadavg": [load0, round(os.getloadavg()[0], 2)]})
    return out


def _versions() -> dict[str, str]:
    out = {}
    for pkg in (
        "pydicom",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "pyjpegls",
        "imagecodecs",
        "pillow",
        "numpy",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="timed calls per path and syntax (alternating)")
    ap.add_argument("--before", default=BEFORE_REV, help="git revision of worker/imaging.py to compare with")
    ap.add_argument("--candidates", action="store_true", help="also time every installed decoder, decode only")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):  # one core
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    before = load_before(args.before)
    with tempfile.TemporaryDirectory() as tmp:
        files = make_files(Path(tmp))
        rows = bench(files, before, args.rounds)
        cands = candidates(files, max(3, args.rounds // 2)) if args.candidates else []
    print(f"decode + preprocess, {ROWS} x {COLS} 12-bit, one core, median of {args.rounds} (before = {args.before})")
    head = (f"{'transfer syntax':20} {'before':>8} {'after':>8} {'x':>6} {'target':>7} {'met':>4}  {'load 1-min':>11}"
            "  decoder (after)")
    print(head)
    for r in rows:
        tgt = "-" if r["target_ms"] is None else f"{r['target_ms']:.0f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        load = f"{r['loadavg_before'][0]:.2f}/{r['loadavg_after'][0]:.2f}"
        print(
            f"{r['transfer_syntax']:20} {r['before_ms']:8.1f} {r['after_ms']:8.1f} {r['speedup']:6.2f}"
            f" {tgt:>7} {met:>4}  {load:>11}  {r['decoder_after']}"
            + ("" if r["same_model_input"] else "  (model input differs!)")
        )
    if cands:
        print("\ndecode only, every installed decoder (median / min ms, bit-exact vs pydicom's default)")
        for c in cands:
            if "error" in c:
                print(f"{c['transfer_syntax']:20} {c['decoder']:34} error: {c['error'][:60]}")
            else:
                print(f"{c['transfer_syntax']:20} {c['decoder']:34} {c['median_ms']:7.1f} {c['min_ms']:7.1f}  "
                      f"{'exact' if c['bit_exact'] else 'DIFFERS'}  load {c['loadavg'][0]:.2f}/{c['loadavg'][1]:.2f}")
    out = {
        "rows": rows,
        "candidates": cands,
        "rounds": args.rounds,
        "before_rev": args.before,
        "machine": {"platform": platform.platform(), "cpu": platform.processor(), "cores": os.cpu_count(),
                    "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None},
        "versions": _versions(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    dest = REPO / "bench" / "out" / "decode.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
