"""model.json: loading, validation messages, hashing, writing, and the triage rule."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from worker.modelcard import DEFAULT_TRIAGE_RULE, ModelCard, ModelCardError, Triage, triage, write_card
from worker.testing.toymodel import build_toy_model

MISSING = "--model DIR must hold model.json, model.xml and model.bin"


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    return build_toy_model(tmp_path / "toy", thresholds={"covid19": 0.5, "pneumonia": 0.3})


def _edit_card(model_dir: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite model.json by hand (bypassing write_card's validation) after ``edit``."""
    path = model_dir / "model.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set(dotted: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


def _delete(dotted: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node[p]
        del node[last]

    return edit


# --------------------------------------------------------------------------- load


def test_load_valid_card(model_dir: Path) -> None:
    card = ModelCard.load(model_dir)
    assert card.name == "toy" and card.version == "0.0.1"
    assert card.classes == ("normal", "pneumonia", "covid19")
    assert card.precision == "f32" and card.output == "logits"
    assert card.input_size == (224, 224) and card.channels == 3 and card.input_shape == (3, 224, 224)
    assert card.mean == pytest.approx((0.485, 0.456, 0.406)) and card.std == pytest.approx((0.229, 0.224, 0.225))
    # thresholds are returned in class order, read-only
    assert list(card.thresholds.items()) == [("pneumonia", 0.3), ("covid19", 0.5)]
    with pytest.raises(TypeError):
        card.thresholds["covid19"] = 0.1  # type: ignore[index]
    assert card.triage_rule == DEFAULT_TRIAGE_RULE
    assert "NOT a medical model" in card.intended_use
    assert card.xml_path == model_dir / "model.xml" and card.bin_path == model_dir / "model.bin"
    assert card.bin_sha256 == hashlib.sha256((model_dir / "model.bin").read_bytes()).hexdigest()
    assert card.card_path == model_dir / "model.json"
    assert card.raw["preprocessing"] == {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"}


def test_single_mean_std_value_is_replicated(model_dir: Path) -> None:
    _edit_card(model_dir, _set("input.mean", [0.5]))
    _edit_card(model_dir, _set("input.std", [0.25]))
    card = ModelCard.load(model_dir)
    assert card.mean == (0.5, 0.5, 0.5) and card.std == (0.25, 0.25, 0.25)


def test_optional_fields_default(model_dir: Path) -> None:
    for key in ("thresholds", "metrics", "training", "preprocessing", "created", "architecture"):
        _edit_card(model_dir, _delete(key))
    _edit_card(model_dir, _delete("input.layout"))
    card = ModelCard.load(model_dir)
    assert dict(card.thresholds) == {}


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_set("schema", 2), "schema must be 1 (got 2)"),
        (_delete("schema"), "schema must be 1 (got missing)"),
        (_set("schema", True), "schema must be 1"),
        (_set("name", ""), "name must be a non-empty string"),
        (_delete("version"), "version is missing"),
        (_set("created", 20261126), "created must be a non-empty string"),
        (_set("precision", "fp32"), "precision must be one of 'f32', 'bf16', 'f16', 'int8' (got 'fp32')"),
        (_set("output", "scores"), "output must be one of 'probabilities', 'logits'"),
        (_set("classes", "normal,covid19"), "classes must be a list of at least 2 non-empty strings"),
        (_set("classes", ["normal"]), "classes must be a list of at least 2"),
        (_set("classes", ["normal", "covid19", "normal"]), "classes must be unique (repeated: normal)"),
        (_delete("input"), "input is missing (must be an object)"),
        (_set("input", [224, 224]), "input must be an object (got list)"),
        (_set("input.size", [224]), "input.size must be [height, width], two positive integers"),
        (_set("input.size", [224, "224"]), "input.size must be [height, width]"),
        (_set("input.size", [224, 0]), "input.size must be [height, width]"),
        (_set("input.channels", 0), "input.channels must be a positive integer (got 0)"),
        (_set("input.channels", 3.0), "input.channels must be a positive integer"),
        (_set("input.mean", [0.5, 0.5]), "input.mean must be a list of 1 or 3 (input.channels) finite numbers"),
        (_set("input.std", [0.2, 0.0, 0.2]), "input.std must be a list of 1 or 3 (input.channels) positive numbers"),
        (_set("input.layout", "NHWC"), "input.layout must be one of 'NCHW' (got 'NHWC')"),
        (_set("preprocessing", ["auto"]), "preprocessing must be an object"),
        (_set("metrics", None), "metrics must be an object"),
        (_set("thresholds", [0.5]), "thresholds must be an object"),
        (_set("thresholds.covid19", 1.5), "thresholds.covid19 must be a number in [0, 1] (got 1.5)"),
        (_set("thresholds.covid19", -0.1), "thresholds.covid19 must be a number in [0, 1]"),
        (_set("thresholds.covid19", "0.5"), "thresholds.covid19 must be a number in [0, 1]"),
        (_set("thresholds.covid19", True), "thresholds.covid19 must be a number in [0, 1]"),
        (_set("thresholds.flu", 0.5), "thresholds names classes not in classes"),
        (_delete("triage_rule"), "triage_rule is missing"),
        (_set("intended_use", "  "), "intended_use must be a non-empty string"),
        (_delete("files"), "files is missing (must be an object)"),
        (_set("files.bin", "../other/model.bin"), "files.bin must be a file name inside the model directory"),
        (_set("files.xml", "/abs/model.xml"), "files.xml must be a file name inside the model directory"),
        (_set("files.bin_sha256", "abc"), "files.bin_sha256 must be 64 hex digits or null"),
    ],
)
def test_invalid_field_is_named_with_the_file(model_dir: Path, edit: Callable[[dict[str, Any]], None], expected: str) -> None:
    _edit_card(model_dir, edit)
    with pytest.raises(ModelCardError) as info:
        ModelCard.load(model_dir)
    msg = str(info.value)
    assert msg.startswith(f"{model_dir / 'model.json'}: "), msg
    assert expected in msg, msg


