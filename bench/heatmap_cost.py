"""What a Grad-CAM heatmap costs per image, next to inference alone (issue 17; target <= 10 %).

    .venv/bin/python bench/heatmap_cost.py --model DIR [--images 16] [--repeats 5] [--out bench/out/heatmap_cost.json]

``DIR`` is a model directory with heatmap outputs (``cxr-triage convert`` of a hybrid
checkpoint; the card has a ``heatmap`` block).  Input: ``--images`` preprocessed images of the
card's input shape (seeded noise: the cost does not depend on the content).  Each repeat, in
this order, with the worker's own code:

* ``infer``: ``Engine.infer`` on batches of 1 (the worker's per-request shape; the pool runs
  one image at a time, so this is the latency one image pays);
* ``infer_maps``: ``Engine.infer_maps`` on the same batches (the same inference, plus copying
  the feature-map outputs out of the request);
* ``gradcam_1`` / ``gradcam_3``: ``worker.heatmap.gradcam`` for 1 class (the predicted one)
  and for 3 classes (predicted + COVID-19 + pneumonia over threshold: the most the worker draws).

Reported per stage: the median over repeats of the mean ms per image, and the heatmap's extra
cost (``infer_maps - infer + gradcam``) as a percentage of ``infer``.  The machine load (1-minute
load average and CPU count, before and after) is printed beside the table and stored in the
JSON, because on a shared machine it moves every number.  The SC rendering
(``worker.overlay``) is a result-building cost like the banner SC's and is timed separately
(``overlay_sc_ms``, a 2000 x 2500 source).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import heatmap  # noqa: E402
from worker.engine import Engine  # noqa: E402


def _load() -> dict[str, float]:
    one, five, _ = os.getloadavg()
    return {"load_1min": round(one, 2), "load_5min": round(five, 2), "cpus": os.cpu_count() or 0}


def _per_image_ms(fn, xs: list[np.ndarray]) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    for x in xs:
        fn(x)
    return (time.perf_counter() - t) * 1e3 / len(xs)


def _overlay_ms(engine: Engine, repeats: int) -> float:
    """Build time of one heatmap SC from a 2000 x 2500 12-bit CR (tests/support.make_image)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from support import make_image  # type: ignore[import-not-found]

    from worker import overlay
    from worker.results import TriageResult

    src = make_image(rows=2500, cols=2000)
    cams = {
        c: np.random.default_rng(0).random(engine.card.input_size).astype(np.float32) for c in engine.card.classes[:2]
    }
    probs = {c: 1.0 / len(engine.card.classes) for c in engine.card.classes}
    result = TriageResult(
        predicted_class=engine.card.classes[0],
        probabilities=probs,
        priority="routine",
        triage_reason="bench",
        thresholds=dict(engine.card.thresholds),
        model_name=engine.card.name,
        model_version=engine.card.version,
        model_sha256=None,
        model_precision=engine.precision,
    )
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        overlay.build_heatmap_sc(src, result, cams)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory with heatmap outputs")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "heatmap_cost.json"))
    args = ap.parse_args(argv)

    engine = Engine(args.model)
    if engine.heatmap is None:
        print(f"{args.model}: {engine.heatmap_unavailable}", file=sys.stderr)
        return 2
    c, h, w = engine.card.input_shape
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(1, c, h, w)).astype(np.float32) for _ in range(args.images)]
    _, maps0 = engine.infer_maps(xs[0])
    k = len(engine.card.classes)
    one, three = [0], list(range(min(3, k)))
    load_before = _load()
    engine.infer(xs[0])  # warm-up
    stages: dict[str, list[float]] = {"infer": [], "infer_maps": [], "gradcam_1": [], "gradcam_3": []}
    for _ in range(args.repeats):
        stages["infer"].append(_per_image_ms(engine.infer, xs))
        stages["infer_maps"].append(_per_image_ms(engine.infer_maps, xs))
        stages["gradcam_1"].append(_per_image_ms(lambda _x: heatmap.gradcam(engine.heatmap, maps0[0], one, (h, w)), xs))
        stages["gradcam_3"].append(
            _per_image_ms(lambda _x: heatmap.gradcam(engine.heatmap, maps0[0], three, (h, w)), xs)
        )
    load_after = _load()
    med = {k2: statistics.median(v) for k2, v in stages.items()}
    extra1 = med["infer_maps"] - med["infer"] + med["gradcam_1"]
    extra3 = med["infer_maps"] - med["infer"] + med["gradcam_3"]
    sc_ms = _overlay_ms(engine, max(3, args.repeats))
    report = {
        "model": {
            "dir": str(args.model),
            "name": engine.card.name,
            "version": engine.card.version,
            "precision": engine.precision,
            "outputs": list(engine.heatmap.outputs),
            "maps": [list(m.shape) for m in maps0[0]],
        },
        "images": args.images,
        "repeats": args.repeats,
        "streams": engine.num_streams,
        "median_ms_per_image": {k2: round(v, 3) for k2, v in med.items()},
        "all_ms_per_image": {k2: [round(x, 3) for x in v] for k2, v in stages.items()},
        "heatmap_extra_ms": {"1_class": round(extra1, 3), "3_classes": round(extra3, 3)},
        "heatmap_extra_percent_of_infer": {
            "1_class": round(100 * extra1 / med["infer"], 2),
            "3_classes": round(100 * extra3 / med["infer"], 2),
        },
        "overlay_sc_ms": round(sc_ms, 1),
        "machine": {"before": load_before, "after": load_after},
    }
    print(
        f"model {engine.card.name} {engine.card.version} ({engine.precision}), "
        f"{args.images} images x {args.repeats} repeats,"
        f" machine load {load_before['load_1min']} -> {load_after['load_1min']} on {load_before['cpus']} CPUs"
    )
    print(f"{'stage':<12} {'ms/image':>10}")
    for k2, v in med.items():
        print(f"{k2:<12} {v:>10.3f}")
    print(
        f"heatmap extra: {extra1:.3f} ms (1 class) = "
        f"{report['heatmap_extra_percent_of_infer']['1_class']:.2f} % of infer; "
        f"{extra3:.3f} ms (3 classes) = {report['heatmap_extra_percent_of_infer']['3_classes']:.2f} %"
    )
    print(f"heatmap SC build (2000 x 2500 source): {sc_ms:.1f} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
