"""The parts of a cross-validation report that say how far it got and what it cost (issue 20).

:func:`sections` adds to ``cxr-triage report`` for a ``cv`` experiment, from the small results
alone (training.publication):

* **completion**: which (model, fold) runs are finished, which are still to run, and about how
  long the rest takes here, from the finished runs' own epoch times;
* **cost here** (beside the paper's Table 2): seconds per epoch (training and validation; the
  median, so an epoch slowed by other work does not skew it), images per second, epochs run and
  the selected epoch of each fold;
* **fold-mean accuracy and macro AUROC with a 95 % confidence interval** (Student's t over the
  finished folds, k - 1 degrees of freedom), with the paper's number beside the hybrid's;
* **accuracy per source collection** (the manifest's ``source`` column) and the **source check**
  (AUROC of P(covid19) for adult vs child among non-COVID-19 images: can the score tell the
  hospitals apart?), out of fold and for the fold ensemble on the manifest's test split.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .compare import SOURCE_CHECK_MAX, _accuracy, _predictions, source_check
from .evaluate import find_runs

__all__ = ["sections", "mean_ci"]


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and the two-sided t interval of the mean (None with fewer than two values)."""
    v = [float(x) for x in values]
    m = float(np.mean(v)) if v else float("nan")
    if len(v) < 2:
        return m, None, None
    from scipy import stats

    half = float(stats.t.ppf(0.5 + level / 2, len(v) - 1)) * statistics.stdev(v) / len(v) ** 0.5
    return m, m - half, m + half


def _rows(path: Path) -> list[dict[str, str]]:
    return _predictions(path) if path.is_file() else []


def _history(run: Path) -> list[dict[str, Any]]:
    p = run / "history.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def _pct(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.1f}"


def _ensemble(per_fold: Sequence[list[dict[str, str]]]) -> list[dict[str, str]]:
    """Mean probabilities of the fold models per image (the same test images in every fold)."""
    by_file: dict[str, list[dict[str, str]]] = {}
    for rows in per_fold:
        for r in rows:
            by_file.setdefault(r["file"], []).append(r)
    out = []
    for _file, rs in by_file.items():
        keys = [k for k in rs[0] if k.startswith("p_")]
        mean = {k: float(np.mean([float(r[k]) for r in rs])) for k in keys}
        out.append({**rs[0], **{k: f"{v:.6f}" for k, v in mean.items()}, "pred": max(mean, key=mean.__getitem__)[2:]})
    return out


def _sources(manifest: str) -> dict[str, str]:
    rows = _rows(Path(manifest))
    return {r["file"]: r.get("source", "unknown") for r in rows}


