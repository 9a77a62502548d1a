"""The model card (``model.json``): the contract between the conversion stage and the worker.

A model directory (``--model DIR``) holds three files: ``model.json`` (this card),
``model.xml`` and ``model.bin`` (the OpenVINO IR).  The card says what the network expects
(input size, channels, normalisation, layout), what it returns (class order; probabilities or
logits), which precision the worker runs it at, and the triage thresholds.  Everything the
worker does with a model is driven by the card, so it is validated strictly at load time:
a wrong card must stop the node at start-up with a message that names the field and the file,
not produce quietly wrong screening results later.

Schema version 1::

    {
      "schema": 1,
      "name": "cxr-hybrid", "version": "0.1.0", "created": "2026-11-26T12:00:00Z",
      "architecture": "resnet50+mobilenet_v2 hybrid",
      "precision": "f32",                      # "f32" | "bf16" | "f16" | "int8"
      "classes": ["normal", "pneumonia", "covid19"],   # output order
      "output": "probabilities",               # or "logits" (the engine applies softmax)
      "input": {"size": [224, 224], "channels": 3, "mean": [...], "std": [...], "layout": "NCHW"},
      "preprocessing": {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"},
      "thresholds": {"covid19": 0.5, "pneumonia": 0.5},
      "triage_rule": "urgent if P(class) >= threshold for any thresholded class, else routine",
      "metrics": {}, "training": {},
      "files": {"xml": "model.xml", "bin": "model.bin", "bin_sha256": "<hex>"},
      "intended_use": "research screening aid; not for diagnosis"
    }

``preprocessing`` is only checked to be an object here; its values are validated by
:meth:`worker.imaging.PreprocessSpec.from_card`, which owns them.

This module imports neither OpenVINO nor torch, so the card can be read and written by the
conversion stage, the CLI and tests without loading a runtime.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

log = logging.getLogger(__name__)

__all__ = [
    "CARD_FILE",
    "DEFAULT_TRIAGE_RULE",
    "PRECISIONS",
    "OUTPUTS",
    "SCHEMA_VERSION",
    "ModelCard",
    "ModelCardError",
    "Triage",
    "file_sha256",
    "triage",
    "write_card",
    "DEFAULT_MODEL_DIR",
    "default_model_dir",
]

SCHEMA_VERSION = 1
CARD_FILE = "model.json"
#: Inference precisions the worker knows how to request from OpenVINO (see worker.engine).
PRECISIONS: tuple[str, ...] = ("f32", "bf16", "f16", "int8")
#: What the network's single output holds.
OUTPUTS: tuple[str, ...] = ("probabilities", "logits")
LAYOUTS: tuple[str, ...] = ("NCHW",)
DEFAULT_TRIAGE_RULE = "urgent if P(class) >= threshold for any thresholded class, else routine"

#: The model shipped inside the package (issue 6): used when no ``model.path`` is configured.
#: A folder like any other model folder; absent in a checkout where it was never added.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_dir() -> Path | None:
    """The packaged default model's folder, or None when this install carries none."""
    return DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / CARD_FILE).is_file() else None


_MISSING_FILES = "--model DIR must hold model.json, model.xml and model.bin"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ModelCardError(ValueError):
    """A model directory or its ``model.json`` is unusable.

    The message names the file and the offending field, e.g.
    ``/models/cxr/model.json: thresholds.covid19 must be a number in [0, 1] (got 1.5)``.
    """


