"""OpenVINO Engine on the toy model: values against a numpy oracle, batching, precision hints."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import pytest

from worker.engine import Engine, softmax
from worker.modelcard import ModelCard, ModelCardError, write_card
from worker.testing.toymodel import build_toy_model, toy_reference

CLASSES = ("normal", "pneumonia", "covid19")


@pytest.fixture(scope="module")
def logits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy_logits"), output="logits")


@pytest.fixture(scope="module")
def probs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_model(tmp_path_factory.mktemp("toy_probs"), output="probabilities", seed=7)


@pytest.fixture(scope="module")
def engine(logits_dir: Path) -> Engine:
    return Engine(logits_dir)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """17 distinct images: a brightness ramp (so predicted classes vary) plus structured noise."""
    rng = np.random.default_rng(42)
    levels = np.linspace(-2.0, 2.0, 17, dtype=np.float32)
    x = levels[:, None, None, None] + rng.normal(0, 1.0, size=(17, 3, 224, 224)).astype(np.float32)
    return np.ascontiguousarray(x)


def _copy_model(src: Path, dst: Path, edit: Any = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.xml", "model.bin"):
        (dst / name).write_bytes((src / name).read_bytes())
    card = json.loads((src / "model.json").read_text())
    if edit is not None:
        edit(card)
    write_card(dst, card)
    return dst


def _image(card: ModelCard, grey: float) -> np.ndarray:
    """A uniform image of grey level ``grey`` in [0, 1], normalised as the card says."""
    mean = np.asarray(card.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(card.std, dtype=np.float32)[:, None, None]
    img = np.full(card.input_shape, grey, dtype=np.float32)
    return ((img - mean) / std)[None]


# --------------------------------------------------------------------------- values


def test_matches_numpy_reference_logits_card(engine: Engine, batch: np.ndarray) -> None:
    got = engine.infer(batch)
    want = toy_reference(engine.card, batch)
    assert got.dtype == np.float64 and got.shape == (17, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the batch really spans the classes, so the comparison is not trivially about one class
    assert set(got.argmax(axis=1).tolist()) == {0, 1, 2}


def test_matches_numpy_reference_probabilities_card(probs_dir: Path, batch: np.ndarray) -> None:
    eng = Engine(probs_dir)
    assert eng.card.output == "probabilities"
    np.testing.assert_allclose(eng.infer(batch), toy_reference(eng.card, batch), rtol=0, atol=1e-5)


def test_bright_and_dark_images_give_last_and_first_class(engine: Engine) -> None:
    white = engine.probabilities(_image(engine.card, 1.0))[0]
    black = engine.probabilities(_image(engine.card, 0.0))[0]
    grey = engine.probabilities(np.zeros((1, 3, 224, 224), dtype=np.float32))[0]  # the mean grey
    assert max(grey, key=grey.__getitem__) == "pneumonia"
    assert max(white, key=white.__getitem__) == "covid19" and white["covid19"] > 0.99
    assert max(black, key=black.__getitem__) == "normal" and black["normal"] > 0.99


def test_softmax_is_stable_and_normalised() -> None:
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(p[1], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum())


def test_probabilities_sum_to_one(engine: Engine, probs_dir: Path, batch: np.ndarray) -> None:
    for p in (engine.infer(batch), Engine(probs_dir).infer(batch)):
        assert (p >= 0).all()
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_probabilities_dicts(engine: Engine, batch: np.ndarray) -> None:
    rows = engine.probabilities(batch[:4])
    arr = engine.infer(batch[:4])
    assert len(rows) == 4
    for row, ref in zip(rows, arr, strict=True):
        assert tuple(row) == CLASSES  # card class order
        assert all(type(v) is float for v in row.values())
        assert list(row.values()) == ref.tolist()


# --------------------------------------------------------------------------- batching and order


def test_batches_equal_one_by_one_inference(engine: Engine, batch: np.ndarray) -> None:
    singles = np.vstack([engine.infer(batch[i : i + 1]) for i in range(len(batch))])
    for n in (1, 5, 17):
        got = engine.infer(batch[:n])
        assert got.shape == (n, 3)
        np.testing.assert_array_equal(got, singles[:n])  # static batch 1: bit-identical rows


def test_order_preserved(engine: Engine, batch: np.ndarray) -> None:
    forward = engine.infer(batch)
    perm = np.random.default_rng(3).permutation(len(batch))
    np.testing.assert_array_equal(engine.infer(batch[perm]), forward[perm])
    np.testing.assert_array_equal(engine.infer(batch[::-1]), forward[::-1])  # non-contiguous input
    # the ramp goes dark -> bright, so P(covid19) increases along the batch
    assert forward[0].argmax() == 0 and forward[-1].argmax() == 2


def test_batch_larger_than_request_pool(engine: Engine) -> None:
    n = engine.num_requests * 10 + 3
    x = np.random.default_rng(5).normal(size=(n, 3, 224, 224)).astype(np.float32)
    np.testing.assert_allclose(engine.infer(x), toy_reference(engine.card, x), rtol=0, atol=1e-5)


def test_empty_batch(engine: Engine) -> None:
    out = engine.infer(np.empty((0, 3, 224, 224), dtype=np.float32))
    assert out.shape == (0, 3) and out.dtype == np.float64
    assert engine.probabilities(np.empty((0, 3, 224, 224), dtype=np.float32)) == []


def test_float64_and_list_input_converted(engine: Engine, batch: np.ndarray) -> None:
    np.testing.assert_array_equal(engine.infer(batch[:2].astype(np.float64)), engine.infer(batch[:2]))


def test_concurrent_callers(engine: Engine, batch: np.ndarray) -> None:
    expected = engine.infer(batch)
    results: dict[int, np.ndarray] = {}

    def work(k: int) -> None:
        results[k] = engine.infer(batch[k::2])

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    np.testing.assert_array_equal(results[0], expected[0::2])
    np.testing.assert_array_equal(results[1], expected[1::2])


# --------------------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 224, 225), (2, 1, 224, 224), (2, 224, 224, 3), (224, 224), (1, 1, 3, 224, 224)],
)
def test_wrong_shape_names_expected_shape(engine: Engine, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"expected a float32 batch of shape \(N, 3, 224, 224\)") as info:
        engine.infer(np.zeros(shape, dtype=np.float32))
    assert str(shape) in str(info.value)


def test_single_image_without_batch_axis_hint(engine: Engine) -> None:
    with pytest.raises(ValueError, match="add a batch axis"):
        engine.infer(np.zeros((3, 224, 224), dtype=np.float32))


def test_non_finite_input_rejected(engine: Engine, batch: np.ndarray) -> None:
    x = batch[:4].copy()
    x[2, 1, 5, 5] = np.nan
    with pytest.raises(ValueError, match=r"images \[2\]"):
        engine.infer(x)
    with pytest.raises(ValueError, match="dtype"):
        engine.infer(np.zeros((1, 3, 224, 224), dtype=np.complex64))


@pytest.mark.timeout(120, method="thread")
def test_failed_start_does_not_poison_the_queue(engine: Engine, batch: np.ndarray) -> None:
    """OpenVINO leaks a pool slot when start_async raises; after len(pool) leaks it hangs forever.

    Make start_async fail (by handing the real queue a wrong-shaped tensor) more times than
    there are requests; the engine must recover each time and still infer correctly.
    """
    expected = engine.infer(batch[:5])

    class FaultyQueue:
        def __init__(self, real: ov.AsyncInferQueue) -> None:
            self.real = real

        def start_async(self, inputs: Any, userdata: Any = None, share_inputs: bool = False) -> None:
            self.real.start_async({0: np.zeros((1, 3, 7, 7), dtype=np.float32)}, userdata, share_inputs=share_inputs)

        def __len__(self) -> int:
            return len(self.real)

        def __getitem__(self, i: int) -> ov.InferRequest:
            return self.real[i]

        def wait_all(self) -> None:
            self.real.wait_all()

    for _ in range(engine.num_requests + 1):
        engine._queue = FaultyQueue(engine._queue)  # type: ignore[assignment]
        with pytest.raises(RuntimeError, match="inference failed to start"):
            engine.infer(batch[:5])
        assert not isinstance(engine._queue, FaultyQueue)
    np.testing.assert_array_equal(engine.infer(batch[:5]), expected)


# --------------------------------------------------------------------------- precision and compile options


def _hint(eng: Engine) -> ov.Type:
    return eng.compiled.get_property("INFERENCE_PRECISION_HINT")


def test_f32_sets_inference_precision_hint(engine: Engine) -> None:
    assert engine.card.precision == "f32"
    assert engine.precision == "f32"
    assert _hint(engine) == ov.Type.f32
    assert engine.inference_precision == "f32"
    assert str(engine.compiled.get_property("PERFORMANCE_HINT")).endswith("THROUGHPUT")


def test_explicit_precision_overrides_card(logits_dir: Path, batch: np.ndarray) -> None:
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support")
    eng = Engine(logits_dir, precision="bf16")
    assert eng.precision == "bf16" and eng.card.precision == "f32"
    assert _hint(eng) == ov.Type.bf16 and eng.inference_precision == "bf16"
    # still the same model, just rounder
    np.testing.assert_allclose(eng.infer(batch), toy_reference(eng.card, batch), atol=1e-2)


def test_card_precision_used_by_default(logits_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(logits_dir, tmp_path / "bf16card", lambda c: c.update(precision="bf16"))
    eng = Engine(d)
    assert eng.precision == "bf16"
    assert eng.inference_precision == _hint(eng).get_type_name()
    # and an explicit f32 beats a bf16 card
    assert _hint(Engine(d, precision="f32")) == ov.Type.f32


def test_int8_card_runs_float_parts_in_f32(logits_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(logits_dir, tmp_path / "int8card", lambda c: c.update(precision="int8"))
    eng = Engine(d)
    assert eng.precision == "int8"
    assert _hint(eng) == ov.Type.f32


def test_int8_needs_an_int8_card(logits_dir: Path) -> None:
    with pytest.raises(ValueError, match="int8 needs a quantised IR"):
        Engine(logits_dir, precision="int8")


@pytest.mark.parametrize("bad", ["fp32", "FP32", "int4", ""])
def test_unknown_precision_rejected(logits_dir: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="precision must be one of f32, bf16, f16, int8"):
        Engine(logits_dir, precision=bad)


def test_num_streams(logits_dir: Path, batch: np.ndarray) -> None:
    eng = Engine(logits_dir, num_streams=1)
    assert eng.num_streams == 1 and eng.compiled.get_property("NUM_STREAMS") == 1
    np.testing.assert_allclose(eng.infer(batch[:3]), toy_reference(eng.card, batch[:3]), rtol=0, atol=1e-5)
    assert Engine(logits_dir, num_streams="AUTO").num_streams >= 1
    for bad in (0, -1, True, "many", 1.5):
        with pytest.raises(ValueError, match="num_streams"):
            Engine(logits_dir, num_streams=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- card / IR contract


def test_card_size_must_match_ir(logits_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(logits_dir, tmp_path / "size", lambda c: c["input"].update(size=[112, 112]))
    with pytest.raises(ModelCardError, match=r"input shape \[\?,3,224,224\] does not match .*height differs"):
        Engine(d)


def test_card_classes_must_match_ir(logits_dir: Path, tmp_path: Path) -> None:
    def four_classes(c: dict[str, Any]) -> None:
        c["classes"] = ["normal", "pneumonia", "covid19", "tb"]

    d = _copy_model(logits_dir, tmp_path / "classes", four_classes)
    with pytest.raises(ModelCardError, match=r"expected \[1, 4\] \(4 classes"):
        Engine(d)


def test_logits_declared_as_probabilities_detected(logits_dir: Path, tmp_path: Path, batch: np.ndarray) -> None:
    d = _copy_model(logits_dir, tmp_path / "mislabelled", lambda c: c.update(output="probabilities"))
    eng = Engine(d)
    with pytest.raises(RuntimeError, match="should it be 'logits'"):
        eng.infer(batch[:3])


def test_bad_model_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="--model DIR must hold model.json, model.xml and model.bin"):
        Engine(tmp_path)


def test_toy_model_other_geometry(tmp_path: Path) -> None:
    d = build_toy_model(tmp_path / "small", classes=("a", "b"), size=(30, 21), channels=1, output="probabilities")
    eng = Engine(d)
    x = np.random.default_rng(9).normal(size=(6, 1, 30, 21)).astype(np.float32)
    np.testing.assert_allclose(eng.infer(x), toy_reference(eng.card, x), rtol=0, atol=1e-5)
    assert eng.probabilities(_image(eng.card, 1.0))[0]["b"] > 0.9
    assert eng.probabilities(_image(eng.card, 0.0))[0]["a"] > 0.9
