"""training.publication: finished runs' small results out to a committed folder and back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import publication


def _run(folder: Path, *, finished: bool) -> None:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text('{"model": "hybrid"}')
    (folder / "history.jsonl").write_text('{"epoch": 0}\n')
    (folder / "predictions_test.csv").write_text("id,normal\n")
    (folder / "best.pt").write_bytes(b"\0" * 1024)
    (folder / "last.pt").write_bytes(b"\0" * 1024)
    if finished:
        (folder / "metrics.json").write_text('{"val": {"accuracy": 0.5}}')
        (folder / "done.json").write_text('{"best_epoch": 0}')


def test_publish_copies_small_results_of_finished_runs_only(tmp_path: Path) -> None:
    exp, res = tmp_path / "exp", tmp_path / "res"
    _run(exp / "hybrid" / "fold-0", finished=True)
    _run(exp / "hybrid" / "fold-1", finished=False)
    (exp / "experiment.json").write_text("{}")
    (exp / "folds.json").write_text("{}")
    assert publication.publish(exp, res) == [Path("hybrid/fold-0")]
    got = sorted(p.relative_to(res).as_posix() for p in res.rglob("*") if p.is_file())
    assert got == ["experiment.json", "folds.json", "hybrid/fold-0/done.json", "hybrid/fold-0/history.jsonl",
                   "hybrid/fold-0/metrics.json", "hybrid/fold-0/predictions_test.csv", "hybrid/fold-0/run.json"]


def test_restore_fills_missing_runs_and_keeps_what_the_experiment_finished(tmp_path: Path) -> None:
    res, exp = tmp_path / "res", tmp_path / "exp"
    _run(res / "hybrid" / "fold-0", finished=True)
    _run(res / "resnet50" / "fold-0", finished=True)
    (res / "experiment.json").write_text('{"config": {}}')
    _run(exp / "hybrid" / "fold-0", finished=False)  # interrupted here, finished elsewhere
    _run(exp / "resnet50" / "fold-0", finished=True)
    (exp / "resnet50" / "fold-0" / "metrics.json").write_text('{"own": true}')
    restored = publication.restore(res, exp)
    assert restored == [Path("hybrid/fold-0")]
    assert not (exp / "hybrid" / "fold-0" / "last.pt").exists()  # the stale checkpoint of the interrupted copy
    assert (exp / "hybrid" / "fold-0" / "done.json").exists()
    assert json.loads((exp / "resnet50" / "fold-0" / "metrics.json").read_text()) == {"own": True}
    assert (exp / "experiment.json").exists()
    assert publication.restore(tmp_path / "absent", exp) == []


def test_a_restored_run_is_skipped_by_train_run(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from training import config as config_mod
    from training.train import train_run

    res, exp = tmp_path / "res", tmp_path / "exp"
    _run(res / "mobilenet" / "fold-0", finished=True)
    publication.restore(res, exp)
    cfg = config_mod.load_config(None, [])
    assert train_run(cfg, "mobilenet", [], [], {}, exp / "mobilenet" / "fold-0", fold=0) == {"val": {"accuracy": 0.5}}
