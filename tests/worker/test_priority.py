"""Configurable triage priorities: the mapping, its settings, and one priority everywhere (DB, SR, status)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from pydicom import dcmread
from support import make_image, send

from worker import cli, pipeline, store
from worker.engine import Engine
from worker.modelcard import ModelCard, ModelCardError, Triage
from worker.node import Node
from worker.priority import PriorityMap
from worker.settings import Settings, SettingsError, load_settings


def _p(normal: float, pneumonia: float, covid19: float) -> dict[str, float]:
    return {"normal": normal, "pneumonia": pneumonia, "covid19": covid19}


def test_default_is_the_model_cards_rule(toy_model: Path) -> None:
    card = ModelCard.load(toy_model)  # covid19 0.5, pneumonia 0.5
    pm = PriorityMap.build(card)
    assert pm.thresholds == {"covid19": 0.5, "pneumonia": 0.5}
    assert pm.decide(_p(0.2, 0.5, 0.3)) == Triage("urgent", "P(pneumonia)=0.50 >= 0.50")
    assert pm.decide(_p(0.6, 0.2, 0.2)) == Triage("routine", "no class over its threshold")


def test_covid_urgent_pneumonia_high_with_a_threshold_override(toy_model: Path) -> None:
    card = ModelCard.load(toy_model)
    pm = PriorityMap.build(card, {"covid19": "urgent", "pneumonia": "high"}, {"pneumonia": 0.4})
    assert pm.thresholds == {"covid19": 0.5, "pneumonia": 0.4}
    assert pm.decide(_p(0.1, 0.45, 0.45)) == Triage("high", "P(pneumonia)=0.45 >= 0.40")
    # both fire: the most urgent wins, and the reason names both
    t = pm.decide(_p(0.0, 0.45, 0.55))
    assert t.priority == "urgent" and t.reason == "P(pneumonia)=0.45 >= 0.40; P(covid19)=0.55 >= 0.50"
    assert pm.decide(_p(0.9, 0.05, 0.05)).priority == "routine"
    assert pm.describe() == ["urgent: P(covid19) >= 0.500", "high: P(pneumonia) >= 0.400", "routine: otherwise"]


def test_mapping_errors_name_the_setting(toy_model: Path) -> None:
    card = ModelCard.load(toy_model)
    with pytest.raises(ModelCardError, match=r"triage\.priorities names \['COVID'\]"):
        PriorityMap.build(card, {"COVID": "urgent"})
    with pytest.raises(ModelCardError, match=r"triage\.priorities\.normal: class 'normal' has no threshold"):
        PriorityMap.build(card, {"normal": "high"})
    assert PriorityMap.build(card, {"normal": "high"}, {"normal": 0.9}).decide(_p(0.95, 0.0, 0.05)).priority == "high"
    assert PriorityMap.build(card, {"normal": "routine"}).decide(_p(0.0, 0.0, 1.0)) == Triage(
        "routine", "no triage.priorities rule")


def test_settings_from_toml_env_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[triage]\npriorities = {covid19 = "urgent", pneumonia = "high"}\nthresholds = {pneumonia = 0.6}\n')
    s = load_settings(cfg, environ={})
    assert s.triage.priorities == {"covid19": "urgent", "pneumonia": "high"} and s.triage.thresholds == {"pneumonia": 0.6}
    s = load_settings(None, environ={"CXR_TRIAGE_TRIAGE_PRIORITIES": "covid19=urgent, pneumonia=high",
                                     "CXR_TRIAGE_TRIAGE_THRESHOLDS": "covid19=0.7"})
    assert s.triage.priorities == {"covid19": "urgent", "pneumonia": "high"} and s.triage.thresholds == {"covid19": 0.7}
    with pytest.raises(SettingsError, match=r"triage\.priorities\.covid19 must be one of urgent, high, routine"):
        load_settings(None, environ={"CXR_TRIAGE_TRIAGE_PRIORITIES": "covid19=stat"})
    with pytest.raises(SettingsError, match=r"triage\.thresholds\.covid19 must be a probability"):
        load_settings(None, environ={"CXR_TRIAGE_TRIAGE_THRESHOLDS": "covid19=1.5"})
    with pytest.raises(SettingsError, match="KEY=VALUE"):
        load_settings(None, environ={"CXR_TRIAGE_TRIAGE_PRIORITIES": "covid19"})


def test_one_priority_in_the_database_the_sr_and_status(
    model_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    # every class fires at 0.0 as "high": whatever the toy model predicts, each image is high
    s = dataclasses.replace(model_settings, triage=dataclasses.replace(
        model_settings.triage, priorities={c: "high" for c in ("normal", "pneumonia", "covid19")},
        thresholds={c: 0.0 for c in ("normal", "pneumonia", "covid19")}))
    node = Node(s, batch=False)
    node.start()
    try:
        dss = [make_image(rows=64, cols=64, seed=i) for i in range(3)]
        assert send(dss, node.port) == [0, 0, 0]
        assert pipeline.drain(node.db, node.spool, Engine(s.model.path), s, pipeline.worker_id()).done == 3
        for ds in dss:
            row = store.find(node.db, ds.SOPInstanceUID)
            assert row.priority == "high" and "P(normal)=" in row.triage_reason
        (res,) = [p for p in (s.storage.data_dir / "results").iterdir()][:1]
        sr = dcmread(res)
        codes = [(str(i.ConceptCodeSequence[0].CodeValue), str(i.ConceptCodeSequence[0].CodeMeaning))
                 for i in _walk(sr.ContentSequence) if "ConceptCodeSequence" in i]
        assert ("HIGH", "High") in codes
    finally:
        node.stop()
    assert cli.main(["status", "--data-dir", str(s.storage.data_dir), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["priorities"] == {"urgent": 0, "high": 3, "routine": 0}
    assert cli.main(["status", "--data-dir", str(s.storage.data_dir)]) == 0
    assert "screened by priority: urgent 0, high 3, routine 0" in capsys.readouterr().out


def test_a_mapping_naming_an_unknown_class_stops_the_node_at_start(
    model_settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["batch", "--once", "--data-dir", str(model_settings.storage.data_dir), "--model", str(model_settings.model.path)]
    assert cli.main(argv) == 0  # unconfigured: the card's rule
    capsys.readouterr()
    monkeypatch.setenv("CXR_TRIAGE_TRIAGE_PRIORITIES", "tuberculosis=urgent")
    rc = cli.main(argv)
    assert rc == 2 and "triage.priorities names ['tuberculosis']" in capsys.readouterr().err


def _walk(items):  # type: ignore[no-untyped-def]
    for it in items:
        yield it
        if "ContentSequence" in it:
            yield from _walk(it.ContentSequence)
