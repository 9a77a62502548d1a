"""training.crossval: completion, cost, fold-mean CIs and per-source tables from small results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("scipy")

from training import config as config_mod  # noqa: E402
from training.crossval import mean_ci, sections  # noqa: E402


def test_mean_ci_is_the_t_interval() -> None:
    m, lo, hi = mean_ci([0.8, 0.9])
    assert m == pytest.approx(0.85)
    # t(0.975, 1) = 12.706; sd = 0.0707; half = 12.706 * 0.0707 / sqrt(2) = 0.635
    assert (lo, hi) == (pytest.approx(0.85 - 0.6353, abs=1e-3), pytest.approx(0.85 + 0.6353, abs=1e-3))
    assert mean_ci([0.7])[1:] == (None, None)


def _run(root: Path, model: str, fold: int, acc: float, rows: list[tuple[str, str, str, str, float]]) -> None:
    d = root / model / f"fold-{fold}"
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"model": model, "fold": fold, "parameters_keras": 1000, "n_train": 10,
                                            "precision": "float32"}))
    (d / "done.json").write_text('{"best_epoch": 1}')
    (d / "metrics.json").write_text(json.dumps({"test": {"accuracy": acc, "macro_auroc": 0.9}}))
    (d / "history.jsonl").write_text("".join(json.dumps({"epoch": e, "seconds": 10.0 + e, "train_seconds": 9.0,
                                                         "images_per_second": 5.0}) + "\n" for e in range(2)))
    lines = ["file,patient_id,group,label,pred,p_normal,p_pneumonia,p_covid19"]
    lines += [f"{f},{f},{g},{lab},{pred},0.1,0.1,{p}" for f, g, lab, pred, p in rows]
    (d / "predictions_test.csv").write_text("\n".join(lines) + "\n")
    (d / "predictions_holdout.csv").write_text("\n".join(lines) + "\n")


def test_sections_report_completion_cost_ci_and_sources(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("file,source\na.png,hospital-A\nb.png,hospital-B\nc.png,hospital-B\n")
    cfg = config_mod.load_config(None, ["experiment.mode=\"cv\"", 'experiment.models=["hybrid","mobilenet"]',
                                        "train.epochs=2"])
    exp = {"config": cfg, "manifest": str(manifest)}
    rows = [("a.png", "adult", "normal", "normal", 0.9), ("b.png", "child", "normal", "covid19", 0.1),
            ("c.png", "child", "covid19", "covid19", 0.8)]
    _run(tmp_path, "hybrid", 0, 0.8, rows)
    _run(tmp_path, "hybrid", 1, 0.9, rows)
    lines, summary = sections(tmp_path, exp, ["hybrid"])
    text = "\n".join(lines)
    assert summary["finished"] == ["hybrid/fold-0", "hybrid/fold-1"]
    assert "`mobilenet/fold-0`" in text and "hybrid/fold-2" in summary["remaining"] and len(summary["remaining"]) == 8
    assert summary["remaining_hours_estimate"] == pytest.approx(3 * 2 * 10.5 / 3600, abs=0.01)  # hybrid's 3 folds only
    assert summary["fold_mean"]["hybrid"]["accuracy"] == pytest.approx(0.85)
    assert summary["fold_mean"]["hybrid"]["ci95"][0] is not None
    per = summary["sources"]["hybrid"]["accuracy_out_of_fold"]
    assert per == {"hospital-A": 1.0, "hospital-B": 0.5}
    # non-COVID images: a (adult, p=0.9) and b (child, p=0.1): the score separates them fully
    assert summary["sources"]["hybrid"]["source_check_out_of_fold"] == 1.0
