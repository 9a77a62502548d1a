"""Checkpoint format ``cxr-triage-checkpoint/1``: what the conversion stage reads.

A checkpoint is ``torch.save`` of a plain dict (tensors, strings, numbers, lists, dicts only, so
``torch.load(..., weights_only=True)`` reads it)::

    {"format": "cxr-triage-checkpoint/1",
     "model": {"name": "hybrid", "num_classes": 3, "kwargs": {"mobilenet": "v2", "head_hidden": 100, "dropout": 0.5}},
     "state_dict": {...},
     "classes": ["normal", "pneumonia", "covid19"],
     "input": {"size": [h, w], "channels": 3, "mean": [...], "std": [...], "layout": "NCHW"},
     "preprocessing": {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"},
     "training": {"config": {...}, "manifest_sha256": ..., "commit": ..., "best_epoch": ..., "versions": {...}},
     "metrics": {"val": {...}, "test": {...}}}

The model is rebuilt with ``create_model(name, num_classes, weights="none", **kwargs)``; its output
is logits (apply softmax for probabilities).  ``input`` + ``preprocessing`` are exactly what
``worker.imaging.PreprocessSpec.from_card`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .models import create_model

FORMAT = "cxr-triage-checkpoint/1"
MODEL_KWARGS = ("mobilenet", "head_hidden", "dropout")

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "model_spec"]


def model_spec(name: str, num_classes: int, **kwargs: Any) -> dict:
    """The ``model`` entry: name, num_classes and the architecture kwargs (never weights)."""
    return {"name": name, "num_classes": int(num_classes), "kwargs": {k: kwargs[k] for k in MODEL_KWARGS if k in kwargs}}


def _plain(obj: Any) -> Any:
    """Make JSON-like (numpy scalars and tuples to Python) so weights_only loading works."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, str):
        return str(obj)  # e.g. torch.__version__ is a str subclass that weights_only refuses
    if isinstance(obj, (bool, int, float)) or obj is None:
        return obj
    if hasattr(obj, "item") and not isinstance(obj, torch.Tensor):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj
    return str(obj)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    *,
    model_spec: dict,
    classes: list[str],
    input: dict,
    preprocessing: dict,
    training: dict,
    metrics: dict,
) -> None:
    """Write atomically (temp file + rename)."""
    if int(model_spec["num_classes"]) != len(classes):
        raise ValueError("model_spec num_classes does not match classes")
    obj = {
        "format": FORMAT,
        "model": _plain(model_spec),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "classes": list(classes),
        "input": _plain(input),
        "preprocessing": _plain(preprocessing),
        "training": _plain(training),
        "metrics": _plain(metrics),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode with the checkpoint's weights, the checkpoint dict without state_dict)."""
    ck = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} checkpoint")
    spec = ck["model"]
    model = create_model(spec["name"], int(spec["num_classes"]), weights="none", **spec.get("kwargs", {}))
    model.load_state_dict(ck["state_dict"], strict=True)
    model.eval()
    meta = {k: v for k, v in ck.items() if k != "state_dict"}
    return model, meta
