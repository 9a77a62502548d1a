"""The model card the conversion stage writes (``model.json``, schema in ``worker.modelcard``).

:func:`build_card` assembles the dict, :func:`worker.modelcard.write_card` validates it exactly
as the worker will and writes it atomically with the ``.bin`` sha256.  Besides the fields the
worker reads, the card records where the model came from and what it was measured to do:

* ``training``: the checkpoint (path, sha256, format), its model spec, training config,
  manifest hash, commit, best epoch, library versions and the metrics training reported;
* ``metrics``: on the TEST split of the conversion manifest, for torch, each IR precision
  measured (``ir_f32``, ``ir_bf16``, ``ir_int8``) and which one is ``deployed``; each overall and
  per ``age_group`` (classification metrics plus the triage rule at the card's thresholds);
* ``threshold_calibration``: split (validation), targets, thresholds and what they achieved there;
* ``gates``: every gate, its value, limit and result;
* ``conversion``: IR weight format, INT8 method, calibration images, library versions.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.modelcard import DEFAULT_TRIAGE_RULE, write_card

__all__ = ["INTENDED_USE", "architecture_text", "build_card", "card_markdown", "write_card"]

INTENDED_USE = "research screening aid; not for diagnosis"

_ARCH = {
    "hybrid": "resnet50+mobilenet_{mobilenet} hybrid",
    "resnet50": "resnet50",
    "mobilenet": "mobilenet_{mobilenet}",
}


def architecture_text(model_spec: Mapping[str, Any]) -> str:
    """e.g. ``"resnet50+mobilenet_v2 hybrid"`` from the checkpoint's ``model`` block."""
    name = str(model_spec.get("name", "unknown"))
    kwargs = dict(model_spec.get("kwargs") or {})
    tmpl = _ARCH.get(name, name)
    try:
        return tmpl.format(mobilenet=kwargs.get("mobilenet", "v2"))
    except (KeyError, IndexError):
        return name


def _utc_now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def build_card(
    ckpt: Mapping[str, Any],
    *,
    name: str,
    version: str,
    precision: str,
    thresholds: Mapping[str, float],
    calibration: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    gates: list[dict[str, Any]] | None = None,
    conversion: Mapping[str, Any] | None = None,
    checkpoint_info: Mapping[str, Any] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    """The card dict for one model directory (``precision`` is the worker's setting for it)."""
    training = dict(ckpt.get("training") or {})
    tr: dict[str, Any] = {
        "checkpoint": dict(checkpoint_info or {}),
        "format": ckpt.get("format"),
        "model": ckpt.get("model"),
        "config": training.get("config"),
        "manifest_sha256": training.get("manifest_sha256"),
        "commit": training.get("commit"),
        "best_epoch": training.get("best_epoch"),
        "versions": training.get("versions"),
        "reported_metrics": ckpt.get("metrics"),
    }
    return {
        "schema": 1,
        "name": name,
        "version": version,
        "created": created or _utc_now(),
        "architecture": architecture_text(ckpt.get("model") or {}),
        "precision": precision,
        "classes": list(ckpt["classes"]),
        "output": "probabilities",
        "input": dict(ckpt["input"]),
        "preprocessing": dict(ckpt.get("preprocessing") or {}),
        "thresholds": {k: float(v) for k, v in thresholds.items()},
        "triage_rule": DEFAULT_TRIAGE_RULE,
        "threshold_calibration": dict(calibration or {}),
        "training": tr,
        "metrics": dict(metrics or {}),
        "gates": list(gates or []),
        "conversion": {**dict(conversion or {}), "host": platform.node(), "python": platform.python_version()},
        "files": {"xml": "model.xml", "bin": "model.bin"},
        "intended_use": INTENDED_USE,
    }


def write(model_dir: str | Path, card: Mapping[str, Any]) -> Path:
    """``worker.modelcard.write_card`` (validates, adds ``files.bin_sha256``, atomic)."""
    return write_card(model_dir, card)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}"


