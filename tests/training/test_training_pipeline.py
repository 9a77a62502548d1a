"""The whole path on a few dozen synthetic images at 32 px: manifest -> folds -> train ->
checkpoint -> evaluate -> report, through ``cxr-triage`` (worker.cli dispatches to training.cli)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.checkpoint import FORMAT, load_checkpoint
from training.config import ConfigError, load_config, to_toml
from worker.cli import main as cxr_main
from worker.imaging import PreprocessSpec

SMALL = ["--set", "data.size=32", "--set", "train.batch_size=8", "--set", "train.eval_batch_size=32",
         "--set", "train.progress=\"none\"", "--set", "model.head_hidden=16"]


def _train(manifest: Path, out: Path, *extra: str) -> int:
    return cxr_main(["train", "--set", f'data.manifest="{manifest}"', *SMALL, *extra, "--out", str(out)])


def test_cv_protocol_end_to_end(tiny_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    rc = _train(tiny_manifest, out, "--mode", "cv", "--models", "hybrid,resnet50,mobilenet", "--set", "cv.folds=2",
                "--set", "cv.val_fraction=0.3", "--set", "train.epochs=1", "--set", "train.max_train_batches=2")
    assert rc == 0
    exp = json.loads((out / "experiment.json").read_text())
    assert exp["manifest_sha256"] and exp["commit"] and exp["versions"]["torch"]
    assert load_config(out / "config.toml")["data"]["size"] == 32  # the resolved config re-loads
    folds = json.loads((out / "folds.json").read_text())["folds"]
    assert len(folds) == 2
    for f in folds:
        assert not set(f["train"]["patients"]) & set(f["test"]["patients"])
        assert not set(f["val"]["patients"]) & set(f["test"]["patients"])
    for m in ("hybrid", "resnet50", "mobilenet"):
        for k in range(2):
            run = out / m / f"fold-{k}"
            assert (run / "done.json").exists() and not (run / "last.pt").exists()
            hist = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines()]
            assert [h["epoch"] for h in hist] == [0]
            met = json.loads((run / "metrics.json").read_text())
            assert set(met) == {"val", "test", "holdout"}
    # evaluate: metrics for every run, plots for one (plots cost seconds each)
    assert cxr_main(["evaluate", str(out), "--no-plots"]) == 0
    assert cxr_main(["evaluate", str(out / "hybrid" / "fold-0")]) == 0
    assert (out / "hybrid" / "fold-0" / "roc_test.png").stat().st_size > 1000
    assert (out / "hybrid" / "fold-0" / "confusion_holdout.png").exists()
    # report: the paper's tables
    rep = tmp_path / "report"
    assert cxr_main(["report", str(out), "--out", str(rep), "--label", "TEST"]) == 0
    text = (rep / "report.md").read_text()
    for needle in ("Table 3", "Table 4", "Table 5/6", "hybrid vs resnet50", "hybrid vs mobilenet", "94.43", "By age group", "27,124,280"):
        assert needle in text, needle
    for f in ("table3_folds.csv", "table4_summary.csv", "ttest.csv", "groups.csv", "roc_covid19.png", "confusion_hybrid.png",
              "curves_mobilenet.png", "config.toml", "command.txt", "summary.json"):
        assert (rep / f).exists(), f
    # resuming a finished experiment trains nothing and changes nothing; without --resume it is refused
    before = (out / "hybrid" / "fold-0" / "best.pt").stat().st_mtime_ns
    again = ["--mode", "cv", "--models", "hybrid,resnet50,mobilenet", "--set", "cv.folds=2", "--set", "cv.val_fraction=0.3",
             "--set", "train.epochs=1", "--set", "train.max_train_batches=2"]
    assert _train(tiny_manifest, out, *again) == 2
    assert _train(tiny_manifest, out, *again, "--resume") == 0
    assert _train(tiny_manifest, out, *again, "--set", "train.lr=0.1", "--resume") == 2  # another recipe: refused
    assert (out / "hybrid" / "fold-0" / "best.pt").stat().st_mtime_ns == before


def test_single_run_checkpoint_resume_and_evaluate(tiny_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "single"
    args = ["--models", "mobilenet", "--set", "train.max_train_batches=2", "--set", "train.keep_last=true", "--set", "train.seed=3"]
    assert _train(tiny_manifest, out, *args, "--set", "train.epochs=1") == 0
    # simulate an interrupted longer run: resume from last.pt and train only the missing epoch
    (out / "done.json").unlink()
    assert _train(tiny_manifest, out, *args, "--set", "train.epochs=2", "--resume") == 0
    hist = [json.loads(ln) for ln in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1]

    ck = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert ck["format"] == FORMAT
    assert ck["model"] == {"name": "mobilenet", "num_classes": 3, "kwargs": {"mobilenet": "v2", "head_hidden": 16, "dropout": 0.5}}
    assert ck["classes"] == ["normal", "pneumonia", "covid19"]
    assert ck["input"] == {"size": [32, 32], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "layout": "NCHW"}
    assert ck["preprocessing"] == {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"}
    assert ck["training"]["best_epoch"] in (0, 1) and len(ck["training"]["manifest_sha256"]) == 64
    assert {"config", "commit", "versions"} <= set(ck["training"])
    test = ck["metrics"]["test"]
    assert {"accuracy", "per_class", "confusion", "by_group", "shortcut"} <= set(test)
    assert {"sensitivity", "specificity", "auroc"} <= set(test["per_class"]["covid19"])
    assert set(test["by_group"]) <= {"adult", "child"}
    assert PreprocessSpec.from_card(ck).size == (32, 32)

    model, meta = load_checkpoint(out / "best.pt")
    assert not model.training and "state_dict" not in meta
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)

    ev = tmp_path / "ev"
    assert cxr_main(["evaluate", "--checkpoint", str(out / "best.pt"), "--manifest", str(tiny_manifest), "--out", str(ev)]) == 0
    m = json.loads((ev / "metrics.json").read_text())["test"]
    assert m["accuracy"] == pytest.approx(test["accuracy"])  # same pixels, same weights, same numbers
    rep = tmp_path / "rep"
    assert cxr_main(["report", str(out), "--out", str(rep)]) == 0
    assert "Test split" in (rep / "report.md").read_text()


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    cfg = load_config(None, ["train.lr=3e-4", 'experiment.models=["resnet50"]', "train.epochs=5", "model.mobilenet=v1"])
    assert cfg["train"]["lr"] == 3e-4 and cfg["experiment"]["models"] == ["resnet50"] and cfg["model"]["mobilenet"] == "v1"
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_config(p) == cfg
    with pytest.raises(ConfigError, match="unknown config key train.lrr"):
        load_config(None, ["train.lrr=1"])
    with pytest.raises(ConfigError):
        load_config(None, ["experiment.models=[\"vgg\"]"])
    assert cxr_main(["train", "--set", "train.nope=1", "--out", str(tmp_path / "x")]) == 2


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[2] / "training" / "configs"
    names = sorted(p.name for p in root.glob("*.toml"))
    assert {"paper-3class.toml", "paper-4class.toml", "default-3class.toml", "cpu-reduced-3class.toml"} <= set(names)
    for p in root.glob("*.toml"):
        load_config(p)
    assert np.isclose(load_config(root / "paper-3class.toml")["train"]["lr"], 1e-3)


def test_compare_runs_side_by_side(tiny_manifest: Path, tmp_path: Path) -> None:
    common = ["--models", "mobilenet", "--set", "train.max_train_batches=2", "--set", "train.epochs=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(tiny_manifest, a, *common) == 0
    assert _train(tiny_manifest, b, *common, "--set", "train.progressive_sizes=[24]", "--set", "train.final_epochs=1",
                  "--set", 'train.schedule="onecycle"') == 0
    assert [h["size"] for h in map(json.loads, (b / "history.jsonl").read_text().splitlines())] == [24, 32]
    out = tmp_path / "cmp"
    assert cxr_main(["compare", str(a), str(b), "--manifest", str(tiny_manifest), "--out", str(out), "--names", "plain,progressive"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert set(data) == {"plain", "progressive"}
    met = json.loads((a / "metrics.json").read_text())
    assert data["plain"]["test_accuracy"] == pytest.approx(met["test"]["accuracy"])
    assert data["progressive"]["epoch_sizes"] == [24, 32]
    assert set(data["plain"]["test_by_source"]) == {"synthetic"}
    assert data["plain"]["source_check_auroc"] is not None and 0.0 <= data["plain"]["source_check_auroc"] <= 1.0
    text = (out / "compare.md").read_text()
    assert "| plain | progressive |" in text and "source check" in text and "synthetic (n=" in text
    assert cxr_main(["compare", str(a), "--manifest", str(tiny_manifest), "--out", str(out), "--names", "x,y"]) == 2
