"""The gates trigger: broken models are rejected with the gate, the value and the limit."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="conversion needs the train extra (torch, nncf)")
pytest.importorskip("nncf", reason="conversion needs the train extra (torch, nncf)")

from conversion.convert import ConvertOptions, convert_model  # noqa: E402
from conversion.gates import GateError, check  # noqa: E402


def test_gate_check_and_message():
    g = check("parity_fp32", 0.115)
    assert not g.passed
    assert "parity_fp32 FAIL" in g.line() and "0.115" in g.line() and "<= 0.0001" in g.line()
    assert check("parity_fp32", 3.4e-5).passed
    assert not check("int8_agreement", 0.98).passed and check("int8_agreement", 0.99).passed
    assert not check("worker_reproduces", float("nan")).passed
    err = GateError([check("parity_fp32", 1e-6), check("int8_accuracy_drop", 0.02)])
    assert "int8_accuracy_drop" in str(err) and "parity_fp32" not in str(err)


def test_torch_ir_divergence_is_rejected(tiny_model, tiny_ckpt, tiny_data, tmp_path):
    from tinyconv import TraceTrap

    out = tmp_path / "broken"
    with pytest.raises(GateError) as ei:
        convert_model(TraceTrap(tiny_model), tiny_ckpt, out, ConvertOptions(manifest=tiny_data))
    msg = str(ei.value)
    assert "gate parity_fp32 FAIL" in msg and "limit <= 0.0001" in msg
    assert "gate parity_fp16 FAIL" in msg and "limit <= 0.001" in msg
    # nothing at the path a worker would be pointed at; the measurements are kept for reading
    assert not out.exists()
    rejected = out.with_name("broken.rejected")
    report = json.loads((rejected / "conversion.json").read_text())
    failed = {g["name"] for g in report["gates"] if not g["passed"]}
    assert {"parity_fp32", "parity_fp16"} <= failed


def test_int8_gate_miss_tries_accuracy_control_then_fails(tiny_model, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "q"
    opts = ConvertOptions(manifest=tiny_data, int8=True, calibration=8, gate_limits={"int8_agreement": 1.01})
    with pytest.raises(GateError) as ei:
        convert_model(tiny_model, tiny_ckpt, out, opts)
    assert "gate int8_agreement FAIL" in str(ei.value) and ">= 1.01" in str(ei.value)
    report = json.loads((out.with_name("q.rejected") / "conversion.json").read_text())
    int8 = report["conversion"]["int8"]
    assert int8["plain"]["passed"] is False
    assert int8["method"] == "nncf.quantize_with_accuracy_control" and int8["validation_split"] == "val"