# --------------------------------------------------------------------------- helpers


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (IR weights can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_int(v: Any) -> TypeGuard[int]:
    # bool is an int subclass; a JSON true where a count belongs is a mistake, not a 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    """Field validation with messages of the form ``<file>: <field> <problem>``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, fld: str, problem: str) -> ModelCardError:
        return ModelCardError(f"{self.source}: {fld} {problem}")

    def obj(self, parent: Mapping[str, Any], key: str, fld: str, *, required: bool = True) -> Mapping[str, Any]:
        if key not in parent:
            if required:
                raise self.fail(fld, "is missing (must be an object)")
            return {}
        v = parent[key]
        if not isinstance(v, Mapping):
            raise self.fail(fld, f"must be an object (got {type(v).__name__})")
        return v

    def string(self, parent: Mapping[str, Any], key: str, fld: str, *, required: bool = True, default: str = "") -> str:
        if key not in parent:
            if required:
                raise self.fail(fld, "is missing (must be a non-empty string)")
            return default
        v = parent[key]
        if not isinstance(v, str) or not v.strip():
            raise self.fail(fld, f"must be a non-empty string (got {v!r})")
        return v

    def choice(
        self, parent: Mapping[str, Any], key: str, fld: str, choices: tuple[str, ...], *, default: str | None = None
    ) -> str:
        if key not in parent and default is not None:
            return default
        v = parent.get(key)
        if v not in choices:
            got = "missing" if key not in parent else repr(v)
            raise self.fail(fld, f"must be one of {', '.join(repr(c) for c in choices)} (got {got})")
        return str(v)

    def pos_int(self, parent: Mapping[str, Any], key: str, fld: str) -> int:
        v = parent.get(key)
        if not _is_int(v) or v <= 0:
            got = "missing" if key not in parent else repr(v)
            raise self.fail(fld, f"must be a positive integer (got {got})")
        return int(v)

    def numbers(
        self, parent: Mapping[str, Any], key: str, fld: str, channels: int, *, positive: bool
    ) -> tuple[float, ...]:
        v = parent.get(key)
        what = "positive" if positive else "finite"
        ok = (
            isinstance(v, (list, tuple))
            and len(v) in (1, channels)
            and all(_is_num(x) and (x > 0 or not positive) for x in v)
        )
        if not ok:
            got = "missing" if key not in parent else repr(v)
            raise self.fail(fld, f"must be a list of 1 or {channels} (input.channels) {what} numbers (got {got})")
        vals = tuple(float(x) for x in v)  # type: ignore[union-attr]  # a list or tuple: checked above
        return vals * channels if len(vals) == 1 else vals


def _file_name(chk: _Checker, files: Mapping[str, Any], key: str, default: str) -> str:
    """A file named in ``files``: a plain name inside the model directory, never a path out of it."""
    name = chk.string(files, key, f"files.{key}", required=False, default=default)
    if Path(name).name != name or name in (".", ".."):
        raise chk.fail(f"files.{key}", f"must be a file name inside the model directory (got {name!r})")
    return name


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class ModelCard:
    """A validated ``model.json`` plus the resolved paths of its IR files.

    Build it with :meth:`load`; the constructor does no validation.  ``raw`` is a private deep
    copy of the whole JSON (for :meth:`worker.imaging.PreprocessSpec.from_card` and for
    recording with results); treat it as read-only and use :meth:`to_dict` for a copy to modify.
    ``mean`` and ``std`` always have ``channels`` entries (a single value in the JSON is
    replicated).  ``thresholds`` is a read-only mapping, in the order of ``classes``.
    """

    name: str
    version: str
    classes: tuple[str, ...]
    precision: str
    output: str
    input_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    thresholds: Mapping[str, float]
    triage_rule: str
    intended_use: str
    xml_path: Path
    bin_path: Path
    bin_sha256: str | None
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    card_path: Path | None = field(default=None, compare=False)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The per-image input shape ``(C, H, W)`` (layout NCHW)."""
        return (self.channels, self.input_size[0], self.input_size[1])

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str], verify_hash: bool = True) -> ModelCard:
        """Read and validate ``model_dir/model.json`` and check that the IR files exist.

        With ``verify_hash`` (the default) the SHA-256 of the ``.bin`` is compared with
        ``files.bin_sha256``, so a truncated copy or a ``.bin`` from another export cannot be
        served under this card's name and thresholds.  A card without ``bin_sha256`` loads with
        a warning.  Every problem raises :class:`ModelCardError` naming the path and the field.
        """
        d = Path(model_dir)
        if not d.is_dir():
            raise ModelCardError(f"{_MISSING_FILES}: {d} is not a directory")
        card_path = d / CARD_FILE
        if not card_path.is_file():
            raise ModelCardError(f"{_MISSING_FILES}: {card_path} is missing")
        try:
            text = card_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelCardError(f"{card_path}: cannot read: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelCardError(f"{card_path}: not valid JSON: {exc}") from None
        card = cls._from_dict(data, d, str(card_path), card_path=card_path)
        missing = [p.name for p in (card.xml_path, card.bin_path) if not p.is_file()]
        if missing:
            raise ModelCardError(f"{_MISSING_FILES}: missing in {d}: {', '.join(missing)}")
        if verify_hash:
            if card.bin_sha256 is None:
                log.warning("%s: files.bin_sha256 is not set; %s is not verified", card_path, card.bin_path.name)
            else:
                actual = file_sha256(card.bin_path)
                if actual != card.bin_sha256:
                    raise ModelCardError(
                        f"{card_path}: files.bin_sha256 does not match {card.bin_path}: card says "
                        f"{card.bin_sha256}, file has {actual} (wrong or corrupted weights)"
                    )
        log.debug("loaded model card %s (%s %s)", card_path, card.name, card.version)
        return card

    @classmethod
    def _from_dict(cls, data: Any, model_dir: Path, source: str, card_path: Path | None = None) -> ModelCard:
        """Validate a parsed card; ``source`` prefixes error messages.  Does not touch the IR files."""
        chk = _Checker(source)
        if not isinstance(data, Mapping):
            raise ModelCardError(f"{source}: the card must be a JSON object (got {type(data).__name__})")

        schema = data.get("schema")
        if not _is_int(schema) or schema != SCHEMA_VERSION:
            got = "missing" if "schema" not in data else repr(schema)
            raise chk.fail(
                "schema", f"must be {SCHEMA_VERSION} (got {got}); this worker reads schema {SCHEMA_VERSION} only"
            )

        name = chk.string(data, "name", "name")
        version = chk.string(data, "version", "version")
        for key in ("created", "architecture"):
            if key in data:
                chk.string(data, key, key)
        precision = chk.choice(data, "precision", "precision", PRECISIONS)
        output = chk.choice(data, "output", "output", OUTPUTS)

        classes_v = data.get("classes")
        if (
            not isinstance(classes_v, list)
            or len(classes_v) < 2
            or not all(isinstance(c, str) and c.strip() for c in classes_v)
        ):
            got = "missing" if "classes" not in data else repr(classes_v)
            raise chk.fail("classes", f"must be a list of at least 2 non-empty strings, in output order (got {got})")
        dupes = sorted({c for c in classes_v if classes_v.count(c) > 1})
        if dupes:
            raise chk.fail("classes", f"must be unique (repeated: {', '.join(dupes)})")
        classes = tuple(classes_v)

        inp = chk.obj(data, "input", "input")
        size_v = inp.get("size")
        if not isinstance(size_v, list) or len(size_v) != 2 or not all(_is_int(x) and x > 0 for x in size_v):
            got = "missing" if "size" not in inp else repr(size_v)
            raise chk.fail("input.size", f"must be [height, width], two positive integers (got {got})")
        input_size = (int(size_v[0]), int(size_v[1]))
        channels = chk.pos_int(inp, "channels", "input.channels")
        mean = chk.numbers(inp, "mean", "input.mean", channels, positive=False)
        std = chk.numbers(inp, "std", "input.std", channels, positive=True)
        chk.choice(inp, "layout", "input.layout", LAYOUTS, default="NCHW")

        chk.obj(data, "preprocessing", "preprocessing", required=False)
        for key in ("metrics", "training"):
            chk.obj(data, key, key, required=False)

        thr_v = chk.obj(data, "thresholds", "thresholds", required=False)
        unknown = [k for k in thr_v if k not in classes]
        if unknown:
            raise chk.fail(
                "thresholds",
                f"names classes not in classes {list(classes)}: {', '.join(map(repr, unknown))}",
            )
        for k, v in thr_v.items():
            if not _is_num(v) or not 0.0 <= v <= 1.0:
                raise chk.fail(f"thresholds.{k}", f"must be a number in [0, 1] (got {v!r})")
        thresholds = MappingProxyType({c: float(thr_v[c]) for c in classes if c in thr_v})

        triage_rule = chk.string(data, "triage_rule", "triage_rule")
        intended_use = chk.string(data, "intended_use", "intended_use")

        files = chk.obj(data, "files", "files")
        xml_name = _file_name(chk, files, "xml", "model.xml")
        bin_name = _file_name(chk, files, "bin", "model.bin")
        sha = files.get("bin_sha256")
        if sha is not None:
            if not isinstance(sha, str) or not _SHA256_RE.match(sha.lower()):
                raise chk.fail("files.bin_sha256", f"must be 64 hex digits or null (got {sha!r})")
            sha = sha.lower()

        return cls(
            name=name,
            version=version,
            classes=classes,
            precision=precision,
            output=output,
            input_size=input_size,
            channels=channels,
            mean=mean,
            std=std,
            thresholds=thresholds,
            triage_rule=triage_rule,
            intended_use=intended_use,
            xml_path=model_dir / xml_name,
            bin_path=model_dir / bin_name,
            bin_sha256=sha,
            raw=copy.deepcopy(dict(data)),
            card_path=card_path,
        )

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the card's JSON as loaded (JSON-serialisable; safe to modify)."""
        return copy.deepcopy(dict(self.raw))


def _json_default(obj: Any) -> Any:
    """Let the conversion stage pass numpy scalars and arrays (e.g. in ``metrics``)."""
    for attr in ("tolist", "item"):  # numpy arrays / scalars, without importing numpy here
        fn = getattr(obj, attr, None)
        if callable(fn):
            return fn()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"model card value of type {type(obj).__name__} is not JSON serialisable")


