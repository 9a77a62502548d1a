"""`cxr-triage rescreen` (issue 19, item 8): finished jobs back in the queue by filter; the same
model version re-sends the very same objects, a new version makes new ones (new UIDs)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from support import make_image, receive, run_cli

from worker import store


def _rows(data: Path) -> list[dict]:
    r = run_cli("query", "--data-dir", str(data), "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def node_data(tmp_path: Path, toy_model: Path) -> tuple[Path, list[str]]:
    """Two CR images and a knee (skipped), received and screened once with the toy model 0.0.1."""
    data = tmp_path / "var"
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(2)] + [make_image(rows=64, cols=64, body_part="KNEE")]
    receive(data, dss)
    r = run_cli("batch", "--once", "--data-dir", str(data), "--model", str(toy_model))
    assert r.returncode == 0 and "screened 2, skipped 1" in r.stdout, r.stdout + r.stderr
    return data, [d.SOPInstanceUID for d in dss]


def test_same_model_version_resends_identical_objects(node_data, toy_model: Path) -> None:  # type: ignore[no-untyped-def]
    data, uids = node_data
    results = data / "results"  # the default folder destination
    before = {p.name: p.read_bytes() for p in results.glob("*.dcm")}
    assert len(before) == 2
    for p in results.glob("*.dcm"):
        p.unlink()  # so that the re-send is seen

    r = run_cli("rescreen", "--state", "done", "--data-dir", str(data))
    assert r.returncode == 0 and r.stdout.strip() == "queued 2 job(s) again for screening", r.stdout + r.stderr
    rows = {x["sop_instance_uid"]: x for x in _rows(data)}
    assert [rows[u]["state"] for u in uids] == ["queued", "queued", "skipped"]
    r = run_cli("batch", "--once", "--data-dir", str(data), "--model", str(toy_model))
    assert r.returncode == 0 and "screened 2" in r.stdout and "results sent 2" in r.stdout, r.stdout

    after = {p.name: p.read_bytes() for p in results.glob("*.dcm")}
    assert after == before  # the same UIDs and the same bytes
    audit = [json.loads(ln) for ln in (data / "audit.jsonl").read_text().splitlines()]
    produced = [a for a in audit if a["event"] == "result_produced"]
    assert len(produced) == 4 and [a.get("reused") for a in produced] == [None, None, True, True]
    assert [a["jobs"] for a in audit if a["event"] == "rescreen_requested"] == [2]


def test_new_model_version_makes_new_objects_beside_the_old(node_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from worker.testing.toymodel import build_toy_model

    data, uids = node_data
    results = data / "results"
    old = sorted(p.name for p in results.glob("*.dcm"))
    v2 = build_toy_model(tmp_path / "toy-v2", version="0.0.2", thresholds={"covid19": 0.5, "pneumonia": 0.5})

    r = run_cli("rescreen", "--model-version", "0.0.1", "--dry-run", "--data-dir", str(data))
    assert r.stdout.strip() == "would queue 2 job(s) again for screening"
    assert all(x["state"] != "queued" for x in _rows(data))  # a dry run changes nothing
    r = run_cli("rescreen", "--model-version", "0.0.1", "--data-dir", str(data))
    assert "queued 2 job(s)" in r.stdout
    r = run_cli("batch", "--once", "--data-dir", str(data), "--model", str(v2))
    assert r.returncode == 0 and "results sent 2" in r.stdout, r.stdout

    new = sorted(p.name for p in results.glob("*.dcm"))
    assert len(new) == 4 and set(old) < set(new)  # new UIDs; the old objects stay
    rows = {x["sop_instance_uid"]: x for x in _rows(data)}
    assert [rows[u]["model_version"] for u in uids[:2]] == ["0.0.2", "0.0.2"]
    for name in set(new) - set(old):
        ds = pydicom.dcmread(results / name)
        assert ds.Modality == "SR" and ds.SOPInstanceUID not in {n.removesuffix(".dcm") for n in old}


def test_rescreen_filters_and_purged_images(node_data) -> None:  # type: ignore[no-untyped-def]
    data, uids = node_data
    r = run_cli("rescreen", "--data-dir", str(data))
    assert r.returncode == 2
    assert "name the jobs: --state, --since, --until, --class, --model-version, --sop, or --all" in r.stderr
    r = run_cli("rescreen", "--class", "covid", "--data-dir", str(data))
    assert r.returncode == 2 and "is not a class of model" in r.stderr
    r = run_cli("rescreen", "--sop", uids[2], "--dry-run", "--data-dir", str(data))
    assert r.stdout.strip() == "would queue 1 job(s) again for screening"
    r = run_cli("rescreen", "--since", "2999-01-01", "--data-dir", str(data))
    assert r.stdout.strip() == "queued 0 job(s) again for screening"

    db = store.Database.open(f"sqlite:///{data / 'triage.db'}")
    try:
        row = store.find(db, uids[0])
    finally:
        db.close()
    (data / "spool" / row.path).unlink()  # as purge does once the results are delivered
    r = run_cli("rescreen", "--all", "--data-dir", str(data))
    assert r.stdout.strip() == ("queued 2 job(s) again for screening; 1 left as they are: their image is no longer "
                                "in the spool (purged)")
    states = {x["sop_instance_uid"]: x["state"] for x in _rows(data)}
    assert states == {uids[0]: "done", uids[1]: "queued", uids[2]: "queued"}
