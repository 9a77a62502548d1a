"""The demo: the main job end to end on the embedded defaults, in one command.

``cxr-triage demo`` starts a real node (``cxr-triage serve`` in its own process: SQLite, local
spool, the default model, continuous batches), sends the sample studies to it with a real DICOM
client (dcmtk ``storescu`` when installed, else pynetdicom), waits until every sample is screened
and its Structured Report is stored at the destination, prints the triage table, and stops the
node (SIGTERM, the same orderly stop as under systemd).  ``--keep-running`` leaves the node up
afterwards for a real PACS to send to.

The demo's data folder (``<storage.data_dir>/demo`` unless ``--data-dir``) is marked as the
demo's own and cleared at the next run, so the samples (which keep their UIDs) are screened again
rather than acknowledged as re-sends; a folder that is not marked is never cleared.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker import store
from worker.settings import Destination, Settings, SettingsError

__all__ = ["Sample", "find_samples", "read_samples", "run"]

MARKER = ".cxr-triage-demo"
#: The folder the samples ship in, in a source checkout.
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "samples"
FINAL = {store.State.DONE.value, store.State.SKIPPED.value, store.State.FAILED.value}


@dataclass(frozen=True)
class Sample:
    """One sample file and what its source collection says it shows."""

    path: Path
    expected: str
    sop_instance_uid: str


def find_samples(explicit: Path | None) -> Path:
    """``--samples DIR``, else the checkout's ``samples/``, else ``./samples``."""
    for candidate in ([explicit] if explicit else [SAMPLES_DIR, Path.cwd() / "samples"]):
        if candidate is not None and candidate.is_dir() and any(candidate.glob("*.dcm")):
            return candidate
    raise SettingsError(f"no sample DICOM files (*.dcm) in {explicit or SAMPLES_DIR}: pass --samples DIR")


def read_samples(folder: Path) -> list[Sample]:
    """The ``*.dcm`` files of ``folder``, with ``expected`` from its ``samples.csv`` when there is one."""
    import pydicom

    expected: dict[str, str] = {}
    listing = folder / "samples.csv"
    if listing.is_file():
        with listing.open(newline="") as f:
            expected = {r["file"]: r.get("expected", "") for r in csv.DictReader(f)}
    out = []
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        out.append(Sample(path, expected.get(path.name, ""), str(ds.SOPInstanceUID)))
    return out


