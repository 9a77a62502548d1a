"""/health and /metrics of a running node (counts from the database, prometheus-client format)."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import CT_STORAGE, free_port, make_image, send, wait_for

from worker import store
from worker.node import Node
from worker.settings import Destination, Settings


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as rsp:
            return rsp.status, rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _metrics(port: int) -> dict[tuple[str, tuple], float]:
    status, body = _get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def monitored(model_settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    hp = free_port()
    s = dataclasses.replace(
        model_settings,
        health=dataclasses.replace(model_settings.health, enabled=True, port=hp),
        destinations=[Destination(name="out", type="folder", path=tmp_path / "out")],
        schedule=dataclasses.replace(model_settings.schedule, gather_seconds=0.1),
    )
    n = Node(s, batch=True)
    n.start()
    yield n, hp
    n.stop()


def test_disabled_by_default(settings: Settings) -> None:
    assert settings.health.enabled is False and settings.health.bind_address == "127.0.0.1"


def test_health_and_metrics_follow_the_queue(monitored) -> None:  # type: ignore[no-untyped-def]
    node, hp = monitored
    status, body = _get(f"http://127.0.0.1:{hp}/health")
    doc = json.loads(body)
    assert status == 200 and doc["status"] == "ok"
    assert set(doc["checks"]) == {"database", "spool_writable", "disk_reserve", "model"}
    assert doc["checks"]["model"]["name"] == "toy"

    dss = [make_image(rows=64, cols=64, seed=i) for i in range(3)]
    assert send(dss + [dss[0], make_image(sop_class=CT_STORAGE, modality="CT")], node.port) == [0, 0, 0, 0, 0x0122]
    assert wait_for(lambda: store.counts(node.db) == {"done": 3}, timeout=30)
    assert wait_for(lambda: store.delivery_counts(node.db) == {"sent": 3}, timeout=10)
    m = _metrics(hp)
    assert m[("cxr_triage_received_total", ())] == 3
    assert m[("cxr_triage_resends_total", ())] == 1
    assert m[("cxr_triage_intake_refused_total", (("kind", "refused"),))] == 1
    assert m[("cxr_triage_jobs_finished_total", (("state", "done"),))] == 3
    assert m[("cxr_triage_queue_depth", (("state", "queued"),))] == 0
    assert m[("cxr_triage_oldest_waiting_seconds", ())] == 0
    assert m[("cxr_triage_deliveries_total", (("state", "sent"),))] == 3
    by_priority = store.priority_counts(node.db)
    assert sum(by_priority.values()) == 3
    for p in ("urgent", "high", "routine"):
        assert m[("cxr_triage_screened_total", (("priority", p),))] == by_priority.get(p, 0)
    assert m[("cxr_triage_model_info", (("name", "toy"), ("precision", "f32"), ("version", "0.0.1")))] == 1
    assert wait_for(lambda: _metrics(hp).get(("cxr_triage_batch_seconds_count", ()), 0) >= 1, timeout=5)
    assert _metrics(hp)[("cxr_triage_inference_images_per_second", ())] > 0


def test_unhealthy_when_disk_reserve_is_crossed(monitored) -> None:  # type: ignore[no-untyped-def]
    node, hp = monitored
    node.spool.reserve_bytes = node.spool.free_bytes() + 2**40
    status, body = _get(f"http://127.0.0.1:{hp}/health")
    doc = json.loads(body)
    assert status == 503 and doc["status"] == "unhealthy" and doc["checks"]["disk_reserve"]["ok"] is False
    assert _get(f"http://127.0.0.1:{hp}/nothing")[0] == 404
