"""``cxr-triage evaluate``: metrics and plots per run (and per fold), or a checkpoint on a manifest.

For a run folder (one with ``run.json``; found recursively below the given paths) the stored
``predictions_<split>.csv`` files are re-scored: ``metrics.json`` (accuracy, per-class
precision/recall/F1/specificity, one-vs-rest AUROC, confusion matrix, ``by_group`` and the group
shortcut check) and PNGs: ``confusion_<split>.png``, ``roc_<split>.png``, ``curves.png``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import classification_metrics

log = logging.getLogger(__name__)

__all__ = ["find_runs", "read_predictions", "read_history", "evaluate_run", "evaluate_paths", "evaluate_checkpoint"]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding ``run.json``) at or below ``paths``, sorted."""
    out: set[Path] = set()
    for p in paths:
        p = Path(p)
        if (p / "run.json").is_file():
            out.add(p)
        out.update(q.parent for q in p.rglob("run.json"))
    return sorted(out)


def read_predictions(path: str | Path) -> dict[str, Any]:
    """{"classes", "y" (int array), "prob" (N, K), "groups", "files", "patients"} from a predictions CSV."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {"classes": [], "y": np.zeros(0, int), "prob": np.zeros((0, 0)), "groups": [], "files": [], "patients": []}
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    idx = {c: i for i, c in enumerate(classes)}
    return {
        "classes": classes,
        "y": np.array([idx[r["label"]] for r in rows], dtype=np.int64),
        "prob": np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64),
        "groups": [r["group"] for r in rows],
        "files": [r["file"] for r in rows],
        "patients": [r["patient_id"] for r in rows],
    }


def read_history(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / "history.jsonl"
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]


def _splits(run_dir: Path) -> list[str]:
    return sorted(p.stem.removeprefix("predictions_") for p in run_dir.glob("predictions_*.csv"))


def evaluate_run(run_dir: str | Path, *, plots: bool = True) -> dict[str, Any]:
    from . import plots as P

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    metrics: dict[str, Any] = {}
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    title = f"{info.get('model')}" + (f" fold {info['fold']}" if info.get("fold") is not None else "")
    for split in _splits(run_dir):
        pr = read_predictions(run_dir / f"predictions_{split}.csv")
        if len(pr["y"]) == 0:
            continue
        loss = old.get(split, {}).get("loss")
        metrics[split] = classification_metrics(pr["y"], pr["prob"], pr["classes"], groups=pr["groups"], loss=loss)
        if plots:
            P.plot_confusion(metrics[split]["confusion"], pr["classes"], run_dir / f"confusion_{split}.png",
                             f"{title}, {split}: accuracy {metrics[split]['accuracy']:.1%}")
            P.plot_roc(pr["y"], pr["prob"], pr["classes"], run_dir / f"roc_{split}.png", f"{title}, {split}")
    hist = read_history(run_dir)
    if plots and hist:
        P.plot_curves({title: hist}, run_dir / "curves.png", title)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def evaluate_paths(paths: Sequence[str | Path], *, plots: bool = True) -> int:
    runs = [r for r in find_runs(paths) if (r / "done.json").exists()]
    for r in runs:
        m = evaluate_run(r, plots=plots)
        acc = ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in m.items())
        print(f"{r}: {acc}")
    return len(runs)


def evaluate_checkpoint(checkpoint: str | Path, manifest: str | Path, out: str | Path, *, split: str = "test",
                        label: str | None = None, plots: bool = True) -> dict[str, Any]:
    """Run a checkpoint over the rows of ``manifest`` whose ``split`` column equals ``split``
    (all rows when empty); writes predictions, metrics.json and plots to ``out``."""
    import torch

    from worker.imaging import PreprocessSpec

    from . import plots as P
    from .checkpoint import load_checkpoint
    from .data import ManifestDataset, read_manifest
    from .train import _write_predictions, predict

    model, meta = load_checkpoint(checkpoint)
    spec = PreprocessSpec.from_card(meta)
    cfg = meta.get("training", {}).get("config", {})
    label = label or cfg.get("data", {}).get("label", "label3")
    group_col = cfg.get("data", {}).get("group_column", "age_group") or None
    rows = read_manifest(manifest)
    if split:
        rows = [r for r in rows if r.get("split") == split]
    ds = ManifestDataset(rows, meta["classes"], label=label, spec=spec, group_column=group_col if rows and group_col in rows[0] else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prob, _ = predict(model, ds, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = split or "all"
    _write_predictions(out / f"predictions_{name}.csv", ds, prob)
    m = classification_metrics(ds.labels, prob, meta["classes"], groups=ds.groups)
    (out / "metrics.json").write_text(json.dumps({name: m}, indent=2) + "\n")
    if plots:
        P.plot_confusion(m["confusion"], meta["classes"], out / f"confusion_{name}.png", f"{Path(checkpoint).name}, {name}: accuracy {m['accuracy']:.1%}")
        P.plot_roc(ds.labels, prob, meta["classes"], out / f"roc_{name}.png", f"{Path(checkpoint).name}, {name}")
    print(f"{checkpoint} on {manifest} [{name}]: accuracy {m['accuracy']:.1%} (n={m['n']})")
    return m