def sections(path: Path, exp: dict[str, Any], models: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and a summary dict for the cv experiment in ``path``."""
    cfg = exp["config"]
    c, t = cfg["cv"], cfg["train"]
    folds = [int(k) for k in c["only_folds"]] or list(range(int(c["folds"])))
    runs: dict[tuple[str, int], Path] = {}
    for r in find_runs([path]):
        info = json.loads((r / "run.json").read_text())
        if (r / "done.json").exists() and info.get("fold") is not None:
            runs[(info["model"], int(info["fold"]))] = r
    wanted = list(cfg["experiment"]["models"])
    L: list[str] = []
    summary: dict[str, Any] = {"finished": sorted(f"{m}/fold-{k}" for m, k in runs), "remaining": []}

    # completion
    remaining = [(m, k) for k in folds for m in wanted if (m, k) not in runs]
    epoch_s = {m: statistics.median([h["seconds"] for k in folds if (m, k) in runs for h in _history(runs[(m, k)])] or [0.0])
               for m in wanted}
    L += ["### Completion", ""]
    L.append(f"Finished: {len(runs)} of {len(folds) * len(wanted)} runs "
             f"({', '.join(f'`{m}/fold-{k}`' for m, k in sorted(runs, key=lambda x: (x[1], wanted.index(x[0]) if x[0] in wanted else 9)))})."
             if runs else "Finished: none yet.")
    if remaining:
        est = sum(epoch_s[m] * int(t["epochs"]) for m, _k in remaining if epoch_s.get(m))
        unknown = sorted({m for m, _k in remaining if not epoch_s.get(m)})
        L.append("")
        L.append(f"**Still to run ({len(remaining)}):** " + ", ".join(f"`{m}/fold-{k}`" for m, k in remaining) + ". "
                 f"At the median epoch time measured here, about {est / 3600:.1f} h of this machine"
                 + (f" (plus {', '.join(unknown)}, not timed yet)" if unknown else "") + ". "
                 "They run with the same command and `--results` (training.publication): finished runs are skipped.")
        summary["remaining"] = [f"{m}/fold-{k}" for m, k in remaining]
        summary["remaining_hours_estimate"] = round(est / 3600, 2)
    L.append("")

    # cost here
    L += ["### Cost here (beside the paper's Table 2)", ""]
    rows = []
    for m in models:
        done = [runs[(m, k)] for k in folds if (m, k) in runs]
        if not done:
            continue
        hist = [h for r in done for h in _history(r)]
        info = json.loads((done[0] / "run.json").read_text())
        best = [json.loads((r / "done.json").read_text()).get("best_epoch") for r in done]
        rows.append([m, f"{info.get('parameters_keras', 0):,}", f"{statistics.median(h['train_seconds'] for h in hist):.0f}",
                     f"{statistics.median(h['seconds'] for h in hist):.0f}",
                     f"{statistics.median(h['images_per_second'] for h in hist if h.get('images_per_second')):.1f}",
                     f"{len(hist) / len(done):.1f}", ", ".join(str(b) for b in best),
                     info.get("precision", "n/a"), info.get("n_train", "n/a")])
    L.append("| model | parameters (Keras count) | s per epoch, training (median) | s per epoch with validation | images/s | epochs per fold | selected epoch per fold | precision | training images per fold |")
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    L += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    L.append("")

    # fold means with CIs
    paper = {"label3": 94.43, "label4": 84.35}.get(cfg["data"]["label"])
    L += ["### Fold-mean accuracy and macro AUROC, 95 % t confidence interval over the finished folds", ""]
    L.append("| model | folds | accuracy % mean [95 % CI] | macro AUROC mean [95 % CI] | paper (its data, 224 px, 5 folds) |")
    L.append("| --- | --- | --- | --- | --- |")
    summary["fold_mean"] = {}
    for m in models:
        done = [runs[(m, k)] for k in folds if (m, k) in runs]
        if not done:
            continue
        mets = [json.loads((r / "metrics.json").read_text())["test"] for r in done]
        am, alo, ahi = mean_ci([x["accuracy"] for x in mets])
        um, ulo, uhi = mean_ci([x["macro_auroc"] for x in mets if x.get("macro_auroc") is not None])
        ci_a = f"[{100 * alo:.1f}, {100 * ahi:.1f}]" if alo is not None else "(one fold: no interval)"
        ci_u = f"[{ulo:.3f}, {uhi:.3f}]" if ulo is not None else ""
        L.append(f"| {m} | {len(done)} | {100 * am:.1f} {ci_a} | {um:.3f} {ci_u} | "
                 f"{f'{paper:.2f} %' if paper and m == 'hybrid' else 'n/a'} |")
        summary["fold_mean"][m] = {"folds": len(done), "accuracy": am, "ci95": [alo, ahi], "macro_auroc": um}
    L.append("")

    # sources and the source check
    sources = _sources(exp["manifest"])
    if not sources:
        L += [f"(Per-source tables need the manifest, `{exp['manifest']}`: not found here.)", ""]
        return L, summary
    names = sorted({sources.get(r["file"], "unknown") for m in models for k in folds if (m, k) in runs
                    for r in _rows(runs[(m, k)] / "predictions_test.csv")})
    L += ["### Accuracy per source collection and the source check", "",
          "Out of fold: every finished fold's held-out patients, pooled. Test split: the fold models' mean "
          f"probabilities on the manifest's test split (the fold ensemble). Source check: AUROC of P(covid19) for "
          f"adult vs child among the non-COVID-19 images (0.5 = the score cannot tell them apart; the training "
          f"issue's target is <= {SOURCE_CHECK_MAX}).", ""]
    hdr = ["model", "images", "source check, out of fold", "source check, test split ensemble",
           *[f"{s} %" for s in names]]
    L.append("| " + " | ".join(hdr) + " |")
    L.append("| " + " | ".join("---" for _ in hdr) + " |")
    summary["sources"] = {}
    for m in models:
        done = [runs[(m, k)] for k in folds if (m, k) in runs]
        if not done:
            continue
        oof = [r for d in done for r in _rows(d / "predictions_test.csv")]
        held = _ensemble([_rows(d / "predictions_holdout.csv") for d in done if (d / "predictions_holdout.csv").is_file()])
        sc_oof, sc_hold = source_check(oof), source_check(held) if held else None
        per = {s: _accuracy([r for r in oof if sources.get(r["file"], "unknown") == s]) for s in names}
        L.append(f"| {m} | {len(oof)} out of fold, {len(held)} test | {'n/a' if sc_oof is None else f'{sc_oof:.3f}'} | "
                 f"{'n/a' if sc_hold is None else f'{sc_hold:.3f}'} | " + " | ".join(_pct(per[s]) for s in names) + " |")
        summary["sources"][m] = {"source_check_out_of_fold": sc_oof, "source_check_test_ensemble": sc_hold,
                                 "accuracy_out_of_fold": per}
    counts = {s: sum(1 for k in folds if (models[0], k) in runs
                     for r in _rows(runs[(models[0], k)] / "predictions_test.csv") if sources.get(r["file"], "unknown") == s)
              for s in names} if models else {}
    L += ["", "Images per source, out of fold: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + ".", ""]
    return L, summary