def card_accuracy(raw: Any) -> float | None:
    """The deployed model's overall test accuracy as the card records it, if it does."""
    try:
        m = raw["metrics"]
        return float(m[m["deployed"]]["overall"]["accuracy"])
    except (KeyError, TypeError, ValueError):
        return None


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def _prepare(data_dir: Path) -> None:
    """A fresh demo folder: create it, or clear one a previous demo made; never touch anything else."""
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / MARKER).exists():
            raise SettingsError(
                f"storage.data_dir: {data_dir} is not empty and was not made by the demo; "
                "pass --data-dir with a new or a previous demo's folder"
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (data_dir / MARKER).write_text("made by `cxr-triage demo`; cleared at its next run\n")


def _echo(host: str, port: int, ae_title: str, timeout: float = 5.0) -> bool:
    """True once the node answers a C-ECHO (after a plain TCP check, to keep the wait quiet)."""
    import socket

    from pynetdicom import AE

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    ae = AE(ae_title="DEMO")
    ae.acse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


#: storescu proposes one compressed transfer syntax per run (plus the uncompressed ones).
_STORESCU_PROPOSE = {
    "1.2.840.10008.1.2.4.90": ["-xv"],  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ["-xw"],  # JPEG 2000
    "1.2.840.10008.1.2.4.70": ["-xs"],  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": ["-xt"],  # JPEG-LS lossless
    "1.2.840.10008.1.2.5": ["-xr"],  # RLE
}


def _send_storescu(files: list[Path], host: str, port: int, ae_title: str) -> int:
    """One ``storescu`` run per transfer syntax, each proposing that syntax."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(ts, []).append(f)
    rc = 0
    for ts, group in groups.items():
        cmd = ["storescu", *_STORESCU_PROPOSE.get(ts, []), "-aet", "DEMO", "-aec", ae_title, host, str(port),
               *map(str, group)]
        _say(f"sending {len(group)} with dcmtk: {' '.join(cmd[:-len(group)])} ...")
        rc = rc or subprocess.run(cmd).returncode
    return rc


def _send_pynetdicom(files: list[Path], host: str, port: int, ae_title: str) -> int:
    """C-STORE every file over one association, each with its own transfer syntax proposed."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title="DEMO")
    for ctx in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(ctx[0], [ctx[1]])
    _say(f"sending with pynetdicom to {ae_title}@{host}:{port} ({len(files)} files)")
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        _say("association refused")
        return 1
    failed = 0
    for d in datasets:
        status = assoc.send_c_store(d)
        failed += not (status and status.Status == 0)
    assoc.release()
    return 1 if failed else 0


def _snapshot(db: store.Database, uids: list[str]) -> dict[str, dict[str, Any]]:
    """Per sample: the instance row (``as_dict``, as ``query`` prints it) with its deliveries."""
    found = store.instances_by_uid(db, uids)
    rows = {r.sop_instance_uid: r.as_dict() for r in found}
    ids = {r.id: r.sop_instance_uid for r in found}
    deliveries = store.deliveries_of(db, list(ids))
    for i, uid in ids.items():
        rows[uid]["_deliveries"] = deliveries.get(i, [])
    return rows


def _finished(row: dict[str, Any] | None) -> bool:
    if row is None or row["state"] not in FINAL:
        return False
    pending = [
        d for d in row["_deliveries"] if d["state"] not in (store.SendState.SENT.value, store.SendState.FAILED.value)
    ]
    return not pending


def _latency(row: dict[str, Any]) -> str:
    sent = [d["sent_at"] for d in row["_deliveries"] if d["kind"] == "sr" and d["sent_at"] is not None]
    if not sent:
        return "-"

    def when(iso: str) -> dt.datetime:
        return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))

    return f"{(max(map(when, sent)) - when(row['received_at'])).total_seconds():.2f} s"


def _table(samples: list[Sample], rows: dict[str, dict[str, Any]], classes: list[str]) -> list[str]:
    head = ["sample", "expected", "predicted", *[f"P({c})" for c in classes], "priority", "latency", "SR"]
    body = []
    for smp in samples:
        r = rows.get(smp.sop_instance_uid)
        if r is None:
            body.append([smp.path.name, smp.expected or "?", "not received", *["" for _ in classes], "", "", ""])
            continue
        probs = r.get("probabilities") or {}
        predicted = r["predicted_class"] or f"{r['state']}: {r.get('reason') or ''}"[:40]
        sr = ",".join(sorted({d["state"] for d in r["_deliveries"] if d["kind"] == "sr"})) or "-"
        body.append([smp.path.name, smp.expected or "?", predicted,
                     *[f"{probs[c]:.3f}" if c in probs else "" for c in classes],
                     r.get("priority") or "", _latency(r), sr])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), fmt.format(*["-" * w for w in widths]), *(fmt.format(*b) for b in body)]