def write_card(model_dir: str | os.PathLike[str], card_dict: Mapping[str, Any]) -> Path:
    """Validate ``card_dict`` and write it as ``model_dir/model.json`` (indent 2).

    ``files.bin_sha256`` is computed from the ``.bin`` already in ``model_dir`` (``files.xml`` and
    ``files.bin`` default to ``model.xml`` / ``model.bin``), so the IR must be saved first.  The
    card is validated exactly as :meth:`ModelCard.load` would (minus the hash, which we just
    computed); an invalid card raises :class:`ModelCardError` and nothing is written.  The write
    is atomic (temporary file + rename), so a worker never reads half a card.  ``card_dict`` is not
    modified.  Returns the path of ``model.json``.
    """
    d = Path(model_dir)
    card_path = d / CARD_FILE
    data: dict[str, Any] = copy.deepcopy(dict(card_dict))
    data.setdefault("schema", SCHEMA_VERSION)
    files = data.get("files")
    files = dict(files) if isinstance(files, Mapping) else {}
    files.setdefault("xml", "model.xml")
    files.setdefault("bin", "model.bin")
    data["files"] = files
    chk = _Checker(str(card_path))
    bin_name = _file_name(chk, files, "bin", "model.bin")
    xml_name = _file_name(chk, files, "xml", "model.xml")
    bin_path = d / bin_name
    for p in (d / xml_name, bin_path):
        if not p.is_file():
            raise ModelCardError(f"{_MISSING_FILES}: cannot write {card_path}: {p} is missing (save the IR first)")
    files["bin_sha256"] = file_sha256(bin_path)

    text = json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n"
    ModelCard._from_dict(json.loads(text), d, str(card_path))  # validate exactly what a worker will read

    tmp = card_path.with_name(f".{CARD_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, card_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    log.info(
        "wrote %s (%s %s, bin sha256 %s)", card_path, data.get("name"), data.get("version"), files["bin_sha256"][:12]
    )
    return card_path


# --------------------------------------------------------------------------- triage


@dataclass(frozen=True)
class Triage:
    """The triage decision for one image.

    Attributes:
        priority: ``"urgent"`` or ``"routine"``.
        reason: human-readable justification, e.g. ``"P(covid19)=0.91 >= 0.50"`` (several
            firing classes are joined with ``"; "``), ``"no class over its threshold"`` or
            ``"no thresholds in model card"``.
    """

    priority: str
    reason: str


def triage(probabilities: Mapping[str, float], card: ModelCard) -> Triage:
    """Apply the card's rule: urgent if ``P(class) >= threshold`` for any thresholded class.

    The comparison is inclusive (a probability exactly at the threshold is urgent), matching
    the ``triage_rule`` text written by the conversion stage.  Classes without a threshold
    never make an image urgent.  A thresholded class missing from ``probabilities``, or a
    non-finite probability, raises ``ValueError``: silently calling such an image routine
    would hide a wiring bug.
    """
    from worker.priority import PriorityMap  # the general mapping builds on this module's types

    return PriorityMap.build(card).decide(probabilities)  # no [triage] settings: exactly the card's rule