def test_unknown_threshold_class_is_named(model_dir: Path) -> None:
    _edit_card(model_dir, _set("thresholds.flu", 0.5))
    with pytest.raises(ModelCardError, match=r"thresholds names classes not in classes .*'flu'"):
        ModelCard.load(model_dir)


def test_card_error_is_a_value_error(model_dir: Path) -> None:
    _edit_card(model_dir, _set("schema", 3))
    with pytest.raises(ValueError):
        ModelCard.load(model_dir)


def test_not_a_json_object(model_dir: Path) -> None:
    (model_dir / "model.json").write_text("[1, 2]")
    with pytest.raises(ModelCardError, match="must be a JSON object"):
        ModelCard.load(model_dir)


def test_bad_json(model_dir: Path) -> None:
    (model_dir / "model.json").write_text('{"schema": 1,')
    with pytest.raises(ModelCardError, match=r"model\.json: not valid JSON"):
        ModelCard.load(model_dir)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError) as info:
        ModelCard.load(tmp_path / "nope")
    assert MISSING in str(info.value) and "is not a directory" in str(info.value)


@pytest.mark.parametrize("name", ["model.json", "model.xml", "model.bin"])
def test_missing_file(model_dir: Path, name: str) -> None:
    (model_dir / name).unlink()
    with pytest.raises(ModelCardError) as info:
        ModelCard.load(model_dir)
    msg = str(info.value)
    assert MISSING in msg and name in msg, msg


