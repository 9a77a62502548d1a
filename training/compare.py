"""Side-by-side comparison of single-split runs: cost, validation, test per age group and source.

``cxr-triage compare RUN [RUN ...] --manifest M --out DIR`` writes ``compare.md`` and
``compare.json`` from what each finished run left behind (``run.json``, ``history.jsonl``,
``metrics.json``, ``predictions_<split>.csv``): no checkpoint is needed, so a comparison can be
rebuilt from the small committed results.

Besides accuracy and AUROC it reports the two checks this data set needs (its classes come from
different hospitals, ages and publications, so a model can learn the source instead of the
disease):

* **source check**: among the test images that are not COVID-19, how well the COVID-19 score
  separates adults from children (AUROC, adults positive; 0.5 = not at all).  Every COVID-19 image
  is an adult's, so a model that learned "adult-looking film" scores adults higher; the target is
  at most 0.65 (issue 13).
* **accuracy per source collection** (manifest ``source`` column) and per age group.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import read_manifest
from .metrics import binary_auroc, bootstrap_ci

__all__ = ["run_summary", "write_comparison", "source_check"]

SOURCE_CHECK_MAX = 0.65


def _predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def source_check(rows: Sequence[dict[str, str]], score: str = "p_covid19", negative_class: str = "covid19") -> float | None:
    """AUROC of ``score`` for adult (1) vs child (0) among rows whose label is not ``negative_class``."""
    keep = [r for r in rows if r["label"] != negative_class and r["group"] in ("adult", "child")]
    if not keep or score not in keep[0] or len({r["group"] for r in keep}) < 2:
        return None
    adult = np.array([r["group"] == "adult" for r in keep])
    s = np.array([float(r[score]) for r in keep])
    return binary_auroc(adult, s)


def _accuracy(rows: Sequence[dict[str, str]]) -> float | None:
    return float(np.mean([r["label"] == r["pred"] for r in rows])) if rows else None


def run_summary(run: str | os.PathLike, sources: dict[str, str]) -> dict[str, Any]:
    """One run's figures (see the module docstring); ``sources`` maps manifest file -> source."""
    run = Path(run)
    info = json.loads((run / "run.json").read_text())
    hist = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines() if ln.strip()]
    met = json.loads((run / "metrics.json").read_text())
    best = json.loads((run / "done.json").read_text())["best_epoch"]
    test = _predictions(run / "predictions_test.csv")
    y = [r["label"] for r in test]
    pred = [r["pred"] for r in test]
    lo, hi = bootstrap_ci(y, pred)
    tm = met["test"]
    by_source: dict[str, list[dict[str, str]]] = {}
    for r in test:
        by_source.setdefault(sources.get(r["file"], "unknown"), []).append(r)
    per = tm["per_class"]
    return {
        "run": str(run),
        "seed": info.get("seed"),
        "epoch_sizes": info.get("epoch_sizes"),
        "epochs_run": len(hist),
        "train_seconds": round(sum(h.get("seconds", 0.0) for h in hist), 1),
        "cpu_seconds": round(sum(h["cpu_seconds"] for h in hist), 1) if all("cpu_seconds" in h for h in hist) else None,
        "best_epoch": best,
        "val_accuracy": met["val"]["accuracy"],
        "val_auroc": met["val"]["macro_auroc"],
        "val_balanced_accuracy": met["val"]["balanced_accuracy"],
        "test_accuracy": tm["accuracy"],
        "test_accuracy_ci": [lo, hi],
        "test_macro_auroc": tm["macro_auroc"],
        "test_by_group": {g: v["accuracy"] for g, v in tm.get("by_group", {}).items()},
        "covid19_sensitivity": per.get("covid19", {}).get("sensitivity"),
        "covid19_specificity": per.get("covid19", {}).get("specificity"),
        "source_check_auroc": source_check(test),
        "test_by_source": {s: {"n": len(rs), "accuracy": _accuracy(rs)} for s, rs in sorted(by_source.items())},
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _f3(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_comparison(runs: Sequence[str | os.PathLike], manifest: str | os.PathLike, out: str | os.PathLike,
                     *, title: str = "Comparison", names: Sequence[str] = ()) -> Path:
    """``compare.md`` + ``compare.json`` in ``out``; returns the Markdown path."""
    rows = read_manifest(manifest)
    sources = {r["file"]: r.get("source", "unknown") for r in rows}
    summaries = [run_summary(r, sources) for r in runs]
    labels = list(names) or [Path(r).name for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(dict(zip(labels, summaries, strict=True)), indent=2) + "\n")
    groups = sorted({g for s in summaries for g in s["test_by_group"]})
    srcs = sorted({k for s in summaries for k in s["test_by_source"]})
    head = "| | " + " | ".join(labels) + " |\n| --- |" + " --- |" * len(labels)
    lines = [f"# {title}", "", head]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(values) + " |")

    row("seed", [str(s["seed"]) for s in summaries])
    row("epoch sizes (px)", [" ".join(str(v) for v in s["epoch_sizes"] or []) for s in summaries])
    row("wall time of the epochs (s)", [f"{s['train_seconds']:.0f}" for s in summaries])
    row("CPU time of the epochs, all threads (s)", ["n/a" if s["cpu_seconds"] is None else f"{s['cpu_seconds']:.0f}" for s in summaries])
    row("selected epoch", [str(s["best_epoch"]) for s in summaries])
    row("validation accuracy %", [_pct(s["val_accuracy"]) for s in summaries])
    row("validation macro AUROC", [_f3(s["val_auroc"]) for s in summaries])
    row("validation balanced accuracy %", [_pct(s["val_balanced_accuracy"]) for s in summaries])
    row("test accuracy % [95 % CI]", [f"{_pct(s['test_accuracy'])} [{_pct(s['test_accuracy_ci'][0])}, {_pct(s['test_accuracy_ci'][1])}]"
                                      for s in summaries])
    row("test macro AUROC", [_f3(s["test_macro_auroc"]) for s in summaries])
    for g in groups:
        row(f"test accuracy %, {g}", [_pct(s["test_by_group"].get(g)) for s in summaries])
    row("COVID-19 sensitivity / specificity (argmax)", [f"{_f3(s['covid19_sensitivity'])} / {_f3(s['covid19_specificity'])}"
                                                         for s in summaries])
    row(f"source check: AUROC adult vs child of P(covid19), non-COVID test images (target <= {SOURCE_CHECK_MAX})",
        [_f3(s["source_check_auroc"]) for s in summaries])
    for src in srcs:
        n = next(s["test_by_source"][src]["n"] for s in summaries if src in s["test_by_source"])
        row(f"test accuracy %, {src} (n={n})", [_pct(s["test_by_source"].get(src, {}).get("accuracy")) for s in summaries])
    lines += ["", "Built by `cxr-triage compare` from each run's run.json, history.jsonl, metrics.json and "
              "predictions_test.csv (bootstrap CI over test images, 2,000 resamples). The test split is the manifest's own: "
              "never used for training or selection.", ""]
    path = out / "compare.md"
    path.write_text("\n".join(lines))
    return path
