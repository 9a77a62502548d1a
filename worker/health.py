"""Health and metrics over HTTP: ``/health`` (JSON) and ``/metrics`` (Prometheus text format).

Off by default and bound to loopback by default (``[health]``). The counts come from the
database at scrape time, so the numbers are right whether the listener and the batches run in
one process or several (``serve --no-batch`` + ``batch``), and they survive restarts. Timings that
only the batch process knows (batch latency, inference images/s) are prometheus-client
histograms and gauges of that process.

Metrics use prometheus-client (no hand-written exposition format).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from worker import store
from worker.settings import Settings
from worker.spool import Spool

log = logging.getLogger(__name__)


@dataclass
class NodeState:
    """What the health endpoint can see of the running node."""

    settings: Settings
    db: store.Database
    spool: Spool
    model_name: str | None = None
    model_version: str | None = None
    model_precision: str | None = None
    batch_enabled: bool = True


class QueueCollector(Collector):
    """Counts from the triage database, read at each scrape."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    def collect(self) -> Iterator[Any]:
        db = self.state.db
        snap = store.metric_counts(db)
        by_state, resends, by_kind, sends, oldest = (
            snap.by_state, snap.resends, snap.by_kind, snap.sends, snap.oldest_queued
        )
        received = CounterMetricFamily("cxr_triage_received", "Instances stored and queued (re-sends not counted)")
        received.add_metric([], sum(by_state.values()))
        yield received
        resent = CounterMetricFamily("cxr_triage_resends", "Re-sends of instances already stored")
        resent.add_metric([], int(resends))
        yield resent
        refused = CounterMetricFamily("cxr_triage_intake_refused", "Refused C-STOREs and associations", labels=["kind"])
        for kind in ("refused", "association_rejected", "duplicate_differs"):
            refused.add_metric([kind], by_kind.get(kind, 0))
        yield refused
        outcome = CounterMetricFamily("cxr_triage_jobs_finished", "Jobs finished, by outcome", labels=["state"])
        for st in (store.State.DONE, store.State.SKIPPED, store.State.FAILED):
            outcome.add_metric([st.value], by_state.get(st.value, 0))
        yield outcome
        depth = GaugeMetricFamily("cxr_triage_queue_depth", "Jobs waiting or running", labels=["state"])
        for st in (store.State.QUEUED, store.State.RUNNING):
            depth.add_metric([st.value], by_state.get(st.value, 0))
        yield depth
        age = GaugeMetricFamily("cxr_triage_oldest_waiting_seconds", "Age of the oldest queued job (0 when none)")
        if oldest is not None:
            if oldest.tzinfo is None:
                oldest = oldest.replace(tzinfo=dt.UTC)
            age.add_metric([], max(0.0, (store.utcnow() - oldest).total_seconds()))
        else:
            age.add_metric([], 0.0)
        yield age
        from worker.priority import PRIORITIES

        by_priority = store.priority_counts(db)
        screened = CounterMetricFamily(
            "cxr_triage_screened", "Screened images, by triage priority", labels=["priority"]
        )
        for p in PRIORITIES:
            screened.add_metric([p], by_priority.get(p, 0))
        yield screened
        deliveries = CounterMetricFamily("cxr_triage_deliveries", "Result deliveries, by state", labels=["state"])
        for sst in store.SendState:
            deliveries.add_metric([sst.value], sends.get(sst.value, 0))
        yield deliveries
        if self.state.model_version:
            info = InfoMetricFamily("cxr_triage_model", "The model this node screens with")
            info.add_metric([], {
                "name": self.state.model_name or "", "version": self.state.model_version or "",
                "precision": self.state.model_precision or "",
            })
            yield info


class Metrics:
    """Per-process metrics of the batch pipeline (registered on the endpoint's registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_seconds = Histogram(
            "cxr_triage_batch_seconds", "Wall time of one batch (claim to sent)",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=registry,
        )
        self.inference_images_per_second = Gauge(
            "cxr_triage_inference_images_per_second", "Images/s of the last batch's inference step", registry=registry
        )

    def observe(self, report: Any) -> None:
        """Record a pipeline.BatchReport."""
        if report.claimed:
            self.batch_seconds.observe(report.seconds)
        infer = report.stage_seconds.get("infer", 0.0)
        if report.done and infer > 0:
            self.inference_images_per_second.set(report.done / infer)


def check_health(state: NodeState) -> tuple[bool, dict[str, Any]]:
    """Database reachable, spool writable, model loaded, disk reserve kept."""
    checks: dict[str, Any] = {}
    try:
        store.ping(state.db)
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    try:
        fd, name = tempfile.mkstemp(prefix=".health-", dir=state.spool.root)
        os.close(fd)
        os.unlink(name)
        checks["spool_writable"] = {"ok": True}
    except OSError as exc:
        checks["spool_writable"] = {"ok": False, "error": exc.strerror or str(exc)}
    free = state.spool.free_bytes()
    checks["disk_reserve"] = {"ok": free >= state.spool.reserve_bytes, "free_bytes": free,
                              "reserve_bytes": state.spool.reserve_bytes}
    if state.batch_enabled:
        checks["model"] = {"ok": state.model_version is not None, "name": state.model_name,
                           "version": state.model_version, "precision": state.model_precision}
    ok = all(c["ok"] for c in checks.values())
    return ok, {"status": "ok" if ok else "unhealthy", "checks": checks}


class HealthServer:
    """A small threaded HTTP server; ``stop()`` shuts it down."""

    def __init__(self, state: NodeState, bind: str, port: int) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        self.registry.register(QueueCollector(state))
        self.metrics = Metrics(self.registry)
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif self.path == "/health":
                    ok, doc = check_health(state)
                    body, ctype, code = json.dumps(doc).encode(), "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("health: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((bind, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> HealthServer:
        self.thread.start()
        log.info("health and metrics on http://%s:%d/", *self.httpd.server_address[:2])
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
