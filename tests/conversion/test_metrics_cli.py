"""Metrics, threshold calibration, the triage rule's agreement with the worker, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

from conversion import cli  # noqa: E402
from conversion import convert as convert_mod  # noqa: E402
from conversion.metrics import calibrate_thresholds, classification_metrics, roc_auc, urgent_mask  # noqa: E402
from worker.modelcard import ModelCard, triage  # noqa: E402

CLASSES = ["normal", "pneumonia", "covid19"]


def test_classification_metrics_and_auc():
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([[.8, .1, .1], [.4, .5, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.1, .2, .7]])
    m = classification_metrics(p, y, CLASSES)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["per_class"]["normal"]["sensitivity"] == 0.5
    assert m["per_class"]["pneumonia"]["precision"] == pytest.approx(2 / 3)
    assert m["confusion"][0] == [1, 1, 0]
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert roc_auc(np.array([0.5, 0.6]), np.array([1, 1])) is None


def test_threshold_calibration_meets_target_on_its_split():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 500)
    logits = rng.normal(0, 1, (500, 3)) + 2.0 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cal = calibrate_thresholds(p, y, CLASSES, {"covid19": 0.95, "pneumonia": 0.9})
    for c, target in (("covid19", 0.95), ("pneumonia", 0.9)):
        i = CLASSES.index(c)
        t = cal["thresholds"][c]
        assert (p[y == i, i] >= t).mean() >= target
        # the highest such threshold: any higher one misses the target
        assert (p[y == i, i] >= t + 1e-3).mean() < target or t >= 0.999
    with pytest.raises(ValueError, match="not one of"):
        calibrate_thresholds(p, y, CLASSES, {"flu": 0.9})


def test_urgent_mask_matches_worker_triage(fp16_result):
    card = ModelCard.load(fp16_result.out_dir)
    rng = np.random.default_rng(2)
    p = rng.dirichlet([1, 1, 1], 200)
    mask = urgent_mask(p, CLASSES, card.thresholds)
    worker = [triage(dict(zip(CLASSES, row, strict=True)), card).priority == "urgent" for row in p]
    assert mask.tolist() == worker


def _fake_loader(model, ckpt):
    def load(path: Path):
        return model, ckpt
    return load


def test_cli_convert_accepts_and_rejects(tiny_model, tiny_ckpt, tiny_data, tmp_path, monkeypatch, capsys):
    from tinyconv import TraceTrap

    ck = tmp_path / "best.pt"
    ck.write_bytes(b"stand-in; the loader is replaced")
    monkeypatch.setattr(convert_mod, "_load_checkpoint", _fake_loader(tiny_model, tiny_ckpt))
    rc = cli.main(["convert", str(ck), "--out", str(tmp_path / "ok"), "--manifest", str(tiny_data),
                   "--name", "cli-tiny", "--target", "covid19=0.9"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "accepted" in out and "gate parity_fp32 PASS" in out
    card = ModelCard.load(tmp_path / "ok")
    assert card.name == "cli-tiny" and list(card.thresholds) == ["covid19"]
    assert card.raw["training"]["checkpoint"]["sha256"]

    monkeypatch.setattr(convert_mod, "_load_checkpoint", _fake_loader(TraceTrap(tiny_model), tiny_ckpt))
    from worker import cli as worker_cli  # the installed entry point dispatches `convert` here

    rc = worker_cli.main(["convert", str(ck), "--out", str(tmp_path / "bad"), "--manifest", str(tiny_data)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "gate parity_fp32 FAIL" in err and "limit <= 0.0001" in err
    assert not (tmp_path / "bad").exists()


def test_cli_usage_errors(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--manifest", "x.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["convert", "x.pt", "--out", "o", "--target", "covid19=2"])
