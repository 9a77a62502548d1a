"""The batch pipeline: claim -> read -> filter -> preprocess -> infer -> build result -> store -> send.

``run_batch`` reads top to bottom as one function on purpose: it is the whole life of a job
after intake. It shares nothing with the listener but the database and the spool.

Where a job ends:

* ``skipped``: the input is not something this model should screen, or cannot be read
  (filters.check's reason, undecodable or inconsistent pixel data). Retrying would not help.
* ``failed``: something on our side went wrong (stored file unreadable, inference error).
  It goes back to ``queued`` until ``batch.max_attempts`` is reached, keeping the last reason.
* ``done``: probabilities, predicted class and triage priority stored with the model's
  name, version and precision, in the same commit as one delivery row per result object and
  destination; the result objects are already durable in the spool. Sending comes after the
  commit, so a failed send loses nothing (worker/sender.py retries it).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from worker import audit as audit_log
from worker import filters, imaging, results, sender, store
from worker.engine import Engine
from worker.priority import PriorityMap
from worker.settings import Destination, Settings
from worker.spool import Spool, SpoolError
from worker.store import Outcome, State

log = logging.getLogger(__name__)


#: Lease owners made by this process (never reclaimed as a dead process's, even where an earlier
#: process had the same pid, e.g. pid 1 in a container).
_OWN_OWNERS: set[str] = set()


def worker_id() -> str:
    """A lease owner name unique to this process: host, pid and a random suffix."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _OWN_OWNERS.add(owner)
    return owner


