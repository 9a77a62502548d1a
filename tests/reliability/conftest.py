"""Fixtures for the reliability tests: one in-process node + toy engine per module."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import echo, free_port

from worker import pipeline, store
from worker.settings import Settings, load_settings

#: Settings of the corpus node: short timeouts so a silent or truncated peer is dropped within
#: seconds, a small object limit and a small decode limit so the limits are exercised cheaply.
CORPUS_OVERRIDES = {
    "storage.disk_reserve_mb": "0",
    "listener.bind_address": "127.0.0.1",
    "listener.acse_timeout": "3",
    "listener.dimse_timeout": "3",
    "listener.network_timeout": "3",
    "listener.max_object_mb": "8",
    "model.max_image_mb": "64",
    "batch.size": "8",
    "batch.max_attempts": "2",
    "batch.poll_seconds": "0.2",
}


@dataclass
class Screening:
    """A running listener, its database and spool, and a way to run the pipeline now."""

    node: Any
    settings: Settings
    engine: Any

    @property
    def port(self) -> int:
        return int(self.node.port)

    def drain(self) -> pipeline.BatchReport:
        return pipeline.drain(self.node.db, self.node.spool, self.engine, self.settings, pipeline.worker_id())

    def row(self, sop_uid: str) -> store.Instance | None:
        return store.find(self.node.db, sop_uid)

    def events(self, sop_uid: str | None = None) -> list[dict[str, Any]]:
        from sqlalchemy import select

        with self.node.db.sessions() as s:
            stmt = select(store.IntakeEvent).order_by(store.IntakeEvent.id)
            if sop_uid is not None:
                stmt = stmt.where(store.IntakeEvent.sop_instance_uid == sop_uid)
            return [e.as_dict() for e in s.scalars(stmt)]

    def alive(self) -> bool:
        return echo(self.port) == 0


@pytest.fixture(scope="module")
def screening(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> Iterator[Screening]:
    from worker.engine import Engine
    from worker.node import Node

    data_dir = tmp_path_factory.mktemp("corpus") / "var"
    settings = load_settings(
        None, {**CORPUS_OVERRIDES, "storage.data_dir": str(data_dir), "listener.port": str(free_port())}, environ={}
    )
    settings = dataclasses.replace(settings, model=dataclasses.replace(settings.model, path=toy_model))
    node = Node(settings, batch=False)
    node.start()
    try:
        yield Screening(node, settings, Engine(toy_model))
    finally:
        node.stop()