def _listening_port(log_path: Path, aet: str) -> int | None:
    """The port the demo's node printed (``cxr-triage listening as AET on port N``), once it has."""
    import re

    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    found = re.findall(rf"^cxr-triage listening as {re.escape(aet)} on port (\d+)$", text, re.MULTILINE)
    return int(found[-1]) if found else None


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The ``demo`` subcommand (see the module docstring)."""
    import logging

    from worker.modelcard import ModelCard
    from worker.node import model_dir as resolve_model_dir

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # the node's own log is in node.log
    if settings.storage.database_url:
        raise SettingsError("storage.database_url: the demo runs on its own embedded SQLite database; unset it")
    data_dir = Path(args.data_dir) if args.data_dir else settings.storage.data_dir / "demo"
    model_dir = resolve_model_dir(settings)
    card = ModelCard.load(model_dir)
    samples = read_samples(find_samples(Path(args.samples) if args.samples else None))
    host, port, aet = "127.0.0.1", settings.listener.port, settings.listener.ae_title
    from worker import preflight

    try:  # another DICOM server on the port would otherwise answer the C-ECHO and get the samples
        preflight.check_bind("listener", host, port)
    except preflight.StartupError as exc:
        raise preflight.StartupError(f"{exc}; pass --port N for the demo's node") from None
    _prepare(data_dir)
    # Results go to <data-dir>/results unless destinations were given (flags, or the config/env
    # the node inherits).
    default_folder = settings.destinations is None
    dests = [Destination(name="folder", type="folder", path=data_dir / "results")] if default_folder \
        else settings.result_destinations

    _say(f"model: {card.name} {card.version} ({card.precision}), classes {', '.join(card.classes)}")
    want_heatmaps = bool(args.heatmap or settings.send.heatmap)
    if want_heatmaps:  # issue 17: say at once when this model cannot give them
        from worker import heatmap as heatmapmod

        try:
            heatmapmod.load(card)
            _say("heatmaps: on (a colour Secondary Capture per image, referenced from its SR)")
        except heatmapmod.HeatmapUnavailable as exc:
            _say(f"heatmaps: asked for, but not available: {exc}")
    _say(f"data folder: {data_dir.resolve()}")
    cmd = [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(data_dir), "--bind", host,
           "--port", str(port), "--model", str(model_dir)]
    if args.config:
        cmd += ["--config", args.config]
    if args.web_port is not None:
        cmd += ["--web-port", str(args.web_port)]
    for spec in args.destination or ([f"folder:{data_dir / 'results'}"] if default_folder else []):
        cmd += ["--destination", spec]
    log_path = data_dir / "node.log"
    _say(f"starting the node: {aet} on {host}:{port} (log: {log_path})")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("CXR_TRIAGE_CONFIG", "")  # never the host's /etc/cxr-triage/node.toml (a production node's PACS)
    if args.heatmap:
        env["CXR_TRIAGE_SEND_HEATMAP"] = "true"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + args.start_timeout
        # Talk only to the node started here: it says on which port it listens once it holds it
        # (then no other server can), and it must still be running when the C-ECHO is answered.
        while True:
            bound = _listening_port(log_path, aet)
            if (
                bound is not None
                and proc.poll() is None
                and _echo(host, bound, aet, timeout=2.0)
                and proc.poll() is None
            ):
                port = bound
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                _say(f"the node did not start (exit {proc.poll()}); the end of its log:")
                print("".join(log_path.read_text(errors="replace").splitlines(True)[-20:]), file=sys.stderr)
                return 1
            time.sleep(0.5)
        _say(f"node is up on port {port} (C-ECHO answered)")

        files = [s.path for s in samples]
        t0 = time.monotonic()
        rc = (_send_storescu if shutil.which("storescu") and not args.pynetdicom else _send_pynetdicom)(
            files, host, port, aet
        )
        if rc != 0:
            _say(f"the DICOM client reported a failure (exit {rc}); waiting for what was accepted")
        db = store.Database.open(dataclasses.replace(settings.storage, data_dir=data_dir).url, upgrade=False)
        try:
            uids = [s.sop_instance_uid for s in samples]
            last = ""
            while True:
                rows = _snapshot(db, uids)
                done = sum(_finished(rows.get(u)) for u in uids)
                screened = sum(1 for u in uids if rows.get(u) and rows[u]["state"] in FINAL)
                line = f"received {len(rows)}/{len(uids)}, screened {screened}, results stored {done}"
                if line != last:
                    _say(line)
                    last = line
                if done == len(uids) or (rc != 0 and len(rows) == done):
                    break
                if time.monotonic() - t0 > args.timeout:
                    _say(f"gave up waiting after {args.timeout:.0f} s")
                    break
                if proc.poll() is not None:
                    _say(f"the node stopped unexpectedly (exit {proc.returncode}); see {log_path}")
                    break
                time.sleep(0.3)
        finally:
            db.close()
        print()
        for line in _table(samples, rows, list(card.classes)):
            print(line)
        print()
        matched = sum(
            1 for s in samples if s.expected and rows.get(s.sop_instance_uid, {}).get("predicted_class") == s.expected
        )
        known = sum(1 for s in samples if s.expected)
        acc = card_accuracy(card.raw)
        measured = f"; the model card measured {acc * 100:.1f} % accuracy on its test split" if acc is not None else ""
        _say(f"{matched} of {known} samples predicted as their collection's label{measured}")
        _say("latency = DICOM receipt to the Structured Report stored at the destination")
        for d in dests:
            if d.message_based:
                _say(f"{d.type.upper()} messages ({d.name}): {d.url or f'{d.host}:{d.port}'}")
                continue
            where = d.path.resolve() if d.type == "folder" and d.path is not None else f"{d.ae_title}@{d.host}:{d.port}"
            _say(f"SR objects ({d.name}): {where}")
            if want_heatmaps and d.type == "folder" and d.path is not None:
                n_hm = _count_heatmaps(d.path)
                _say(f"heatmap Secondary Captures ({d.name}): {n_hm} in {where} "
                     "(series 'AI heatmap - not for diagnosis')")
        _say(f"the triage database: cxr-triage query --data-dir {data_dir}")
        if args.web_port is not None:
            _say(f"the worklist page: http://127.0.0.1:{args.web_port}/")
        ok = all(_finished(rows.get(u)) for u in uids) and rc == 0
        if args.keep_running and proc.poll() is None:
            _say(f"the node keeps running: {aet} on {host}:{port}; Ctrl-C stops it")
            try:
                proc.wait()
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        code = _stop(proc)
        _say(f"node stopped (exit {code})")


def _count_heatmaps(folder: Path) -> int:
    """Heatmap SCs (worker/overlay.py) among the result files in ``folder``."""
    from pydicom import dcmread

    from worker.overlay import HEATMAP_DISCLAIMER

    n = 0
    for p in folder.glob("*") if folder.is_dir() else []:
        try:
            ds = dcmread(p, stop_before_pixels=True, specific_tags=["SeriesDescription"])
        except Exception:  # noqa: BLE001 - not a DICOM file: not a heatmap
            continue
        n += str(ds.get("SeriesDescription", "")) == HEATMAP_DISCLAIMER
    return n


def add_parser(sub: Any, common: Any) -> None:
    """The ``demo`` subcommand's options (``common`` adds the shared ones)."""
    p = sub.add_parser("demo", help="start a node, send it the sample studies, print the triage table, stop")
    common(p)
    p.add_argument("--model", metavar="DIR", help="a model folder instead of the default model [model.path]")
    p.add_argument("--destination", action="append", metavar="SPEC",
                   help="send the results here instead of <data-dir>/results (AET@host:port, folder:PATH, "
                        "hl7:HOST:PORT, fhir:URL)")
    p.add_argument("--port", type=int, help="the node's DICOM port [listener.port]")
    p.add_argument("--samples", metavar="DIR", help="folder of DICOM files (default: the shipped samples)")
    p.add_argument("--keep-running", action="store_true", help="leave the node running after the table")
    p.add_argument("--web-port", type=int, metavar="N", help="also serve the worklist page on 127.0.0.1:N (extra: web)")
    p.add_argument("--pynetdicom", action="store_true", help="send with pynetdicom even when storescu is installed")
    p.add_argument("--heatmap", action="store_true",
                   help="also send a heatmap Secondary Capture per image [send.heatmap]; "
                        "needs a model with heatmap outputs")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all results (default 300)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the node to start")