def _pid_alive(pid: int) -> bool:
    """True when a process with this id exists on this host (``kill(pid, 0)``); our own pid counts
    as gone, because a lease of it not made by this process is an earlier process's (restarted
    with the same pid)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def reclaim_dead_leases(db: store.Database, audit: audit_log.AuditLog = audit_log.NULL) -> int:
    """At start: take back at once the jobs leased by an earlier process of this host that is
    gone (crash, SIGKILL), instead of after ``batch.lease_seconds``; returns how many."""
    found = store.reclaim_dead_leases(db, socket.gethostname(), _pid_alive, exclude=_OWN_OWNERS)
    for owner, n in found.items():
        log.info("took back %d job(s) leased by %s, a process of this host that is gone", n, owner)
        audit.record("leases_reclaimed", owner=owner, jobs=n)
    return sum(found.values())


@dataclass
class BatchReport:
    """What one batch did (for logs, the CLI and benchmarks)."""

    claimed: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    #: Result objects that could not be written to the spool (disk full): drain stops there.
    storage_errors: int = 0
    #: Nothing was claimed because the spool is below its free-space reserve.
    disk_reserve_reached: bool = False

    def add(self, other: BatchReport) -> None:
        self.storage_errors += other.storage_errors
        self.disk_reserve_reached = self.disk_reserve_reached or other.disk_reserve_reached
        self.claimed += other.claimed
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed
        self.seconds += other.seconds
        for k, v in other.stage_seconds.items():
            self.stage_seconds[k] = self.stage_seconds.get(k, 0.0) + v


def run_batch(
    db: store.Database,
    spool: Spool,
    engine: Engine,
    settings: Settings,
    owner: str,
    audit: audit_log.AuditLog = audit_log.NULL,
    *,
    on_results: Callable[[], None] | None = None,
) -> BatchReport:
    """Claim up to ``batch.size`` jobs and take each to done, skipped or failed.

    Result objects are sent at the end of the batch, unless ``on_results`` is given: then it is
    called once they are committed, and sending is left to a :class:`worker.sender.BackgroundSender`.
    """
    t_start = time.perf_counter()
    stage = {"claim": 0.0, "read": 0.0, "filter": 0.0, "preprocess": 0.0, "infer": 0.0, "build": 0.0, "store": 0.0,
             "send": 0.0}
    card = engine.card
    pmap = PriorityMap.build(card, settings.triage.priorities, settings.triage.thresholds)
    spec = imaging.PreprocessSpec.from_card(engine.card.raw)
    spec = imaging.PreprocessSpec(**{**spec.__dict__, "max_bytes": settings.model.max_image_mb * 2**20})

    # 0. no claim while the spool is below its reserve: each result object needs room, and a
    # batch that fails on a full disk would spend every job's attempts in seconds.
    if not spool.has_room():
        log.warning("spool below its free-space reserve (%d MB): no batch until space is freed",
                    settings.storage.disk_reserve_mb)
        return BatchReport(seconds=time.perf_counter() - t_start, stage_seconds=stage, disk_reserve_reached=True)

    # 1. claim
    t = time.perf_counter()
    claimed = store.claim_batch(db, settings.batch.size, owner, settings.batch.lease_seconds)
    stage["claim"] += time.perf_counter() - t
    if not claimed:
        return BatchReport(seconds=time.perf_counter() - t_start, stage_seconds=stage)

    outcomes: dict[int, Outcome] = {}
    ready: list[tuple[store.Claimed, Dataset, np.ndarray, dict[str, float]]] = []
    # re-screened jobs (cxr-triage rescreen) whose result by this very model version is still in
    # the spool: that object is sent again as it is (same UIDs, same bytes), not rebuilt
    previous = store.previous_results(db, [job.id for job in claimed])
    deliveries: dict[int, list[store.NewDelivery]] = {}
    reused: set[int] = set()
    for job in claimed:
        timing: dict[str, float] = {}

        # 2. read the stored object (pixels stay encoded until preprocess)
        t = time.perf_counter()
        try:
            ds: Dataset = dcmread(spool.path(job.path))
        except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
            outcomes[job.id] = Outcome(job.id, State.SKIPPED, f"stored object is not readable DICOM: {exc}")
            continue
        except OSError as exc:
            outcomes[job.id] = Outcome(job.id, State.FAILED, f"stored file could not be read: {exc.strerror or exc}")
            continue
        timing["read_ms"] = (time.perf_counter() - t) * 1e3
        stage["read"] += time.perf_counter() - t
        cut = _truncated_element(ds)
        if cut:
            outcomes[job.id] = Outcome(job.id, State.SKIPPED, cut, timings=timing)
            continue

        # 3. filter: is this a frontal chest radiograph we can read?
        t = time.perf_counter()
        reason = filters.check(ds)
        stage["filter"] += time.perf_counter() - t
        if reason:
            outcomes[job.id] = Outcome(job.id, State.SKIPPED, reason, timings=timing)
            continue
        same = _same_version_result(job, ds, previous.get(job.id), card, spool, settings)
        if same is not None:
            prev, kept = same
            deliveries[job.id] = kept
            reused.add(job.id)
            outcomes[job.id] = Outcome(
                job.id, State.DONE, predicted_class=prev.predicted_class, probabilities=prev.probabilities,
                priority=prev.priority, triage_reason=prev.triage_reason,
                timings={k: round(v, 3) for k, v in timing.items()},
            )
            continue

        # 4. preprocess: the same code training uses
        t = time.perf_counter()
        try:
            tensor = imaging.preprocess(ds, spec, timings=timing)
        except imaging.PixelError as exc:
            outcomes[job.id] = Outcome(job.id, State.SKIPPED, f"pixel data: {exc}", timings=timing)
            continue
        except MemoryError:
            outcomes[job.id] = Outcome(job.id, State.SKIPPED, "pixel data too large to decode", timings=timing)
            continue
        except Exception as exc:  # a decoder bug or an input we did not foresee
            log.exception("preprocessing %s failed", job.sop_instance_uid)
            outcomes[job.id] = Outcome(job.id, State.FAILED, f"preprocessing error: {type(exc).__name__}: {exc}")
            continue
        if not settings.send.secondary_capture:
            del ds.PixelData  # the SR needs the header only; keep memory flat
        # preprocess_ms: LUTs, crop, resize, normalisation (decode_ms, measured inside, excluded)
        timing["preprocess_ms"] = (time.perf_counter() - t) * 1e3 - timing.get("decode_ms", 0.0)
        stage["preprocess"] += time.perf_counter() - t
        ready.append((job, ds, tensor, timing))

    # 5. infer the batch
    probs_rows: list[dict[str, float]] = []
    if ready:
        t = time.perf_counter()
        try:
            probs_rows = engine.probabilities(np.stack([x for _, _, x, _ in ready]))
        except Exception as exc:
            log.exception("inference failed for a batch of %d", len(ready))
            for job, _, _, _ in ready:
                outcomes[job.id] = Outcome(job.id, State.FAILED, f"inference failed: {type(exc).__name__}: {exc}")
            ready = []
        stage["infer"] += time.perf_counter() - t
        per_image_ms = (time.perf_counter() - t) * 1e3 / max(len(ready), 1)

    # 6. triage each image and build its result objects (durable in the spool before the commit)
    storage_errors = 0
    destinations = settings.result_destinations
    t = time.perf_counter()
    for (job, ds, _, timing), probs in zip(ready, probs_rows, strict=True):
        timing["infer_ms"] = per_image_ms
        decision = pmap.decide(probs)
        predicted = max(probs, key=probs.__getitem__)
        rounded = {k: round(float(v), 6) for k, v in probs.items()}
        result = results.TriageResult(
            predicted_class=predicted, probabilities=rounded, priority=decision.priority,
            triage_reason=decision.reason, thresholds=pmap.thresholds, model_name=card.name,
            model_version=card.version, model_sha256=card.bin_sha256, model_precision=engine.precision,
        )
        tb = time.perf_counter()
        try:
            objects = [("sr", results.build_sr(ds, result))]
            if settings.send.secondary_capture:
                objects.append(("sc", results.build_sc(ds, result)))
            items: list[store.NewDelivery] = []
            for kind, obj in objects:
                rel = Spool.result_relpath_for(str(obj.SOPInstanceUID))
                spool.write(rel, _encode(obj))
                items += [
                    store.NewDelivery(d.name, kind, str(obj.SOPClassUID), str(obj.SOPInstanceUID), rel)
                    for d in destinations if not d.message_based
                ]
            items += _messages(ds, result, objects[0][1], [d for d in destinations if d.message_based], spool)
        except SpoolError as exc:
            storage_errors += 1
            outcomes[job.id] = Outcome(job.id, State.FAILED, f"could not store result object: {exc.strerror}")
            continue
        except Exception as exc:  # a source header the result builder cannot use
            log.exception("building the result of %s failed", job.sop_instance_uid)
            outcomes[job.id] = Outcome(job.id, State.FAILED, f"could not build result: {type(exc).__name__}: {exc}")
            continue
        timing["build_ms"] = (time.perf_counter() - tb) * 1e3
        deliveries[job.id] = items
        outcomes[job.id] = Outcome(
            job.id, State.DONE, predicted_class=predicted, probabilities=rounded, priority=decision.priority,
            triage_reason=decision.reason, timings={k: round(v, 3) for k, v in timing.items()},
        )
    stage["build"] += time.perf_counter() - t

    # 7. store results, deliveries and states in one commit
    t = time.perf_counter()
    applied = store.finish(
        db,
        owner,
        outcomes.values(),
        deliveries=deliveries,
        model_name=card.name,
        model_version=card.version,
        model_precision=engine.precision,
        max_attempts=settings.batch.max_attempts,
    )
    stage["store"] += time.perf_counter() - t
    uids = {job.id: job.sop_instance_uid for job in claimed}
    for o in outcomes.values():
        if o.job_id not in applied:  # lease lost to another worker: its outcome counts, not ours
            continue
        audit.record("job_finished", sop_instance_uid=uids[o.job_id], state=o.state.value, reason=o.reason,
                     predicted_class=o.predicted_class, priority=o.priority, model_version=card.version)
        for d in deliveries.get(o.job_id, []) if o.state is State.DONE else []:
            audit.record("result_produced", source_sop_instance_uid=uids[o.job_id], kind=d.kind,
                         sop_instance_uid=d.sop_instance_uid, destination=d.destination,
                         reused=True if o.job_id in reused else None)

    # 8. send what is due (this batch's results, and retries that have come due)
    t = time.perf_counter()
    if deliveries:
        if on_results is not None:
            on_results()
        else:
            sender.send_due(db, spool, settings, audit=audit)
    stage["send"] += time.perf_counter() - t

    report = BatchReport(
        claimed=len(claimed),
        done=sum(o.state is State.DONE for o in outcomes.values()),
        skipped=sum(o.state is State.SKIPPED for o in outcomes.values()),
        failed=sum(o.state is State.FAILED for o in outcomes.values()),
        seconds=time.perf_counter() - t_start,
        stage_seconds=stage,
        storage_errors=storage_errors,
    )
    audit.record("batch_finished", claimed=report.claimed, done=report.done, skipped=report.skipped,
                 failed=report.failed, ms=round(report.seconds * 1e3, 1),
                 stage_ms={k: round(v * 1e3, 2) for k, v in stage.items()})
    log.info(
        "batch: %d claimed, %d done, %d skipped, %d failed in %.2f s",
        report.claimed, report.done, report.skipped, report.failed, report.seconds,
    )
    return report


def _messages(
    source: Dataset, result: results.TriageResult, sr: Dataset, destinations: list[Destination], spool: Spool
) -> list[store.NewDelivery]:
    """One message per HL7 / FHIR destination, written to the spool beside the SR it reports.

    The delivery row names the SR's UID (deterministic, so a re-screen replaces the message) and
    the message file; the sender transmits the file as it is, so every retry sends the same bytes.
    """
    out: list[store.NewDelivery] = []
    sr_uid = str(sr.SOPInstanceUID)
    for d in destinations:
        rel = _message_relpath(sr_uid, d)
        if d.type == "hl7":
            from worker import hl7

            data = hl7.build_oru(source, result, d, sr_uid).encode("utf-8")
        else:
            from worker import fhir

            data = fhir.build_bundle(source, result, sr_uid)
        spool.write(rel, data)
        out.append(store.NewDelivery(d.name, d.type, str(sr.SOPClassUID), sr_uid, rel))
    return out


def _message_relpath(sr_uid: str, dest: Destination) -> str:
    """Spool path of the HL7 / FHIR message that reports the SR ``sr_uid`` to ``dest``."""
    stem = Spool.result_relpath_for(sr_uid).removesuffix(".dcm")
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", dest.name)
    return f"{stem}.{safe}.{'hl7' if dest.type == 'hl7' else 'json'}"


def _same_version_result(
    job: store.Claimed, ds: Dataset, prev: store.PreviousResult | None, card: object, spool: Spool, settings: Settings
) -> tuple[store.PreviousResult, list[store.NewDelivery]] | None:
    """The deliveries that re-send this job's stored result objects unchanged, when its previous
    result came from the model screening now (name and version) and every object this node sends
    (SR, and SC when enabled) is still in the spool; else None (screen and build anew).

    Result UIDs depend on the source and the model version only (results.result_uids), so a new
    version makes new objects and this one re-sends the objects the PACS already has.
    """
    name, version = getattr(card, "name", None), getattr(card, "version", None)
    if prev is None or (prev.model_name, prev.model_version) != (name, version):
        return None
    study = str(ds.get("StudyInstanceUID", "") or "")
    if not study:
        return None
    uids = results.result_uids(job.sop_instance_uid, study, str(name), str(version))
    kinds = [("sr", str(uids.sr_instance))]
    if settings.send.secondary_capture:
        kinds.append(("sc", str(uids.sc_instance)))
    items: list[store.NewDelivery] = []
    for kind, uid in kinds:
        rel = Spool.result_relpath_for(uid)
        try:
            stored = dcmread(spool.path(rel), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        except (OSError, ValueError, InvalidDicomError, EOFError, KeyError):
            return None  # gone (purged) or unreadable: build anew
        if str(stored.get("SOPInstanceUID", "")) != uid:
            return None
        items += [store.NewDelivery(d.name, kind, str(stored.SOPClassUID), uid, rel)
                  for d in settings.result_destinations if not d.message_based]
        if kind == "sr":
            for d in (d for d in settings.result_destinations if d.message_based):
                msg = _message_relpath(uid, d)
                if not spool.path(msg).is_file():
                    return None  # the HL7 / FHIR message was not kept: build anew
                items.append(store.NewDelivery(d.name, d.type, str(stored.SOPClassUID), uid, msg))
    return prev, items


def _truncated_element(ds: Dataset) -> str | None:
    """A reason when a top-level element declares more bytes than the object holds.

    pydicom reads such a value to the end of the file without an error, so a forged length
    (up to 4 GB) or an object cut short would otherwise surface as a misleading "no pixel
    data" (the element swallowed everything after it). Raw elements only: nothing is decoded.
    """
    from pydicom.dataelem import RawDataElement

    for elem in ds.elements():
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        if isinstance(elem.value, (bytes, bytearray)) and len(elem.value) < elem.length:
            return (
                f"stored object is truncated: element ({elem.tag.group:04X},{elem.tag.element:04X}) declares "
                f"{elem.length} bytes but only {len(elem.value)} follow"
            )
    return None


def _encode(ds: Dataset) -> bytes:
    """A result object in the DICOM file format (PS3.10), ready for the spool."""
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def drain(
    db: store.Database,
    spool: Spool,
    engine: Engine,
    settings: Settings,
    owner: str,
    *,
    should_stop: Callable[[], bool] | None = None,
    audit: audit_log.AuditLog = audit_log.NULL,
    on_results: Callable[[], None] | None = None,
) -> BatchReport:
    """Run batches until the queue is empty (or ``should_stop`` says so); ``on_results`` as in
    :func:`run_batch`."""
    total = BatchReport()
    while True:
        report = run_batch(db, spool, engine, settings, owner, audit, on_results=on_results)
        total.add(report)
        if report.claimed == 0 or (should_stop is not None and should_stop()):
            return total
        if report.storage_errors:
            # Disk full (or failing): the failed jobs went back to the queue with an attempt
            # spent and the reason kept; retrying them at once would spend the rest. The next
            # scheduled run tries again (and claims nothing while below the reserve).
            log.error("%d result object(s) could not be stored; stopping this run", report.storage_errors)
            return total
