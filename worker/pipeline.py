"""The batch pipeline: claim -> read -> filter -> preprocess -> infer -> build result -> store -> send.

``run_batch`` reads as its steps, the whole life of a job after intake: claim, then per job
read, filter and preprocess (``_prepare``), infer the batch, build each result, store everything
in one commit, send. Each stage's time is measured by one :class:`StageClock`. It shares nothing
with the listener but the database and the spool.

Both cores stay busy (issue 18): the per-job steps (``_prepare``: reading, decoding and
preprocessing; ``_build``: the result objects and their durable writes) run on a small thread
pool of ``batch.threads`` threads, inference runs on OpenVINO's own threads in between. The
decoders (libjpeg-turbo, CharLS, OpenJPEG, pylibjpeg), numpy, OpenVINO and the spool's fsync
release the GIL, so the threads run in parallel where the time goes; pydicom's Python parts
take turns. Outcomes and deliveries are put back in claim order, so a batch's commit and
audit trail do not depend on which thread finished first.

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

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from worker import audit as audit_log
from worker import deliverables, filters, imaging, overlay, results, sender, store
from worker.engine import Engine
from worker.priority import PriorityMap
from worker.settings import Settings
from worker.spool import Spool, SpoolError
from worker.store import Outcome, State

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


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


#: The stages of a batch, in order: each has its seconds in ``BatchReport.stage_seconds``.
STAGES = ("claim", "read", "filter", "preprocess", "infer", "build", "store", "send")


class StageClock:
    """Seconds per stage of one batch: ``with clock("read"): ...`` adds the block's wall time
    (``time.perf_counter``) to that stage, however the block ends.  Thread-safe: the per-job
    stages (read, filter, preprocess, build) are summed over the pool's threads, so with
    ``batch.threads`` > 1 the stages add up to more than the batch's wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            with self._lock:
                self.seconds[stage] += dt


def batch_threads(settings: Settings) -> int:
    """Threads for the per-job steps: ``batch.threads``, or with 0 the machine's cores (at most 4:
    beyond that the GIL-bound parts dominate and memory grows with every image in flight)."""
    n = settings.batch.threads
    return n if n > 0 else max(1, min(4, os.cpu_count() or 1))


