"""End to end: a tiny trained CNN -> FP16 / FP32 / INT8 IR + card, loaded by the worker."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

from worker.engine import Engine  # noqa: E402
from worker.modelcard import ModelCard, ModelCardError, triage  # noqa: E402

FP16_GATES = ["fp16_accuracy_drop", "fp16_adult_accuracy_drop", "fp16_macro_auroc_drop",
              "fp16_covid19_sensitivity_drop", "fp16_pneumonia_sensitivity_drop", "fp16_agreement"]
INT8_GATES = [g.replace("fp16", "int8") for g in FP16_GATES]


def _gate_names(result) -> list[str]:
    return [g.name for g in result.gates]


def test_fp16_conversion_passes_gates_and_writes_card(fp16_result):
    out = fp16_result.out_dir
    assert fp16_result.passed and fp16_result.precision == "f32"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "conversion.json", "model.bin", "model.json",
                                                     "model.xml"]
    readme = (out / "README.md").read_text()
    acc = json.loads((out / "model.json").read_text())["metrics"]["ir_f32"]["overall"]["accuracy"]
    assert "| all | " in readme and f"{100 * acc:.1f}" in readme and "non-commercial" in readme
    assert not out.with_name(out.name + ".partial").exists()
    assert _gate_names(fp16_result) == ["parity_fp32", *FP16_GATES, "worker_reproduces"]
    for g in fp16_result.gates:
        assert g.passed, g.line()
    p32 = fp16_result.gates[0]
    assert p32.value <= 1e-4 and p32.limit == 1e-4

    card = ModelCard.load(out)  # schema + sha256 of the .bin
    raw = card.raw
    assert (card.name, card.version, card.precision, card.output) == ("tiny", "9.9.9", "f32", "probabilities")
    assert card.classes == ("normal", "pneumonia", "covid19")
    assert card.input_size == (32, 32) and card.channels == 3
    assert raw["preprocessing"] == {"voi": "auto", "percentiles": [0.5, 99.5], "crop": "center_square"}
    assert set(card.thresholds) == {"covid19", "pneumonia"}
    assert card.intended_use == "research screening aid; not for diagnosis"
    assert raw["architecture"] and raw["created"].endswith("Z")
    assert raw["training"]["commit"] == "test" and raw["training"]["best_epoch"] == 1
    cal = raw["threshold_calibration"]
    assert cal["split"] == "val" and cal["targets"] == {"covid19": 0.95, "pneumonia": 0.90}
    for c, a in cal["achieved"].items():
        assert a["sensitivity"] >= cal["targets"][c]
    m = raw["metrics"]
    assert m["split"] == "test" and m["deployed"] == "ir_f32" and m["n"] == 30
    for key in ("torch", "ir_f32"):
        assert m[key]["overall"]["accuracy"] >= 0.9
        assert set(m[key]["by_age_group"]) == {"adult", "child", "unknown"}
        assert "triage" in m[key]["overall"]
    assert m["ir_f32"]["overall"]["accuracy"] == m["torch"]["overall"]["accuracy"]
    assert [g["name"] for g in raw["gates"]] == _gate_names(fp16_result)
    assert raw["conversion"]["ir_weights"] == "fp16" and raw["conversion"]["softmax_in_ir"] is True
    report = json.loads((out / "conversion.json").read_text())
    assert report["precision"] == "f32"


def test_engine_loads_fp16_ir_and_applies_triage(fp16_result, tiny_data):
    from worker.imaging import PreprocessSpec, load_image_file

    eng = Engine(fp16_result.out_dir)
    assert eng.precision == "f32" and eng.inference_precision == "f32"
    spec = PreprocessSpec.from_card(eng.card.raw)
    root = tiny_data.parent
    x = np.stack([load_image_file(root / f"images/test_{c}_0.png", spec) for c in ("normal", "pneumonia", "covid19")])
    probs = eng.probabilities(x)
    assert [max(p, key=p.get) for p in probs] == ["normal", "pneumonia", "covid19"]
    assert triage(probs[2], eng.card).priority == "urgent"
    assert triage(probs[0], eng.card).priority == "routine"


def test_int8_conversion_deploys_int8_with_float_fallback(int8_result):
    out = int8_result.out_dir
    assert int8_result.passed and int8_result.precision == "int8"
    names = _gate_names(int8_result)
    assert names == ["parity_fp32", *FP16_GATES, *INT8_GATES, "worker_reproduces", "worker_reproduces"]
    card = ModelCard.load(out)
    assert card.precision == "int8"
    assert card.raw["conversion"]["int8"]["method"] == "nncf.quantize"
    assert card.raw["conversion"]["int8"]["calibration_images"] == 12
    assert card.raw["conversion"]["int8"]["calibration_split"] == "train"
    m = card.raw["metrics"]
    assert m["deployed"] == "ir_int8" and {"torch", "ir_f32", "ir_int8"} <= set(m)
    # every produced IR loads in the worker's engine
    e8 = Engine(out)
    assert e8.precision == "int8" and e8.inference_precision == "f32"
    assert "FakeQuantize" in (out / "model.xml").read_text()
    ef = Engine(out / "float")
    assert ef.card.precision == "f32"
    assert "FakeQuantize" not in (out / "float" / "model.xml").read_text()
    x = np.zeros((2, 3, 32, 32), dtype=np.float32)
    assert e8.infer(x).shape == ef.infer(x).shape == (2, 3)


def test_fp32_weights_and_bf16_precision_are_gated(tiny_model, tiny_ckpt, tiny_data, tmp_path):
    from conversion.convert import ConvertOptions, convert_model

    # 10 test images per class: one image is 0.1 of a sensitivity, and bf16's own validation-
    # calibrated threshold may move one of them (real CPUs with bf16 do; others run f32).
    one_image = {f"bf16_{c}_sensitivity_drop": 0.11 for c in ("covid19", "pneumonia")}
    r = convert_model(tiny_model, tiny_ckpt, tmp_path / "m",
                      ConvertOptions(manifest=tiny_data, fp32=True, precision="bf16", gate_limits=one_image))
    assert _gate_names(r) == ["parity_fp32", *[g.replace("fp16", "bf16") for g in FP16_GATES], "worker_reproduces"]
    card = ModelCard.load(r.out_dir)
    assert card.precision == "bf16" and card.raw["conversion"]["ir_weights"] == "fp32"
    assert Engine(r.out_dir).inference_precision in ("bf16", "f32")


def test_tampered_weights_are_refused_by_the_worker(fp16_result, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(fp16_result.out_dir, d)
    data = bytearray((d / "model.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "model.bin").write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="bin_sha256 does not match"):
        Engine(d)


def test_out_dir_must_be_empty(tiny_model, tiny_ckpt, tiny_data, tmp_path):
    from conversion.convert import ConvertOptions, convert_model

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        convert_model(tiny_model, tiny_ckpt, tmp_path / "m", ConvertOptions(manifest=tiny_data))
