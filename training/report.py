"""``cxr-triage report``: a Markdown report per experiment with the paper's tables beside ours.

From the run folders of one or more experiments (``experiment.json`` + runs) it writes, into
``--out``: ``report.md``, CSV tables (``table3_folds.csv``, ``table4_summary.csv``,
``ttest.csv``, ``groups.csv``), ``summary.json``, PNGs (ROC per class comparing the models,
confusion matrices, training curves), ``config.toml`` and ``command.txt``.

Paper numbers (Nandi & Mulimani 2021) used: hybrid accuracy 94.43 % (3 classes) and 84.35 %
(4 classes), Table 2's 27,124,280 parameters.  Numbers the paper gives that are not recorded here
(per-fold accuracies, AUROCs, baseline accuracies, t statistics) are shown as "n/a", never guessed.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import find_runs, read_history, read_predictions
from .metrics import bootstrap_ci, classification_metrics

__all__ = ["write_report", "PAPER"]

#: What we know of the paper's results; everything else is "n/a".
PAPER = {
    "label3": {"hybrid_accuracy": 94.43},
    "label4": {"hybrid_accuracy": 84.35},
    "table2_total_parameters": 27_124_280,
}
MODEL_ORDER = ("hybrid", "resnet50", "mobilenet")


def _pct(v: float | None, nd: int = 1) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{nd}f}"


def _f(v: float | None, nd: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _ms(vals: Sequence[float], pct: bool = True, nd: int = 1) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    k = 100 if pct else 1
    m = float(np.mean(vals)) * k
    if len(vals) < 2:
        return f"{m:.{nd}f}"
    return f"{m:.{nd}f} ± {float(np.std(vals, ddof=1)) * k:.{nd}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _concat(preds: Sequence[dict]) -> dict:
    return {
        "classes": preds[0]["classes"],
        "y": np.concatenate([p["y"] for p in preds]),
        "prob": np.concatenate([p["prob"] for p in preds]),
        "groups": sum((list(p["groups"]) for p in preds), []),
        "files": sum((list(p["files"]) for p in preds), []),
    }


def _models(runs: dict) -> list[str]:
    return [m for m in MODEL_ORDER if m in runs] + sorted(m for m in runs if m not in MODEL_ORDER)


def _group_section(name: str, m: dict, classes: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    """Markdown lines and CSV rows of the per-group metrics of one metrics dict."""
    lines = []
    rows = []
    header = ["group", "n", "accuracy %", *[f"{c} recall" for c in classes], *[f"{c} AUROC" for c in classes]]
    trs = []
    for g, gm in sorted(m.get("by_group", {}).items()):
        r = [g, gm["n"], _pct(gm["accuracy"]),
             *[_f(gm["per_class"][c]["recall"], 2) if gm["per_class"][c]["support"] else "-" for c in classes],
             *[_f(gm["per_class"][c]["auroc"]) for c in classes]]
        trs.append(r)
        rows.append([name, *r])
    lines.append(_table(header, trs))
    sc = m.get("shortcut")
    if sc:
        lines.append("")
        lines.append(f"Group shortcut check: Cramér's V(prediction, group) = {sc['cramers_v_pred_group']:.2f}, "
                     f"V(true label, group) = {sc['cramers_v_true_group']:.2f}. "
                     + ("**FLAG: predictions follow the group rather than the disease**: " + "; ".join(sc["reasons"]) if sc["flag"]
                        else "No flag (predictions are not more group-bound than the labels; no class recognised in one group and missed in another)."))
    return lines, rows


def _experiment(path: Path, out: Path, prefix: str) -> tuple[list[str], dict]:
    exp = json.loads((path / "experiment.json").read_text())
    cfg = exp["config"]
    label = cfg["data"]["label"]
    fin = json.loads((path / "finished.json").read_text()) if (path / "finished.json").exists() else None
    runs: dict[str, dict] = {}
    for r in find_runs([path]):
        if not (r / "done.json").exists():
            continue
        info = json.loads((r / "run.json").read_text())
        runs.setdefault(info["model"], {})[info["fold"] if info["fold"] is not None else "single"] = r
    models = _models(runs)
    L: list[str] = []
    summary: dict[str, Any] = {"experiment": cfg["experiment"]["name"], "mode": cfg["experiment"]["mode"], "label": label, "models": {}}
    t = cfg["train"]
    L.append(f"## Experiment `{cfg['experiment']['name']}` ({cfg['experiment']['mode']}, {label})")
    L.append("")
    if cfg["experiment"].get("note"):
        L.append(f"**{cfg['experiment']['note']}**")
        L.append("")
    L.append(_table(["setting", "value"], [
        ["manifest", f"`{exp['manifest']}` (sha256 `{exp['manifest_sha256'][:16]}…`)"],
        ["input", f"{cfg['data']['size']} px, grey replicated to 3 channels, ImageNet mean/std (worker.imaging)"],
        ["models", ", ".join(models)],
        ["MobileNet", f"{cfg['model']['mobilenet']}, weights `{cfg['model']['mobilenet_weights'] or cfg['model']['weights']}`"],
        ["ResNet50 weights", f"`{cfg['model']['resnet_weights'] or cfg['model']['weights']}`"],
        ["head", f"Dense({cfg['model']['head_hidden']}) + ReLU + Dropout({cfg['model']['dropout']}) + Dense(classes)"],
        ["optimiser", f"{t['optimizer']} lr {t['lr']}, weight decay {t['weight_decay']}, {t['schedule']} schedule, warm-up {t['warmup_epochs']}"],
        ["epochs / batch", f"{t['epochs']} (patience {t['patience']}, select on {t['select']}) / {t['batch_size']}"],
        ["loss", f"cross-entropy, class weights {t['class_weights']}, label smoothing {t['label_smoothing']}"],
        ["augmentation", "on" if t["augment"] else "off"],
        ["commit", f"`{exp['commit']}`"],
        ["versions", ", ".join(f"{k} {v}" for k, v in exp["versions"].items() if v)],
        ["command", f"`{exp['command']}`"],
        ["wall time", f"{fin['seconds'] / 60:.1f} min" if fin else "unfinished (report made from the complete runs)"],
    ]))
    L.append("")
    if not runs:
        L.append("No complete runs.")
        return L, summary
    classes = read_predictions(next(iter(next(iter(runs.values())).values())) / "predictions_val.csv")["classes"]

    # parameter counts
    L.append("### Parameters (Keras-style count: batch-norm running statistics included)")
    L.append("")
    prow = []
    for m in models:
        info = json.loads((next(iter(runs[m].values())) / "run.json").read_text())
        prow.append([m, f"{info['parameters_keras']:,}", f"{info['parameters']:,}"])
    L.append(_table(["model", "parameters (Keras count)", "trainable (PyTorch count)"], prow))
    L.append("")

    if cfg["experiment"]["mode"] == "cv":
        folds = sorted({k for m in models for k in runs[m]})
        complete = [k for k in folds if all(k in runs[m] for m in models)]
        L.append(f"Folds complete for every model: {len(complete)} of {cfg['cv']['folds']} ({', '.join(str(k + 1) for k in complete)}).")
        L.append("")
        from .crossval import sections

        extra, summary["cv"] = sections(path, exp, models)
        L += extra
        acc: dict[str, dict[int, float]] = {m: {} for m in models}
        auc: dict[str, dict[str, list]] = {m: {c: [] for c in classes} for m in models}
        oof: dict[str, dict] = {}
        hold: dict[str, list] = {}
        for m in models:
            preds = []
            for k in folds:
                if k not in runs[m]:
                    continue
                p = read_predictions(runs[m][k] / "predictions_test.csv")
                preds.append(p)
                mm = classification_metrics(p["y"], p["prob"], classes)
                acc[m][k] = mm["accuracy"]
                for c in classes:
                    auc[m][c].append(mm["per_class"][c]["auroc"])
                hp = runs[m][k] / "predictions_holdout.csv"
                if hp.exists():
                    hold.setdefault(m, []).append(read_predictions(hp))
            oof[m] = _concat(preds)
        paper_acc = PAPER.get(label, {}).get("hybrid_accuracy")
        # Table 3
        L.append("### Table 3: accuracy per fold (%, each fold's held-out patients)")
        L.append("")
        hdr = ["fold", *models, "paper hybrid"]
        rows3 = [[k + 1, *[_pct(acc[m].get(k)) for m in models], "n/a"] for k in folds]
        L.append(_table(hdr, rows3))
        _write_csv(out / f"{prefix}table3_folds.csv", hdr, rows3)
        L.append("")
        # Table 4
        L.append("### Table 4: mean accuracy and per-class AUROC over folds (mean ± sd)")
        L.append("")
        hdr4 = ["model", "accuracy %", *[f"AUROC {c}" for c in classes]]
        rows4 = [[m, _ms(list(acc[m].values())), *[_ms(auc[m][c], pct=False, nd=3) for c in classes]] for m in models]
        rows4.append(["paper hybrid", f"{paper_acc:.2f}" if paper_acc else "n/a", *["n/a" for _ in classes]])
        rows4.append(["paper resnet50 / mobilenet", "n/a", *["n/a" for _ in classes]])
        L.append(_table(hdr4, rows4))
        _write_csv(out / f"{prefix}table4_summary.csv", hdr4, rows4)
        L.append("")
        # Table 5/6: paired t-tests
        L.append("### Table 5/6: paired t-test over folds, hybrid vs each baseline (accuracy)")
        L.append("")
        trows = []
        if "hybrid" in models:
            from scipy.stats import ttest_rel

            for b in models:
                if b == "hybrid":
                    continue
                ks = [k for k in complete]
                a1 = [acc["hybrid"][k] for k in ks]
                a2 = [acc[b][k] for k in ks]
                if len(ks) >= 2 and np.std(np.subtract(a1, a2)) > 0:
                    res = ttest_rel(a1, a2)
                    trows.append([f"hybrid vs {b}", len(ks), _pct(float(np.mean(np.subtract(a1, a2)))), _f(float(res.statistic), 2), _f(float(res.pvalue), 4), "n/a"])
                else:
                    trows.append([f"hybrid vs {b}", len(ks), _pct(float(np.mean(np.subtract(a1, a2)))) if ks else "n/a", "n/a", "n/a", "n/a"])
        hdr5 = ["comparison", "folds", "mean difference (points)", "t", "p (two-sided)", "paper p"]
        L.append(_table(hdr5, trows))
        _write_csv(out / f"{prefix}ttest.csv", hdr5, trows)
        L.append("")
        L.append("With 5 folds a paired t-test has 4 degrees of freedom; folds share training patients, so p-values are optimistic (Nadeau & Bengio).")
        L.append("")
        # pooled out-of-fold
        L.append("### Out-of-fold predictions pooled over folds (every training patient predicted once)")
        L.append("")
        prow = []
        grows: list[list[Any]] = []
        for m in models:
            o = oof[m]
            mm = classification_metrics(o["y"], o["prob"], classes, groups=o["groups"])
            lo, hi = bootstrap_ci(o["y"], o["prob"].argmax(1))
            summary["models"].setdefault(m, {})["oof"] = {"accuracy": mm["accuracy"], "ci95": [lo, hi], "per_class": mm["per_class"],
                                                           "fold_accuracy": acc[m], "shortcut": mm["shortcut"]}
            prow.append([m, mm["n"], f"{_pct(mm['accuracy'])} [{_pct(lo)}, {_pct(hi)}]", _pct(mm["balanced_accuracy"]),
                         *[f"{_f(mm['per_class'][c]['precision'], 2)} / {_f(mm['per_class'][c]['recall'], 2)} / {_f(mm['per_class'][c]['f1'], 2)} / {_f(mm['per_class'][c]['auroc'])}" for c in classes]])
            oof[m]["metrics"] = mm
        L.append(_table(["model", "n", "accuracy % [95 % bootstrap CI]", "balanced acc %", *[f"{c}: P / R / F1 / AUROC" for c in classes]], prow))
        L.append("")
        L.append("#### By age group (out-of-fold)")
        L.append("")
        for m in models:
            L.append(f"**{m}**")
            L.append("")
            gl, gr = _group_section(f"{m} oof", oof[m]["metrics"], classes)
            L += gl
            grows += gr
            L.append("")
        # holdout
        if hold:
            L.append("### The manifest's test split (same images for every fold model)")
            L.append("")
            hrows = []
            for m in models:
                if m not in hold:
                    continue
                accs = [classification_metrics(p["y"], p["prob"], classes)["accuracy"] for p in hold[m]]
                ens = np.mean([p["prob"] for p in hold[m]], axis=0)
                y = hold[m][0]["y"]
                em = classification_metrics(y, ens, classes, groups=hold[m][0]["groups"])
                lo, hi = bootstrap_ci(y, ens.argmax(1))
                adult = em.get("by_group", {}).get("adult", {}).get("accuracy")
                child = em.get("by_group", {}).get("child", {}).get("accuracy")
                summary["models"].setdefault(m, {})["holdout"] = {"fold_accuracy": accs, "ensemble_accuracy": em["accuracy"], "ci95": [lo, hi],
                                                                   "adult": adult, "child": child}
                hrows.append([m, len(accs), _ms(accs), f"{_pct(em['accuracy'])} [{_pct(lo)}, {_pct(hi)}]", _pct(adult), _pct(child), _f(em["macro_auroc"])])
                hold[m] = {"y": y, "prob": ens, "metrics": em}
            L.append(_table(["model", "fold models", "accuracy % (mean ± sd)", "fold-ensemble accuracy % [95 % CI]", "ensemble adults %", "ensemble children %", "ensemble macro AUROC"], hrows))
            L.append("")
            for m in models:
                if m in hold:
                    L.append(f"**{m}, fold ensemble on the test split, by age group**")
                    L.append("")
                    gl, gr = _group_section(f"{m} holdout ensemble", hold[m]["metrics"], classes)
                    L += gl
                    grows += gr
                    L.append("")
        _write_csv(out / f"{prefix}groups.csv", ["set", "group", "n", "accuracy %", *[f"{c} recall" for c in classes], *[f"{c} AUROC" for c in classes]], grows)
        # plots
        from . import plots as P

        for ci, c in enumerate(classes):
            P.plot_roc_models({m: (oof[m]["y"], oof[m]["prob"]) for m in models}, ci, c, out / f"{prefix}roc_{c}.png",
                              f"ROC {c} vs rest, out-of-fold ({label})")
        for m in models:
            P.plot_confusion(oof[m]["metrics"]["confusion"], classes, out / f"{prefix}confusion_{m}.png",
                             f"{m}, out-of-fold: accuracy {oof[m]['metrics']['accuracy']:.1%}")
            P.plot_curves({f"fold {k + 1}": read_history(runs[m][k]) for k in sorted(runs[m])}, out / f"{prefix}curves_{m}.png", f"{m}: training curves per fold")
        L.append("### Plots")
        L.append("")
        L += [f"![ROC {c}]({prefix}roc_{c}.png)" for c in classes]
        L.append("")
        L += [f"![confusion {m}]({prefix}confusion_{m}.png) ![curves {m}]({prefix}curves_{m}.png)" for m in models]
        L.append("")
    else:
        L.append("### Test split")
        L.append("")
        rows = []
        grows = []
        from . import plots as P

        for m in models:
            r = runs[m]["single"]
            p = read_predictions(r / "predictions_test.csv")
            mm = classification_metrics(p["y"], p["prob"], classes, groups=p["groups"])
            lo, hi = bootstrap_ci(p["y"], p["prob"].argmax(1))
            best = json.loads((r / "done.json").read_text()).get("best_epoch")
            summary["models"][m] = {"test": {"accuracy": mm["accuracy"], "ci95": [lo, hi], "per_class": mm["per_class"],
                                             "by_group": {g: v["accuracy"] for g, v in mm["by_group"].items()}, "shortcut": mm["shortcut"]},
                                    "best_epoch": best}
            rows.append([m, mm["n"], f"{_pct(mm['accuracy'])} [{_pct(lo)}, {_pct(hi)}]", _f(mm["macro_auroc"]), best,
                         *[f"{_f(mm['per_class'][c]['precision'], 2)} / {_f(mm['per_class'][c]['recall'], 2)} / {_f(mm['per_class'][c]['f1'], 2)} / {_f(mm['per_class'][c]['auroc'])}" for c in classes]])
            P.plot_confusion(mm["confusion"], classes, out / f"{prefix}confusion_{m}.png", f"{m}, test: accuracy {mm['accuracy']:.1%}")
            P.plot_roc(p["y"], p["prob"], classes, out / f"{prefix}roc_{m}.png", f"{m}, test")
            P.plot_curves({m: read_history(r)}, out / f"{prefix}curves_{m}.png", f"{m}: training curves")
        paper_acc = PAPER.get(label, {}).get("hybrid_accuracy")
        L.append(_table(["model", "n", "accuracy % [95 % bootstrap CI]", "macro AUROC", "best epoch", *[f"{c}: P / R / F1 / AUROC" for c in classes]], rows))
        L.append("")
        L.append(f"Paper (hybrid, its own data and protocol, 224 px): {paper_acc:.2f} %; its baselines: n/a here." if paper_acc else "Paper: n/a.")
        L.append("")
        for m in models:
            L.append(f"**{m}, test split by age group**")
            L.append("")
            r = runs[m]["single"]
            p = read_predictions(r / "predictions_test.csv")
            mm = classification_metrics(p["y"], p["prob"], classes, groups=p["groups"])
            gl, gr = _group_section(f"{m} test", mm, classes)
            L += gl
            grows += gr
            L.append("")
            L.append(f"![confusion]({prefix}confusion_{m}.png) ![roc]({prefix}roc_{m}.png) ![curves]({prefix}curves_{m}.png)")
            L.append("")
        _write_csv(out / f"{prefix}groups.csv", ["set", "group", "n", "accuracy %", *[f"{c} recall" for c in classes], *[f"{c} AUROC" for c in classes]], grows)
    shutil.copyfile(path / "config.toml", out / f"{prefix}config.toml")
    (out / f"{prefix}command.txt").write_text(exp["command"] + "\n")
    return L, summary


def _table2() -> list[str]:
    """The paper's Table 2 configuration rebuilt and counted."""
    from .models import KERAS_RESNET50_CONV_BIASES, count_parameters, create_model

    n = count_parameters(create_model("hybrid", 4, mobilenet="v1", head_hidden=100))
    return [
        "## Parameters against the paper's Table 2",
        "",
        _table(["configuration", "ours", "paper"], [
            ["hybrid: ResNet50 + MobileNet v1 (3072 features) -> Dense(100) -> Dense(4), Keras-style count", f"{n:,}", f"{PAPER['table2_total_parameters']:,}"],
            ["+ the conv biases Keras' ResNet50 has and torchvision's has not", f"{n + KERAS_RESNET50_CONV_BIASES:,}", f"{PAPER['table2_total_parameters']:,}"],
        ]),
        "",
        f"The difference, {PAPER['table2_total_parameters'] - n:,}, is exactly the biases of ResNet50's 53 convolutions in Keras "
        "(`keras.applications.ResNet50` uses `use_bias=True` before each batch norm; torchvision has no conv biases). "
        "MobileNet v1 (timm `mobilenetv1_100`, 3,228,864) and the head (307,300 + 404) match Keras exactly.",
        "",
    ]


def write_report(paths: Sequence[str | Path], out: str | Path, *, title: str = "", label: str = "", command: str = "") -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    L = [f"# {title or 'Training report'}", ""]
    if label:
        L += [f"> **{label}**", ""]
    L += ["Generated by `cxr-triage report` from the run folders; numbers beside the paper's "
          "(Nandi & Mulimani 2021: hybrid 94.43 % 3-class, 84.35 % 4-class; \"n/a\" where the paper's number is not recorded here).", ""]
    summaries = {}
    multi = len(paths) > 1
    for p in paths:
        p = Path(p)
        prefix = f"{p.name}_" if multi else ""
        lines, s = _experiment(p, out, prefix)
        L += lines + [""]
        summaries[p.name] = s
    L += _table2()
    if command:
        L += ["Report command: `" + command + "`", ""]
    (out / "report.md").write_text("\n".join(L))
    (out / "summary.json").write_text(json.dumps(summaries, indent=2, default=str) + "\n")
    return out / "report.md"