class _Pool:
    """``map`` over a thread pool, or in this thread for one thread (no pool, no overhead)."""

    def __init__(self, threads: int) -> None:
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="batch") if threads > 1 else None

    def map(self, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
        if self._executor is None:
            return [fn(item) for item in items]
        return list(self._executor.map(fn, items))

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


@dataclass
class _Ready:
    """A job read, filtered and preprocessed: what inference and the result builders need."""

    job: store.Claimed
    ds: Dataset
    tensor: np.ndarray
    timing: dict[str, float]


#: A ready job with its probabilities (and, for heatmaps, its feature maps).
_Scored = tuple[_Ready, dict[str, float], "list[np.ndarray] | None"]


@dataclass
class _Batch:
    """One batch on its way: what every step reads (model, settings, spool) and what the steps
    decide (one outcome per job, the deliveries of the done ones)."""

    engine: Engine
    settings: Settings
    spool: Spool
    claimed: list[store.Claimed]
    #: previous results of re-screened jobs (cxr-triage rescreen): one by this very model version
    #: whose objects are still in the spool is sent again as it is (same UIDs, same bytes)
    previous: dict[int, store.PreviousResult]
    pmap: PriorityMap
    spec: imaging.PreprocessSpec
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    deliveries: dict[int, list[store.NewDelivery]] = field(default_factory=dict)
    #: re-screened jobs whose stored result objects are sent again as they are
    reused: set[int] = field(default_factory=set)
    storage_errors: int = 0
    #: issue 17: heatmap SCs when asked for and the model can give them (load_engine logs why not)
    with_heatmaps: bool = False

    _lock: threading.Lock = field(default_factory=threading.Lock)

    def end(self, job: store.Claimed, state: State, reason: str, timing: dict[str, float] | None = None) -> None:
        """The outcome of a job that is not screened (skipped, or failed with ``reason``)."""
        self.outcomes[job.id] = Outcome(job.id, state, reason, timings=timing)

    def storage_error(self) -> None:
        with self._lock:  # called from the pool's threads
            self.storage_errors += 1

    def in_claim_order(self) -> None:
        """Outcomes and deliveries in the order the jobs were claimed (threads finish in any order)."""
        order = [job.id for job in self.claimed]
        self.outcomes = {i: self.outcomes[i] for i in order if i in self.outcomes}
        self.deliveries = {i: self.deliveries[i] for i in order if i in self.deliveries}


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

    Result objects are sent at the end of the batch by ``on_results`` when given (it wakes a
    :class:`worker.sender.BackgroundSender`), else by :func:`worker.sender.send_due` inline.
    """
    send = on_results or (lambda: sender.send_due(db, spool, settings, audit=audit))
    with _Pool(batch_threads(settings)) as pool:
        started = _start_batch(db, spool, engine, settings, owner, pool)
        return _finish_batch(db, owner, audit, started, pool, send)


@dataclass
class _Started:
    """A batch claimed and prepared (its jobs read, filtered, preprocessed), not yet inferred;
    ``b`` is None when nothing was claimed (``report`` says why)."""

    b: _Batch | None
    ready: list[_Ready]
    clock: StageClock
    t_start: float
    report: BatchReport | None = None


def _start_batch(db: store.Database, spool: Spool, engine: Engine, settings: Settings, owner: str,
                 pool: _Pool) -> _Started:
    """Claim up to ``batch.size`` jobs and prepare them on the pool (claim, read, filter, preprocess)."""
    t_start, clock = time.perf_counter(), StageClock()
    pmap, spec = _model_rules(engine, settings)  # before any claim: a card they reject claims nothing
    # no claim while the spool is below its reserve: each result object needs room, and a batch
    # that fails on a full disk would spend every job's attempts in seconds.
    if not spool.has_room():
        log.warning("spool below its free-space reserve (%d MB): no batch until space is freed",
                    settings.storage.disk_reserve_mb)
        return _Started(None, [], clock, t_start, BatchReport(seconds=time.perf_counter() - t_start,
                                                              stage_seconds=clock.seconds, disk_reserve_reached=True))
    with clock("claim"):
        claimed = store.claim_batch(db, settings.batch.size, owner, settings.batch.lease_seconds)
    if not claimed:
        return _Started(None, [], clock, t_start, BatchReport(seconds=time.perf_counter() - t_start,
                                                              stage_seconds=clock.seconds))
    b = _Batch(engine, settings, spool, claimed, store.previous_results(db, [j.id for j in claimed]), pmap, spec,
               with_heatmaps=settings.send.heatmap and engine.heatmap is not None)
    ready = [r for r in pool.map(functools.partial(_prepare, b, clock), claimed) if r is not None]
    return _Started(b, ready, clock, t_start)


def _finish_batch(db: store.Database, owner: str, audit: audit_log.AuditLog, started: _Started, pool: _Pool,
                  send: Callable[[], object]) -> BatchReport:
    """Infer a prepared batch, build its results on the pool, commit, hand the results to ``send``."""
    b, clock = started.b, started.clock
    if b is None:
        assert started.report is not None
        return started.report
    with clock("infer"):
        scored, per_image_ms = _infer(b, started.ready)
    pool.map(functools.partial(_build, b, clock, per_image_ms), scored)
    b.in_claim_order()
    with clock("store"):
        applied = _commit(db, owner, b)
    _audit_finished(audit, b, applied)
    with clock("send"):
        if b.deliveries:
            send()
    return _report(audit, b, time.perf_counter() - started.t_start, clock.seconds)


def _model_rules(engine: Engine, settings: Settings) -> tuple[PriorityMap, imaging.PreprocessSpec]:
    """The triage rule and the preprocessing of this model (its card, with the node's settings)."""
    card = engine.card
    spec = imaging.PreprocessSpec.from_card(card.raw)
    spec = imaging.PreprocessSpec(**{**spec.__dict__, "max_bytes": settings.model.max_image_mb * 2**20})
    return PriorityMap.build(card, settings.triage.priorities, settings.triage.thresholds), spec


def _prepare(b: _Batch, clock: StageClock, job: store.Claimed) -> _Ready | None:
    """Read the stored object, check it, preprocess it; None when the job ended here (its outcome
    recorded) or its stored result is sent again."""
    timing: dict[str, float] = {}
    with clock("read"):
        ds = _read(b, job, timing)
    if ds is None:
        return None
    cut = filters.truncated_element(ds)
    if cut:
        b.end(job, State.SKIPPED, cut, timing)
        return None
    with clock("filter"):  # is this a frontal chest radiograph we can read?
        reason = filters.check(ds)
    if reason:
        b.end(job, State.SKIPPED, reason, timing)
        return None
    if _reuse(b, job, ds, timing):
        return None
    with clock("preprocess"):
        tensor = _preprocess(b, job, ds, timing)
    return None if tensor is None else _Ready(job, ds, tensor, timing)


def _read(b: _Batch, job: store.Claimed, timing: dict[str, float]) -> Dataset | None:
    """The stored object (pixels stay encoded until preprocess), or None with the job ended."""
    t = time.perf_counter()
    try:
        ds: Dataset = dcmread(b.spool.path(job.path))
    except (InvalidDicomError, EOFError, ValueError, KeyError) as exc:
        b.end(job, State.SKIPPED, f"stored object is not readable DICOM: {exc}")
        return None
    except OSError as exc:
        b.end(job, State.FAILED, f"stored file could not be read: {exc.strerror or exc}")
        return None
    timing["read_ms"] = (time.perf_counter() - t) * 1e3
    return ds


def _reuse(b: _Batch, job: store.Claimed, ds: Dataset, timing: dict[str, float]) -> bool:
    """True when the job's stored result objects by this model version are sent again as they are."""
    same = deliverables.same_version_result(job, ds, b.previous.get(job.id), b.engine.card, b.spool, b.settings,
                                            b.with_heatmaps)
    if same is None:
        return False
    prev, kept = same
    b.deliveries[job.id] = kept
    b.reused.add(job.id)
    b.outcomes[job.id] = Outcome(
        job.id, State.DONE, predicted_class=prev.predicted_class, probabilities=prev.probabilities,
        priority=prev.priority, triage_reason=prev.triage_reason,
        timings={k: round(v, 3) for k, v in timing.items()},
    )
    return True


def _preprocess(b: _Batch, job: store.Claimed, ds: Dataset, timing: dict[str, float]) -> np.ndarray | None:
    """The model input (the same code training uses), or None with the job ended."""
    t = time.perf_counter()
    try:
        tensor = imaging.preprocess(ds, b.spec, timings=timing)
    except imaging.PixelError as exc:
        b.end(job, State.SKIPPED, f"pixel data: {exc}", timing)
        return None
    except MemoryError:
        b.end(job, State.SKIPPED, "pixel data too large to decode", timing)
        return None
    except Exception as exc:  # a decoder bug or an input we did not foresee
        log.exception("preprocessing %s failed", job.sop_instance_uid)
        b.end(job, State.FAILED, f"preprocessing error: {type(exc).__name__}: {exc}")
        return None
    if not (b.settings.send.secondary_capture or b.with_heatmaps):
        del ds.PixelData  # the SR needs the header only; keep memory flat
    # preprocess_ms: LUTs, crop, resize, normalisation (decode_ms, measured inside, excluded)
    timing["preprocess_ms"] = (time.perf_counter() - t) * 1e3 - timing.get("decode_ms", 0.0)
    return tensor


def _infer(b: _Batch, ready: list[_Ready]) -> tuple[list[_Scored], float]:
    """Probabilities (and, for heatmaps, the feature maps of the same inference) per ready job,
    and the inference time per image in ms. A failed batch (or a model that returns fewer rows
    than it was given) fails every job of it, none left running."""
    if not ready:
        return [], 0.0
    t = time.perf_counter()
    batch = np.stack([r.tensor for r in ready])
    scored: list[_Scored]
    try:
        if b.with_heatmaps:
            rows, maps_rows = b.engine.infer_maps(batch)
            classes = b.engine.card.classes
            probs = [dict(zip(classes, map(float, row), strict=True)) for row in rows]
            scored = list(zip(ready, probs, maps_rows, strict=True))
        else:
            scored = [(r, p, None) for r, p in zip(ready, b.engine.probabilities(batch), strict=True)]
    except Exception as exc:
        log.exception("inference failed for a batch of %d", len(ready))
        for r in ready:
            b.end(r.job, State.FAILED, f"inference failed: {type(exc).__name__}: {exc}")
        scored = []
    return scored, (time.perf_counter() - t) * 1e3 / max(len(scored), 1)


def _build(b: _Batch, clock: StageClock, per_image_ms: float, scored: _Scored) -> None:
    """Triage one image and build its result objects, durable in the spool before the commit."""
    with clock("build"):
        _build_one(b, *scored, per_image_ms)


def _build_one(
    b: _Batch, item: _Ready, probs: dict[str, float], maps: list[np.ndarray] | None, per_image_ms: float
) -> None:
    job, ds, timing, card = item.job, item.ds, item.timing, b.engine.card
    timing["infer_ms"] = per_image_ms
    decision = b.pmap.decide(probs)
    predicted = max(probs, key=probs.__getitem__)
    rounded = {k: round(float(v), 6) for k, v in probs.items()}
    result = results.TriageResult(
        predicted_class=predicted, probabilities=rounded, priority=decision.priority,
        triage_reason=decision.reason, thresholds=b.pmap.thresholds, model_name=card.name,
        model_version=card.version, model_sha256=card.bin_sha256, model_precision=b.engine.precision,
    )
    tb = time.perf_counter()
    try:
        items = _result_objects(b, ds, result, maps, timing)
    except SpoolError as exc:
        b.storage_error()
        b.end(job, State.FAILED, f"could not store result object: {exc.strerror}")
        return
    except Exception as exc:  # a source header the result builder cannot use
        log.exception("building the result of %s failed", job.sop_instance_uid)
        b.end(job, State.FAILED, f"could not build result: {type(exc).__name__}: {exc}")
        return
    timing["build_ms"] = (time.perf_counter() - tb) * 1e3
    b.deliveries[job.id] = items
    b.outcomes[job.id] = Outcome(
        job.id, State.DONE, predicted_class=predicted, probabilities=rounded, priority=decision.priority,
        triage_reason=decision.reason, timings={k: round(v, 3) for k, v in timing.items()},
    )


def _result_objects(
    b: _Batch, ds: Dataset, result: results.TriageResult, maps: list[np.ndarray] | None = None,
    timing: dict[str, float] | None = None,
) -> list[store.NewDelivery]:
    """SR (and SC, heatmap SC when enabled) and the HL7 / FHIR messages, written to the spool; one
    delivery per object and destination."""
    destinations = b.settings.result_destinations
    objects = [("sr", results.build_sr(ds, result))]
    if b.settings.send.secondary_capture:
        objects.append(("sc", results.build_sc(ds, result)))
    if b.with_heatmaps and maps is not None:
        hsc = deliverables.heatmap_sc(b.engine, ds, result, maps, b.spec, timing if timing is not None else {})
        if hsc is not None:
            overlay.reference_in_sr(objects[0][1], hsc)
            objects.append(("heatmap", hsc))
    items: list[store.NewDelivery] = []
    for kind, obj in objects:
        rel = Spool.result_relpath_for(str(obj.SOPInstanceUID))
        b.spool.write(rel, results.encode(obj))
        items += [
            store.NewDelivery(d.name, kind, str(obj.SOPClassUID), str(obj.SOPInstanceUID), rel)
            for d in destinations if not d.message_based
        ]
    items += deliverables.messages(ds, result, objects[0][1], [d for d in destinations if d.message_based], b.spool)
    return items


def _commit(db: store.Database, owner: str, b: _Batch) -> set[int]:
    """Results, deliveries and states in one commit; the ids of the jobs whose lease we still held."""
    card = b.engine.card
    return store.finish(
        db, owner, b.outcomes.values(), deliveries=b.deliveries, model_name=card.name,
        model_version=card.version, model_precision=b.engine.precision,
        max_attempts=b.settings.batch.max_attempts,
    )


def _audit_finished(audit: audit_log.AuditLog, b: _Batch, applied: set[int]) -> None:
    """``job_finished`` per job whose outcome counts, ``result_produced`` per delivery of a done one."""
    uids = {job.id: job.sop_instance_uid for job in b.claimed}
    for o in b.outcomes.values():
        if o.job_id not in applied:  # lease lost to another worker: its outcome counts, not ours
            continue
        audit.record("job_finished", sop_instance_uid=uids[o.job_id], state=o.state.value, reason=o.reason,
                     predicted_class=o.predicted_class, priority=o.priority, model_version=b.engine.card.version)
        for d in b.deliveries.get(o.job_id, []) if o.state is State.DONE else []:
            audit.record("result_produced", source_sop_instance_uid=uids[o.job_id], kind=d.kind,
                         sop_instance_uid=d.sop_instance_uid, destination=d.destination,
                         reused=True if o.job_id in b.reused else None)


def _report(audit: audit_log.AuditLog, b: _Batch, seconds: float, stage: dict[str, float]) -> BatchReport:
    """The batch's counts and times, audited and logged."""
    outcomes = b.outcomes.values()
    report = BatchReport(
        claimed=len(b.claimed),
        done=sum(o.state is State.DONE for o in outcomes),
        skipped=sum(o.state is State.SKIPPED for o in outcomes),
        failed=sum(o.state is State.FAILED for o in outcomes),
        seconds=seconds,
        stage_seconds=stage,
        storage_errors=b.storage_errors,
    )
    audit.record("batch_finished", claimed=report.claimed, done=report.done, skipped=report.skipped,
                 failed=report.failed, ms=round(report.seconds * 1e3, 1),
                 stage_ms={k: round(v * 1e3, 2) for k, v in stage.items()})
    log.info(
        "batch: %d claimed, %d done, %d skipped, %d failed in %.2f s",
        report.claimed, report.done, report.skipped, report.failed, report.seconds,
    )
    return report


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
    :func:`run_batch`.

    With ``batch.threads`` > 1 the next batch is claimed and prepared while the current one is
    inferred, built, committed and sent (issue 18: the durable writes and commits wait on the
    disk, the decoders wait on nothing): one batch ahead at most.  When the run stops after a
    batch (``should_stop``, a storage error), the batch prepared ahead is given back to the queue
    untouched (``store.release``: its attempt not counted)."""
    total = BatchReport()
    send = on_results or (lambda: sender.send_due(db, spool, settings, audit=audit))
    threads = batch_threads(settings)
    with _Pool(threads) as pool, ThreadPoolExecutor(1, thread_name_prefix="batch-ahead") as ahead:
        started = _start_batch(db, spool, engine, settings, owner, pool)
        while True:
            if started.b is None:  # nothing claimed (empty queue, or the spool below its reserve)
                assert started.report is not None
                total.add(started.report)
                return total
            following = ahead.submit(_start_batch, db, spool, engine, settings, owner, pool) if threads > 1 else None
            try:
                report = _finish_batch(db, owner, audit, started, pool, send)
            except BaseException:
                _give_back(db, owner, following)
                raise
            total.add(report)
            stop = should_stop is not None and should_stop()
            if report.storage_errors:
                # Disk full (or failing): the failed jobs went back to the queue with an attempt
                # spent and the reason kept; retrying them at once would spend the rest. The next
                # scheduled run tries again (and claims nothing while below the reserve).
                log.error("%d result object(s) could not be stored; stopping this run", report.storage_errors)
                stop = True
            if stop:
                _give_back(db, owner, following)
                return total
            started = following.result() if following is not None else _start_batch(db, spool, engine, settings, owner,
                                                                                     pool)


def _give_back(db: store.Database, owner: str, ahead: Future[_Started] | None) -> None:
    """Release the jobs of a batch prepared ahead that will not be finished (never raises)."""
    if ahead is None:
        return
    try:
        started = ahead.result()
        if started.b is not None:
            store.release(db, owner, [job.id for job in started.b.claimed])
    except Exception:  # noqa: BLE001 - the leases then expire (batch.lease_seconds) or are reclaimed at start
        log.exception("could not give back the batch prepared ahead")

