"""OpenVINO inference for the worker: compile the IR once, run batches concurrently on CPU.

The :class:`Engine` is built once per process from a model directory (see
:mod:`worker.modelcard`).  It never imports torch.

Design notes
------------
* **Static batch of 1 per request.**  The IR is reshaped to ``[1, C, H, W]`` before
  compiling, and a batch of N images is split into N single-image requests that run
  concurrently on an :class:`openvino.AsyncInferQueue` compiled with the THROUGHPUT
  performance hint (which gives several CPU streams, one request in flight per stream).
  Why not a dynamic batch: (1) with static shapes the CPU plugin plans kernels and memory
  once at compile time, while dynamic shapes re-run shape inference and may reallocate on
  every call; (2) parallelism already comes from the streams, so batching inside one
  request buys little on CPU; (3) every image is computed by the same kernels with the same
  shape whatever else is in the batch, so an image's probabilities do not depend on how
  the scheduler happened to group studies (reproducible results; the tests check that
  batches of 1, 5 and 17 give the same rows as one-by-one inference); (4) a single urgent
  study is not slowed down by waiting for a batch to fill.
* **Precision is always explicit.**  On CPUs with AVX-512 BF16 / AMX, OpenVINO's default
  ``INFERENCE_PRECISION_HINT`` is bf16, so an "FP32" IR silently runs in bf16 (a softmax
  difference of 0.115 was measured on this project's model).  The card's (or caller's)
  precision is therefore always turned into an explicit hint and read back from the compiled
  model; ``f32`` that does not read back as f32 is an error.
* **int8** means the IR is already quantised (FakeQuantize ops from NNCF); the quantised
  ops run as int8 kernels whatever the hint.  The hint then only governs the ops that were
  left in floating point (typically the stem, the classifier head and softmax), which are
  exactly the ops the quantiser kept precise because they are sensitive.  We request f32 for
  them so that the int8 model's accuracy is what the conversion stage measured, and does not
  change with whether the edge box happens to have bf16 hardware.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, cast

import numpy as np
import openvino as ov

from worker import heatmap as heatmapmod
from worker.modelcard import PRECISIONS, ModelCard, ModelCardError

log = logging.getLogger(__name__)

__all__ = ["Engine", "PRECISION_HINTS", "softmax"]

#: Requested precision -> OpenVINO ``INFERENCE_PRECISION_HINT``.  int8 -> f32: see module doc.
PRECISION_HINTS: dict[str, str] = {"f32": "f32", "bf16": "bf16", "f16": "f16", "int8": "f32"}

# Allowed |sum - 1| of a row the card declares to be probabilities (f32 softmax is ~1e-7 off;
# logits mislabelled as probabilities are off by far more).
_PROB_SUM_TOL = 1e-3


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for large logits (subtracts the row maximum)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return cast(np.ndarray, e / e.sum(axis=-1, keepdims=True))


def _check_num_streams(num_streams: int | str | None) -> str | None:
    """``NUM_STREAMS`` as OpenVINO's config string: a positive int or ``"AUTO"``; None = leave to the hint."""
    if num_streams is None:
        return None
    if isinstance(num_streams, bool):
        raise ValueError(f"num_streams must be a positive integer or 'AUTO' (got {num_streams!r})")
    if isinstance(num_streams, int):
        if num_streams <= 0:
            raise ValueError(f"num_streams must be a positive integer or 'AUTO' (got {num_streams!r})")
        return str(num_streams)
    if isinstance(num_streams, str):
        s = num_streams.strip().upper()
        if s == "AUTO" or (s.isdigit() and int(s) > 0):
            return s
    raise ValueError(f"num_streams must be a positive integer or 'AUTO' (got {num_streams!r})")