def _num(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


_MEASURE_NAMES = {"accuracy": "accuracy %", "adult_accuracy": "accuracy, adults %", "macro_auroc": "macro AUROC",
                  "agreement": "top-1 agreement with float %", "max_prob_diff": "max softmax difference (reported, not gated)"}


def _measure_cell(key: str, v: Any) -> str:
    if v is None:
        return "-"
    return _num(v) if key in ("macro_auroc", "max_prob_diff") else _pct(v)


def _candidate_lines(card: Mapping[str, Any]) -> list[str]:
    """Float vs each lower-precision candidate, the numbers the candidate gates decide on."""
    cands = (card.get("conversion") or {}).get("candidates") or {}
    if not cands:
        return []
    keys = list(cands)
    lines = ["", "## Precision: float vs candidates (test split, each at its own validation-calibrated thresholds)", "",
             "| measure | float (torch) | " + " | ".join(
                 f"{cands[k]['precision'].upper()} `{k}`{' (deployed)' if cands[k].get('deployed') else ''}" for k in keys) + " |",
             "|" + " --- |" * (2 + len(keys))]
    measures = list(cands[keys[0]]["measures"])
    for m in measures:
        label = _MEASURE_NAMES.get(m) or (m.replace("_sensitivity", " sensitivity at threshold %")
                                          .replace("_specificity", " specificity at threshold %"))
        ref = cands[keys[0]]["measures"][m]["float"]
        lines.append(f"| {label} | {_measure_cell(m, ref)} | "
                     + " | ".join(_measure_cell(m, cands[k]["measures"].get(m, {}).get("candidate")) for k in keys) + " |")
    lines.append("| candidate gates | | " + " | ".join(
        "passed" if cands[k].get("passed") else "missed: " + ", ".join(
            g["name"] for g in cands[k].get("gates", []) if not g["passed"]) for k in keys) + " |")
    return lines


def _source_lines(dm: Mapping[str, Any], classes: list[str]) -> list[str]:
    by_source = dm.get("by_source") or {}
    if not by_source:
        return []
    lines = ["", "## Test split per source collection (deployed model)", "",
             "| source | n | accuracy | " + " | ".join(f"{c} sens." for c in classes) + " |",
             "|" + " --- |" * (3 + len(classes))]
    for src, r in sorted(by_source.items()):
        pc = r.get("per_class") or {}
        lines.append(f"| {src} | {r.get('n', '-')} | {_pct(r.get('accuracy'))} | " + " | ".join(
            _pct((pc.get(c) or {}).get("sensitivity")) if (pc.get(c) or {}).get("n") else "-" for c in classes) + " |")
    return lines


def card_markdown(card: Mapping[str, Any]) -> str:
    """The card as a page a person reads (``README.md`` beside ``model.json``); every number is
    taken from the card, so the two cannot disagree."""
    classes = list(card["classes"])
    m = card.get("metrics") or {}
    deployed = m.get("deployed")
    dm = m.get(deployed) or {} if deployed else {}
    tr = card.get("training") or {}
    cfg = tr.get("config") or {}
    t, d, mc = cfg.get("train") or {}, cfg.get("data") or {}, cfg.get("model") or {}
    note = (cfg.get("experiment") or {}).get("note", "")
    lines = [
        f"# {card['name']} {card['version']}",
        "",
        f"**Intended use: {card.get('intended_use', INTENDED_USE)}.** Trained on small public "
        "data sets whose classes come from different hospitals, countries, ages and publications; it can recognise the "
        "source of an image rather than the disease. Not a medical device, not validated on any hospital's images.",
        "",
        f"* architecture: {card.get('architecture')}, {len(classes)} classes ({', '.join(classes)}), "
        f"input {card['input']['size'][0]} x {card['input']['size'][1]} grey replicated to {card['input']['channels']} "
        "channels, ImageNet normalisation",
        f"* deployed precision: {card['precision']} (measured as `{deployed}` below)",
        f"* training: {note or 'see model.json training.config'}",
        f"  (data.size {d.get('size')}, epochs {t.get('epochs')}, optimizer {t.get('optimizer')} lr {t.get('lr')}, "
        f"schedule {t.get('schedule')}, label smoothing {t.get('label_smoothing')}, selection {t.get('select')}, "
        f"best epoch {tr.get('best_epoch')}; MobileNet init {mc.get('mobilenet_weights') or mc.get('weights')}, "
        f"ResNet50 init {mc.get('resnet_weights') or mc.get('weights')})",
        f"* checkpoint sha256 {((tr.get('checkpoint') or {}).get('sha256') or '-')[:16]}..., commit {tr.get('commit')}, "
        f"manifest sha256 {(tr.get('manifest_sha256') or '-')[:16]}...",
        "",
        f"## Test split ({m.get('split', '?')}, n = {m.get('n', '?')}; `{m.get('label_column', '')}`)",
        "",
    ]
    groups = [("all", dm.get("overall") or {})] + sorted((dm.get("by_age_group") or {}).items())
    head = "| group | n | accuracy | balanced acc. | " + " | ".join(
        f"{c} sens. / spec. / AUROC" for c in classes) + " |"
    lines += [head, "|" + " --- |" * (4 + len(classes))]
    for g, r in groups:
        pc = r.get("per_class") or {}
        cells = [f"{_pct((pc.get(c) or {}).get('sensitivity'))} / {_pct((pc.get(c) or {}).get('specificity'))} / "
                 f"{_num((pc.get(c) or {}).get('auc'))}" if (pc.get(c) or {}).get("n") else "no cases" for c in classes]
        lines.append(f"| {g} | {r.get('n', '-')} | {_pct(r.get('accuracy'))} | {_pct(r.get('balanced_accuracy'))} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Sensitivity, specificity and accuracy in %. Confusion matrices (rows true, columns predicted, "
              f"order {', '.join(classes)}):", ""]
    for g, r in groups:
        if r.get("confusion") is not None:
            lines.append(f"* {g}: `{r['confusion']}`")
    thr = card.get("thresholds") or {}
    cal = card.get("threshold_calibration") or {}
    lines += ["", "## Operating thresholds (triage)", "",
              f"Rule: {card.get('triage_rule')}. Thresholds chosen on the {cal.get('split', 'validation')} split for "
              f"target sensitivities {cal.get('targets')}:", ""]
    tri = (dm.get("overall") or {}).get("triage") or {}
    for c, v in thr.items():
        got = (tri.get("per_class") or {}).get(c) or {}
        lines.append(f"* {c}: P >= {v:.4f}; on the test split sensitivity {_pct(got.get('sensitivity'))} %, "
                     f"specificity {_pct(got.get('specificity'))} %")
    urgent = tri.get("urgent") or {}
    if urgent:
        lines.append(f"* any abnormal class urgent: sensitivity {_pct(urgent.get('sensitivity'))} %, specificity "
                     f"{_pct(urgent.get('specificity'))} %, share of images marked urgent {_pct(urgent.get('urgent_share'))} %")
    lines += _candidate_lines(card)
    lines += _source_lines(dm, classes)
    lines += ["", "## Conversion gates", ""]
    for g in card.get("gates") or []:
        lines.append(f"* {g['name']}: {g['value']:.6g} (limit {g['op']} {g['limit']:g}) "
                     f"{'passed' if g['passed'] else 'FAILED'}{' - ' + g['detail'] if g.get('detail') else ''}")
    lines += ["", "## Data and licences", "",
              "Trained on the manifest's train split (validation for selection and thresholds) of public chest X-ray "
              "collections: Kermany et al. 2018 (children, CC BY 4.0), NIH ChestX-ray14 (adults, no restriction), "
              "the COVID-19 image data collection of Cohen et al. (per-image licences, many CC BY-NC-SA / CC BY-NC-ND "
              "or unstated), Actualmed and Figure1 (no licence stated). Several training images are non-commercial: "
              "check the licences before any commercial use of this model.", ""]
    return "\n".join(lines)