def test_hash_mismatch_detected(model_dir: Path) -> None:
    with open(model_dir / "model.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelCardError, match=r"files\.bin_sha256 does not match .*model\.bin"):
        ModelCard.load(model_dir)
    # explicitly skipping the check loads it
    assert ModelCard.load(model_dir, verify_hash=False).name == "toy"


def test_same_size_corruption_detected(model_dir: Path) -> None:
    data = bytearray((model_dir / "model.bin").read_bytes())
    data[0] ^= 0xFF
    (model_dir / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="bin_sha256 does not match"):
        ModelCard.load(model_dir)


def test_missing_hash_loads_with_warning(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    _edit_card(model_dir, _set("files.bin_sha256", None))
    with caplog.at_level(logging.WARNING, logger="worker.modelcard"):
        card = ModelCard.load(model_dir)
    assert card.bin_sha256 is None
    assert "bin_sha256 is not set" in caplog.text


def test_uppercase_hash_accepted(model_dir: Path) -> None:
    _edit_card(model_dir, lambda d: d["files"].update(bin_sha256=d["files"]["bin_sha256"].upper()))
    assert ModelCard.load(model_dir).bin_sha256 == hashlib.sha256((model_dir / "model.bin").read_bytes()).hexdigest()


# --------------------------------------------------------------------------- to_dict / write_card


def test_to_dict_round_trip(model_dir: Path, tmp_path: Path) -> None:
    card = ModelCard.load(model_dir)
    d = card.to_dict()
    assert d == json.loads((model_dir / "model.json").read_text())
    d["name"] = "changed"
    d["input"]["size"][0] = 1
    assert card.raw["name"] == "toy" and card.raw["input"]["size"] == [224, 224]  # a deep copy

    # write it back (into a copy of the directory) and load it again: the same card
    other = tmp_path / "copy"
    other.mkdir()
    for name in ("model.xml", "model.bin"):
        (other / name).write_bytes((model_dir / name).read_bytes())
    write_card(other, card.to_dict())
    again = ModelCard.load(other)
    assert again.to_dict() == card.to_dict()
    fields = ("name", "version", "classes", "precision", "output", "input_size", "channels", "mean", "std",
              "triage_rule", "intended_use", "bin_sha256")
    assert all(getattr(again, f) == getattr(card, f) for f in fields)
    assert dict(again.thresholds) == dict(card.thresholds)


def test_write_card_fills_hash_and_indents(model_dir: Path) -> None:
    card = ModelCard.load(model_dir).to_dict()
    del card["files"]["bin_sha256"]
    card["metrics"] = {"auc": np.float32(0.875), "confusion": np.array([[1, 2], [3, 4]])}
    before = json.dumps(card, default=str)
    path = write_card(model_dir, card)
    assert path == model_dir / "model.json"
    text = path.read_text()
    assert text.startswith('{\n  "schema": 1,') and text.endswith("}\n")
    data = json.loads(text)
    assert data["files"]["bin_sha256"] == hashlib.sha256((model_dir / "model.bin").read_bytes()).hexdigest()
    assert data["metrics"] == {"auc": 0.875, "confusion": [[1, 2], [3, 4]]}
    assert json.dumps(card, default=str) == before  # input not modified
    assert not list(model_dir.glob(".model.json*"))  # no temporary file left


def test_write_card_rejects_invalid_card_and_keeps_old(model_dir: Path) -> None:
    old = (model_dir / "model.json").read_text()
    bad = ModelCard.load(model_dir).to_dict()
    bad["thresholds"]["covid19"] = 2
    with pytest.raises(ModelCardError, match=r"thresholds\.covid19 must be a number in \[0, 1\]"):
        write_card(model_dir, bad)
    assert (model_dir / "model.json").read_text() == old


def test_write_card_needs_the_ir_first(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(ModelCardError, match="save the IR first"):
        write_card(tmp_path, ModelCard.load(model_dir).to_dict())


# --------------------------------------------------------------------------- triage


def _probs(normal: float, pneumonia: float, covid19: float) -> dict[str, float]:
    return {"normal": normal, "pneumonia": pneumonia, "covid19": covid19}


def test_triage_threshold_is_inclusive(model_dir: Path) -> None:
    card = ModelCard.load(model_dir)  # covid19 0.5, pneumonia 0.3
    assert triage(_probs(0.5, 0.0, 0.5), card) == Triage("urgent", "P(covid19)=0.50 >= 0.50")
    # 0.3 is not exactly representable; the card's float and the probability's must still compare equal
    assert triage(_probs(0.7, 0.3, 0.0), card) == Triage("urgent", "P(pneumonia)=0.30 >= 0.30")
    just_below = math.nextafter(0.5, 0.0)
    assert triage(_probs(0.2, math.nextafter(0.3, 0.0), just_below), card) == Triage(
        "routine", "no class over its threshold"
    )


def test_triage_reports_every_class_over_threshold(model_dir: Path) -> None:
    card = ModelCard.load(model_dir)
    t = triage(_probs(0.0, 0.35, 0.91), card)
    assert t.priority == "urgent"
    assert t.reason == "P(pneumonia)=0.35 >= 0.30; P(covid19)=0.91 >= 0.50"


def test_unthresholded_class_never_urgent(model_dir: Path) -> None:
    card = ModelCard.load(model_dir)
    assert triage(_probs(0.99, 0.005, 0.005), card).priority == "routine"


def test_no_thresholds_is_routine(model_dir: Path) -> None:
    _edit_card(model_dir, _set("thresholds", {}))
    card = ModelCard.load(model_dir)
    assert triage(_probs(0.0, 0.0, 1.0), card) == Triage("routine", "no thresholds in model card")


def test_zero_threshold_always_urgent(model_dir: Path) -> None:
    _edit_card(model_dir, _set("thresholds", {"covid19": 0}))
    card = ModelCard.load(model_dir)
    assert triage(_probs(1.0, 0.0, 0.0), card) == Triage("urgent", "P(covid19)=0.00 >= 0.00")


def test_triage_rejects_missing_or_nan_probability(model_dir: Path) -> None:
    card = ModelCard.load(model_dir)
    with pytest.raises(ValueError, match="no probability for thresholded class 'covid19'"):
        triage({"normal": 0.5, "pneumonia": 0.5}, card)
    with pytest.raises(ValueError, match=r"P\(covid19\) is not finite"):
        triage(_probs(0.5, 0.0, float("nan")), card)


def test_unknown_threshold_class_rejected_at_load_not_at_triage(model_dir: Path) -> None:
    _edit_card(model_dir, _set("thresholds", {"COVID19": 0.5}))
    with pytest.raises(ModelCardError, match="'COVID19'"):
        ModelCard.load(model_dir)
