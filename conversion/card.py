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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from worker.modelcard import DEFAULT_TRIAGE_RULE, write_card

__all__ = ["INTENDED_USE", "architecture_text", "build_card", "write_card"]

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
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


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
