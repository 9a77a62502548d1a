"""The model card as a person reads it: what ``cxr-triage model`` prints.

Everything printed comes from the card (``model.json``) of the model folder the node would
screen with, and, for the training data and its licences, from the ``README.md`` the conversion
stage writes beside it (the card itself does not carry the licence text). Numbers are the card's
test-split metrics of the deployed precision, overall and per age group, as recorded; nothing is
computed here beyond rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from worker.modelcard import ModelCard

__all__ = ["summary_lines"]


def _pct(v: Any) -> str:
    return f"{float(v) * 100:.1f}" if isinstance(v, (int, float)) else "-"


def _metrics_table(card: ModelCard) -> list[str]:
    m = card.raw.get("metrics")
    if not isinstance(m, Mapping):
        return ["metrics: not recorded in the card"]
    deployed = m.get("deployed")
    block = m.get(deployed) if isinstance(deployed, str) else None
    if not isinstance(block, Mapping) or not isinstance(block.get("overall"), Mapping):
        return ["metrics: not recorded in the card"]
    groups: list[tuple[str, Mapping[str, Any]]] = [("all", block["overall"])]
    by_group = block.get("by_age_group")
    if isinstance(by_group, Mapping):
        groups += [(str(k), v) for k, v in by_group.items() if isinstance(v, Mapping)]
    head = ["group", "n", "accuracy", "balanced"] + [f"{c} sens/spec" for c in card.classes]
    rows = []
    for name, g in groups:
        per = g.get("per_class") if isinstance(g.get("per_class"), Mapping) else {}
        cells = [name, str(g.get("n", "-")), _pct(g.get("accuracy")), _pct(g.get("balanced_accuracy"))]
        for c in card.classes:
            pc = per.get(c) if isinstance(per, Mapping) else None
            if not isinstance(pc, Mapping) or not pc.get("n"):
                cells.append("no cases")
            else:
                cells.append(f"{_pct(pc.get('sensitivity'))} / {_pct(pc.get('specificity'))}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    split = m.get("split", "test")
    out = [
        f"metrics on the {split} split (n = {m.get('n', '-')}, {deployed}; accuracy, sensitivity, specificity in %):"
    ]
    for r in [head, ["-" * w for w in widths], *rows]:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return out


def _licences(card: ModelCard) -> list[str]:
    """The ``## Data and licences`` section of the README beside the card, if there is one."""
    readme = card.card_path.parent / "README.md" if card.card_path is not None else None
    if readme is None or not readme.is_file():
        return ["training data and licences: not recorded (no README.md beside model.json)"]
    lines = readme.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip().lower().startswith("## data and licen"))
    except StopIteration:
        return [f"training data and licences: not recorded in {readme}"]
    body = []
    for ln in lines[start + 1:]:
        if ln.startswith("## "):
            break
        if ln.strip():
            body.append(ln.strip())
    return ["training data and licences:", *(f"  {ln}" for ln in body)]


def summary_lines(card: ModelCard) -> list[str]:
    """The card for a person: identity, precision, classes, thresholds, metrics, training data and licences."""
    raw = card.raw
    folder = card.card_path.parent if card.card_path is not None else card.xml_path.parent
    out = [f"{card.name} {card.version}  ({folder})"]
    out.append(f"intended use: {card.intended_use or 'not stated'}")
    if raw.get("architecture"):
        out.append(f"architecture: {raw['architecture']}")
    out.append(f"precision: {card.precision}")
    out.append(f"classes: {', '.join(card.classes)}")
    out.append(f"input: {card.input_size[0]} x {card.input_size[1]}, {card.channels} channel(s)")
    thresholds = ", ".join(f"{c} P >= {t:.4f}" for c, t in card.thresholds.items()) or "none"
    out.append(f"triage: {card.triage_rule}; thresholds {thresholds}")
    if card.bin_sha256:
        out.append(f"weights sha256: {card.bin_sha256}")
    if raw.get("created"):
        out.append(f"created: {raw['created']}")
    out += _metrics_table(card)
    training = _mapping(raw.get("training"))
    config = _mapping(training.get("config"))
    experiment = _mapping(config.get("experiment"))
    if experiment.get("note") or training.get("best_epoch") is not None:
        parts = [str(experiment["note"])] if experiment.get("note") else []
        if training.get("best_epoch") is not None:
            parts.append(f"best epoch {training['best_epoch']}")
        out.append("training: " + "; ".join(parts))
    out += _licences(card)
    return out


def _mapping(v: Any) -> Mapping[str, Any]:
    """``v`` when it is a mapping (a card section), else an empty one."""
    return v if isinstance(v, Mapping) else {}