class Engine:
    """Compile the IR once per process; infer batches through ``ov.AsyncInferQueue`` with the
    THROUGHPUT performance hint.

    Attributes:
        card: the validated model card.
        precision: the precision requested (``"f32"``, ``"bf16"``, ``"f16"`` or ``"int8"``),
            to be recorded with every result.
        inference_precision: the ``INFERENCE_PRECISION_HINT`` the compiled model reports
            (``"f32"``, ``"bf16"`` or ``"f16"``).
        compiled: the :class:`openvino.CompiledModel` (for reading properties).
        num_requests: size of the infer-request pool (``OPTIMAL_NUMBER_OF_INFER_REQUESTS``).
        num_streams: the CPU streams the compiled model uses.
        heatmap: the model's :class:`worker.heatmap.Head` when the IR has feature-map outputs
            and the card a ``heatmap`` block (issue 17), else None; ``heatmap_unavailable``
            then says why in one sentence.

    :meth:`infer` is serialised by a lock, so one Engine can be shared between threads;
    concurrency comes from the request pool, not from callers.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        precision: str | None = None,
        num_streams: int | str | None = None,
        device: str = "CPU",
    ) -> None:
        """Load and verify the card, read the IR, reshape it to batch 1, compile it.

        Args:
            model_dir: directory with ``model.json``, ``model.xml`` and ``model.bin``.
            precision: ``None`` takes ``card.precision``.  ``"int8"`` is only accepted for a
                card whose precision is int8 (a float IR cannot be run "as int8").
            num_streams: ``NUM_STREAMS`` (positive int or ``"AUTO"``); ``None`` lets the
                THROUGHPUT hint choose from the core count.
            device: OpenVINO device name.

        Raises:
            ModelCardError: bad model directory or card, or an IR that does not match the card
                (input shape, number of classes, number of inputs/outputs).
            ValueError: bad ``precision`` or ``num_streams``.
            RuntimeError: the device does not honour an f32 precision hint.
        """
        t0 = time.perf_counter()
        self.card: ModelCard = ModelCard.load(model_dir)
        card = self.card
        prec = card.precision if precision is None else precision
        if prec not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {prec!r})")
        if prec == "int8" and card.precision != "int8":
            raise ValueError(
                f"precision int8 needs a quantised IR, but {card.card_path} says precision {card.precision!r}"
            )
        self.precision: str = prec
        hint = PRECISION_HINTS[prec]
        streams = _check_num_streams(num_streams)

        core = ov.Core()
        try:
            model = core.read_model(str(card.xml_path), str(card.bin_path))
        except Exception as exc:  # OpenVINO raises RuntimeError with a long C++ trace
            raise ModelCardError(f"{card.xml_path}: OpenVINO cannot read the IR: {exc}") from None
        self._class_output = self._check_and_reshape(model)
        self.heatmap: heatmapmod.Head | None = None
        self.heatmap_unavailable: str | None = None
        try:
            self.heatmap = heatmapmod.load(card, [set(o.get_names()) for o in model.outputs])
        except heatmapmod.HeatmapUnavailable as exc:
            self.heatmap_unavailable = str(exc)
        self._map_outputs: list[int] = []
        if self.heatmap is not None:
            names = [set(o.get_names()) for o in model.outputs]
            self._map_outputs = [next(i for i, n in enumerate(names) if o in n) for o in self.heatmap.outputs]

        config: dict[str, Any] = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": hint}
        if streams is not None:
            config["NUM_STREAMS"] = streams
        self.compiled: ov.CompiledModel = core.compile_model(model, device, config)

        got = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision: str = got.get_type_name() if isinstance(got, ov.Type) else str(got)
        if self.inference_precision != hint:
            if hint == "f32":
                raise RuntimeError(
                    f"{device} reports INFERENCE_PRECISION_HINT {self.inference_precision} after f32 was requested; "
                    "refusing to run a model validated in f32 at another precision"
                )
            log.warning(
                "%s runs %s at %s, not the requested %s (not supported by this device?)",
                device, card.name, self.inference_precision, hint,
            )
        self.num_streams: int = int(self.compiled.get_property("NUM_STREAMS"))
        self.num_requests: int = int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._lock = threading.Lock()
        self._queue = self._new_queue()
        log.info(
            "compiled %s %s on %s in %.2fs: precision %s (hint %s), %d streams, %d requests",
            card.name, card.version, device, time.perf_counter() - t0,
            self.precision, self.inference_precision, self.num_streams, self.num_requests,
        )

    # ------------------------------------------------------------------ setup

    def _check_and_reshape(self, model: ov.Model) -> int:
        """Check the IR's single input and its class output against the card, then fix the input to
        ``[1, C, H, W]``.  Returns the index of the class output.

        Besides the class output an IR may have feature-map outputs for heatmaps (issue 17,
        :mod:`worker.heatmap`); the class output is the one named like the card's ``output``
        (``probabilities`` / ``logits``) or, failing that, the first.
        """
        card = self.card
        c, h, w = card.input_shape
        where = str(card.xml_path)
        if len(model.inputs) != 1 or len(model.outputs) < 1:
            raise ModelCardError(
                f"{where}: the model must have exactly one input and at least one output "
                f"(has {len(model.inputs)} and {len(model.outputs)})"
            )
        named = [i for i, o in enumerate(model.outputs) if card.output in o.get_names()]
        index = named[0] if named else 0
        ishape = model.input(0).get_partial_shape()
        if ishape.rank.is_dynamic or ishape.rank.get_length() != 4:
            raise ModelCardError(f"{where}: input shape {ishape} is not 4-D NCHW")
        for i, (want, label) in enumerate(((c, "channels"), (h, "height"), (w, "width")), start=1):
            dim = ishape[i]
            if dim.is_static and dim.get_length() != want:
                raise ModelCardError(
                    f"{where}: input shape {ishape} does not match {card.card_path} input "
                    f"(channels {c}, size [{h}, {w}]): {label} differs"
                )
        try:
            model.reshape({model.input(0): ov.PartialShape([1, c, h, w])})
        except Exception as exc:
            raise ModelCardError(f"{where}: cannot fix the input shape to [1, {c}, {h}, {w}]: {exc}") from None
        oshape = model.output(index).get_partial_shape()
        n = len(card.classes)
        if oshape.is_dynamic or list(oshape.to_shape()) != [1, n]:
            raise ModelCardError(
                f"{where}: output shape for one image is {oshape}, expected [1, {n}] "
                f"({n} classes in {card.card_path})"
            )
        return index

    def _new_queue(self) -> ov.AsyncInferQueue:
        queue = ov.AsyncInferQueue(self.compiled, self.num_requests)
        queue.set_callback(self._on_done)
        return queue

    def _on_done(
        self, request: ov.InferRequest, userdata: tuple[np.ndarray, np.ndarray, list[str], int, list[Any] | None]
    ) -> None:
        """Copy one request's output row (and, when ``maps`` is a list, its feature maps) into the
        caller's arrays (runs on an OpenVINO thread).

        It must never raise: AsyncInferQueue re-raises callback exceptions at a later,
        unrelated ``start_async`` call.
        """
        out, filled, errors, i, maps = userdata
        try:
            out[i] = request.get_output_tensor(self._class_output).data.reshape(-1)
            if maps is not None:
                maps[i] = [np.array(request.get_output_tensor(k).data[0], dtype=np.float32) for k in self._map_outputs]
            filled[i] = True
        except BaseException as exc:  # noqa: BLE001 - reported by infer()
            errors.append(f"image {i}: {type(exc).__name__}: {exc}")

    def _recover_queue(self) -> None:
        """Replace the queue after a failed ``start_async``.

        OpenVINO quirk: when ``start_async`` raises (e.g. setting the input fails), the request
        it took from the idle pool is never returned, and after as many failures as there are
        requests every later ``start_async``/``wait_all`` blocks forever.  Wait for whatever is
        still running, then start over with a fresh pool.
        """
        for i in range(len(self._queue)):
            try:
                self._queue[i].wait()
            except Exception:  # noqa: BLE001 - the request is being discarded
                pass
        self._queue = self._new_queue()

    # ------------------------------------------------------------------ inference

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a batch of preprocessed images (see :meth:`infer_maps`)."""
        return self._run(batch, None)

    def infer_maps(self, batch: np.ndarray) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """:meth:`infer` plus each image's feature maps (one ``(C_b, h_b, w_b)`` float32 array per
        branch, in ``heatmap.outputs`` order), from the same inference.  Raises RuntimeError when
        the model has no heatmap outputs (:attr:`heatmap_unavailable` says why)."""
        if self.heatmap is None:
            raise RuntimeError(f"no heatmaps from this model: {self.heatmap_unavailable}")
        maps: list[Any] = [None] * int(np.asarray(batch).shape[0]) if np.asarray(batch).ndim == 4 else []
        probs = self._run(batch, maps)
        return probs, maps

    def _run(self, batch: np.ndarray, maps: list[Any] | None) -> np.ndarray:
        """Class probabilities for a batch of preprocessed images.

        Args:
            batch: ``(N, C, H, W)`` array (converted to contiguous float32), N >= 0, with
                ``(C, H, W)`` from the card.  All values must be finite.

        Returns:
            ``(N, n_classes)`` float64 array; each row sums to 1, columns in ``card.classes``
            order, rows in input order.  Softmax is applied here when ``card.output`` is
            ``"logits"``.

        Raises:
            ValueError: wrong shape or non-finite input.
            RuntimeError: inference failed, or a card declaring ``"probabilities"`` is
                attached to a model whose rows are not probabilities.
        """
        c, h, w = self.card.input_shape
        expected = f"(N, {c}, {h}, {w})"
        arr = np.asarray(batch)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != (c, h, w):
            hint = " (a single image? add a batch axis: x[None])" if tuple(arr.shape) == (c, h, w) else ""
            raise ValueError(
                f"Engine.infer: expected a float32 batch of shape {expected} (NCHW, from {self.card.name} "
                f"model.json), got shape {tuple(arr.shape)}{hint}"
            )
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"Engine.infer: expected a float32 batch, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        n = arr.shape[0]
        n_classes = len(self.card.classes)
        if n == 0:
            return np.empty((0, n_classes), dtype=np.float64)
        finite = np.isfinite(arr.reshape(n, -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite).tolist()
            raise ValueError(f"Engine.infer: images {bad[:10]} of the batch contain NaN or infinity")

        raw = np.empty((n, n_classes), dtype=np.float32)
        filled = np.zeros(n, dtype=bool)
        errors: list[str] = []
        with self._lock:
            try:
                for i in range(n):
                    # arr[i:i+1] is a contiguous view: shared with the request, no copy.  It stays
                    # alive until wait_all() returns because `arr` does.
                    self._queue.start_async({0: arr[i : i + 1]}, (raw, filled, errors, i, maps), share_inputs=True)
            except Exception as exc:
                self._recover_queue()
                raise RuntimeError(f"inference failed to start: {exc}") from exc
            self._queue.wait_all()
        if errors or not filled.all():
            missing = np.flatnonzero(~filled).tolist()
            raise RuntimeError(f"inference failed for images {missing[:10]}: {'; '.join(errors[:3])}")
        if not np.isfinite(raw).all():
            raise RuntimeError("inference produced NaN or infinity (overflow at this precision?)")

        if self.card.output == "logits":
            return softmax(raw)
        probs = raw.astype(np.float64)
        sums = probs.sum(axis=1)
        if (probs < -1e-6).any() or (np.abs(sums - 1.0) > _PROB_SUM_TOL).any():
            raise RuntimeError(
                f"{self.card.card_path} says output 'probabilities', but the model's rows are not "
                f"(row sums {np.round(sums[:5], 4).tolist()}, min {probs.min():.4g}); should it be 'logits'?"
            )
        probs = np.clip(probs, 0.0, None)
        return cast(np.ndarray, probs / probs.sum(axis=1, keepdims=True))

    def probabilities(self, batch: np.ndarray) -> list[dict[str, float]]:
        """:meth:`infer`, as one ``{class name: probability}`` dict per image (card class order)."""
        rows = self.infer(batch)
        return [dict(zip(self.card.classes, map(float, row), strict=True)) for row in rows]

    def __repr__(self) -> str:
        return (
            f"Engine({self.card.name!r} {self.card.version!r}, precision={self.precision!r}, "
            f"hint={self.inference_precision!r}, streams={self.num_streams}, requests={self.num_requests})"
        )
