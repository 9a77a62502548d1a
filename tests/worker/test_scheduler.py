"""Schedules: triggers, the gather window, catch-up after downtime, bounded runs (clock injected)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest
from support import make_image, send, wait_for

from worker import store
from worker.engine import Engine
from worker.node import Node
from worker.scheduler import BatchScheduler, make_trigger, missed_run, should_start
from worker.settings import Destination, Settings

UTC = dt.UTC


def _with(settings: Settings, **schedule: object) -> Settings:
    return dataclasses.replace(settings, schedule=dataclasses.replace(settings.schedule, **schedule))


def test_triggers_per_mode(settings: Settings) -> None:
    now = dt.datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    t = make_trigger(_with(settings, mode="interval", interval_minutes=10))
    assert t.interval == dt.timedelta(minutes=10)
    t = make_trigger(_with(settings, mode="cron", cron="30 22 * * *"))
    assert t.get_next_fire_time(None, now) == dt.datetime(2026, 11, 26, 22, 30, tzinfo=UTC)
    t = make_trigger(settings)  # continuous: every batch.poll_seconds
    assert t.interval == dt.timedelta(seconds=settings.batch.poll_seconds)


def test_missed_cron_run_within_grace(settings: Settings) -> None:
    s = _with(settings, mode="cron", cron="0 2 * * *", misfire_grace_seconds=3600)
    assert missed_run(s, dt.datetime(2026, 11, 26, 2, 30, tzinfo=UTC)) == dt.datetime(2026, 11, 26, 2, 0, tzinfo=UTC)
    assert missed_run(s, dt.datetime(2026, 11, 26, 4, 0, tzinfo=UTC)) is None  # too late: wait for tonight
    assert missed_run(_with(settings, mode="continuous"), dt.datetime(2026, 11, 26, tzinfo=UTC)) is None


def test_gather_window(settings: Settings) -> None:
    now = dt.datetime(2026, 11, 26, 12, 0, 10, tzinfo=UTC)
    s = _with(settings, gather_seconds=5)
    assert not should_start(s, 0, None, now)
    assert not should_start(s, 1, now - dt.timedelta(seconds=2), now)  # wait for more to arrive
    assert should_start(s, 1, now - dt.timedelta(seconds=6), now)  # but not for long
    assert should_start(s, s.batch.size, now, now)  # a full batch goes at once
    assert should_start(_with(s, mode="interval"), 1, now, now)


@pytest.fixture
def listener_node(model_settings: Settings, tmp_path: Path):  # type: ignore[no-untyped-def]
    s = dataclasses.replace(model_settings, destinations=[Destination(name="out", type="folder", path=tmp_path / "out")])
    n = Node(s, batch=False)
    n.start()
    yield n, s
    n.stop()


def _all_done(db: store.Database, n: int) -> bool:
    return store.counts(db) == {"done": n}


def test_continuous_mode_screens_as_images_arrive(listener_node) -> None:  # type: ignore[no-untyped-def]
    node, s = listener_node
    s = _with(s, gather_seconds=0.2)
    sched = BatchScheduler(node.db, node.spool, Engine(s.model.path), s)
    sched.start()
    try:
        assert send([make_image(rows=64, cols=64, seed=i) for i in range(3)], node.port) == [0, 0, 0]
        assert wait_for(lambda: _all_done(node.db, 3), timeout=20)
        assert wait_for(lambda: store.delivery_counts(node.db) == {"sent": 3}, timeout=10)
    finally:
        sched.stop()


def test_interval_mode_runs_on_its_interval(listener_node) -> None:  # type: ignore[no-untyped-def]
    node, s = listener_node
    s = _with(s, mode="interval", interval_minutes=1 / 60, misfire_grace_seconds=0)  # every second
    sched = BatchScheduler(node.db, node.spool, Engine(s.model.path), s)
    sched.start()
    try:
        assert send([make_image(rows=64, cols=64)], node.port) == [0]
        assert wait_for(lambda: _all_done(node.db, 1), timeout=15)
        assert sched.runs >= 1
    finally:
        sched.stop()


def test_cron_catch_up_after_downtime(listener_node) -> None:  # type: ignore[no-untyped-def]
    node, s = listener_node
    assert send([make_image(rows=64, cols=64, seed=i) for i in range(2)], node.port) == [0, 0]
    # images queued at "01:59"; the node was down at the 02:00 run and starts at 02:10
    received = store.oldest_waiting(node.db).received_at
    run_time = (received + dt.timedelta(minutes=1)).replace(second=0, microsecond=0)
    cron = f"{run_time.minute} {run_time.hour} * * *"
    s = _with(s, mode="cron", cron=cron, misfire_grace_seconds=3600)
    clock = lambda: run_time + dt.timedelta(minutes=10)  # noqa: E731
    sched = BatchScheduler(node.db, node.spool, Engine(s.model.path), s, clock=clock)
    sched.start()
    try:
        assert wait_for(lambda: _all_done(node.db, 2), timeout=15)  # caught up at once, not tomorrow
        assert sched.next_run() is not None and sched.next_run() > dt.datetime.now(UTC)
    finally:
        sched.stop()


def test_no_catch_up_outside_grace(listener_node) -> None:  # type: ignore[no-untyped-def]
    node, s = listener_node
    assert send([make_image(rows=64, cols=64)], node.port) == [0]
    now = dt.datetime.now(UTC)
    far = (now + dt.timedelta(hours=6)).replace(minute=0, second=0, microsecond=0)
    s = _with(s, mode="cron", cron=f"0 {far.hour} * * *", misfire_grace_seconds=60)
    sched = BatchScheduler(node.db, node.spool, Engine(s.model.path), s)
    sched.start()
    try:
        assert not wait_for(lambda: _all_done(node.db, 1), timeout=1.5)
        assert store.counts(node.db) == {"queued": 1}
    finally:
        sched.stop()


def test_max_batch_seconds_leaves_the_rest_queued(listener_node) -> None:  # type: ignore[no-untyped-def]
    node, s = listener_node
    s = _with(s, max_batch_seconds=0.001)
    n = s.batch.size + 3
    assert send([make_image(rows=64, cols=64, seed=i) for i in range(n)], node.port) == [0] * n
    sched = BatchScheduler(node.db, node.spool, Engine(s.model.path), s)
    rep = sched.run_once(force=True)
    assert rep.claimed == s.batch.size
    assert store.counts(node.db) == {"done": s.batch.size, "queued": 3}
