"""Experiment configuration: defaults (the paper's recipe), one TOML file per experiment, overrides.

Resolution order: :data:`DEFAULTS` <- the TOML file (``--config``) <- ``--set section.key=value``
overrides (the value is parsed as a TOML value when it is one, e.g. ``train.lr=3e-4``,
``experiment.models=["hybrid"]``, else taken as a string).  Unknown keys are an error, so a typo
never silently trains the default.  An empty string means "not set" where a key is optional
(TOML has no null).
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "CLASSES", "load_config", "apply_override", "to_toml", "ConfigError"]

#: Class order per label column (index = model output).
CLASSES = {
    "label3": ["normal", "pneumonia", "covid19"],
    "label4": ["normal", "bacterial", "viral", "covid19"],
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "experiment": {
        "name": "default",
        "mode": "single",  # single (the manifest's train/val/test split) | cv (the paper's 5-fold protocol)
        "models": ["hybrid"],  # any of hybrid, resnet50, mobilenet
        "note": "",
    },
    "data": {
        "manifest": "../shared/data/cxr/manifest.csv",  # relative paths: to the current directory
        "label": "label3",  # label3 | label4
        "classes": [],  # empty: CLASSES[label]
        "size": 224,  # input height = width (px)
        "group_column": "age_group",  # stratified metrics; "" for none
        "split_column": "split",
        "cache": True,  # decode each image once into the on-disk grey cache (training.cache), memory-mapped
        "cache_dir": "",  # "" = $XDG_CACHE_HOME/cxr-triage/training (~/.cache/...)
        "max_per_split": 0,  # tests/smoke runs: keep at most this many rows per split (0 = all)
    },
    "model": {
        "mobilenet": "v2",  # v1 (the paper's, timm mobilenetv1_100) | v2 (torchvision)
        "weights": "none",  # none | imagenet | path, for every backbone
        "resnet_weights": "",  # per-backbone override ("" = use weights)
        "mobilenet_weights": "",
        "head_hidden": 100,
        "dropout": 0.5,
    },
    "train": {
        "epochs": 100,
        "batch_size": 32,
        "optimizer": "adam",  # adam | adamw | sgd
        "lr": 1e-3,
        "weight_decay": 0.0,
        "momentum": 0.9,  # sgd only
        "schedule": "constant",  # constant | cosine (per epoch, after warm-up) | linear | onecycle (per step, for a fixed budget)
        "warmup_epochs": 0,  # constant/cosine/linear: linear warm-up epochs; onecycle: the rising part (0 = 30 % of the run)
        "min_lr": 0.0,
        "progressive_sizes": [],  # progressive resizing: input sizes of the early epochs, in order (empty = data.size throughout)
        "final_epochs": 2,  # with progressive_sizes: the last epochs at data.size (the served resolution)
        "label_smoothing": 0.0,
        "class_weights": "balanced",  # balanced (n / (k * n_c), in the loss) | none
        "patience": 15,  # early stopping on the selection metric; 0 = never stop early
        "select": "val_loss",  # val_loss | val_auroc (macro) | val_accuracy | last
        "seed": 0,
        "threads": 0,  # torch CPU threads; 0 = torch default
        "augment": True,
        "augment_strength": 1.0,
        "eval_batch_size": 64,
        "max_train_batches": 0,  # 0 = all (smoke tests use a few)
        "device": "auto",  # auto | cpu | cuda
        "amp": True,  # bf16 autocast on CUDA
        # bf16 autocast on CPU: ~2x on CPUs with native bf16 (AVX512_BF16 / AMX), ~3x SLOWER without
        # (emulated); "auto" = bf16 where the CPU has it, else float32.  true or "auto" also puts
        # the model in channels-last on CPU (1.25x in float32 too).
        "cpu_amp": False,
        "channels_last": True,  # on CUDA
        "num_workers": 0,
        "progress": "auto",  # auto (tqdm if installed) | none
        "keep_last": False,  # keep last.pt (resume state) after a run completes
    },
    "augment": {
        "rotate_deg": 7.0,
        "scale": 0.08,
        "shift": 0.06,
        "brightness": 0.10,
        "contrast": 0.15,
        "hflip": 0.0,
    },
    "cv": {
        "folds": 5,
        "val_fraction": 0.1,
        "pool": ["train", "val"],  # the "training patients" the folds are made from
        "holdout": "test",  # also evaluate every fold model on this split ("" = no)
        "seed": 0,
        "only_folds": [],  # run a subset of folds (still numbered as in the full split)
    },
}


#: Learning-rate schedules (``train.schedule``).
SCHEDULES = ("constant", "cosine", "linear", "onecycle")


class ConfigError(ValueError):
    pass


def _merge(base: dict, new: Mapping, where: str) -> None:
    for k, v in new.items():
        if k not in base:
            raise ConfigError(f"unknown config key {where}{k}")
        if isinstance(base[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}{k} must be a table")
            _merge(base[k], v, f"{where}{k}.")
        else:
            base[k] = _coerce(base[k], v, f"{where}{k}")


#: Keys that take true, false or "auto" (decided per machine at run time).
TRI_STATE = {"train.cpu_amp"}


def _coerce(default: Any, v: Any, key: str) -> Any:
    if key in TRI_STATE:
        if not (isinstance(v, bool) or v == "auto"):
            raise ConfigError(f'{key} must be true, false or "auto", got {v!r}')
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false")
        return v
    if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if isinstance(default, int) and isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(default, list) and not isinstance(v, list):
        raise ConfigError(f"{key} must be a list")
    if default is not None and type(default) is not type(v) and not (isinstance(default, float) and isinstance(v, (int, float))):
        raise ConfigError(f"{key} must be {type(default).__name__}, got {v!r}")
    return v


def apply_override(cfg: dict, item: str) -> None:
    """``section.key=value``; value parsed as TOML when possible, else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must be section.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    node: Any = {}
    root = node
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    _merge(cfg, root, "")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        with open(path, "rb") as f:
            _merge(cfg, tomllib.load(f), "")
    for o in overrides:
        apply_override(cfg, o)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    from .models import MODEL_NAMES

    e, d, t = cfg["experiment"], cfg["data"], cfg["train"]
    if e["mode"] not in ("single", "cv"):
        raise ConfigError("experiment.mode must be single or cv")
    bad = [m for m in e["models"] if m not in MODEL_NAMES]
    if bad or not e["models"]:
        raise ConfigError(f"experiment.models must be a non-empty list of {', '.join(MODEL_NAMES)}")
    if d["label"] not in CLASSES and not d["classes"]:
        raise ConfigError("data.classes is needed for a label column other than label3/label4")
    if t["select"] not in ("val_loss", "val_auroc", "val_accuracy", "last"):
        raise ConfigError("train.select must be val_loss, val_auroc, val_accuracy or last")
    if t["schedule"] not in SCHEDULES:
        raise ConfigError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t['schedule']!r}")
    sizes = t["progressive_sizes"]
    if any(not isinstance(v, int) or isinstance(v, bool) or not 16 <= v <= int(d["size"]) for v in sizes):
        raise ConfigError(f"train.progressive_sizes must be integers from 16 to data.size ({d['size']}), got {sizes!r}")
    if sizes and not 1 <= int(t["final_epochs"]) <= int(t["epochs"]):
        raise ConfigError(f"train.final_epochs must be from 1 to train.epochs ({t['epochs']}), got {t['final_epochs']!r}")
    if sizes and int(t["epochs"]) - int(t["final_epochs"]) < len(sizes):
        raise ConfigError(f"train.epochs - train.final_epochs must leave at least one epoch per entry of train.progressive_sizes ({len(sizes)})")
    if t["optimizer"] not in ("adam", "adamw", "sgd"):
        raise ConfigError("train.optimizer must be adam, adamw or sgd")
    if t["class_weights"] not in ("balanced", "none"):
        raise ConfigError("train.class_weights must be balanced or none")
    if cfg["model"]["mobilenet"] not in ("v1", "v2"):
        raise ConfigError("model.mobilenet must be v1 or v2")


def classes_of(cfg: dict) -> list[str]:
    return list(cfg["data"]["classes"] or CLASSES[cfg["data"]["label"]])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(cfg: Mapping[str, Mapping[str, Any]]) -> str:
    """Two-level config to TOML text (enough for this config's shape)."""
    out = []
    for section, table in cfg.items():
        out.append(f"[{section}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)
