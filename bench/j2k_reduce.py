"""Does reduced-resolution JPEG 2000 decoding change what the model says? (table + JSON)

    .venv/bin/python bench/j2k_reduce.py [--model DIR] [--n 120] [--side 2048]

Test-split images of ``../shared/data/cxr`` are scaled up to ``side`` px (bicubic), stored as
12-bit JPEG 2000 lossless CR, and screened twice through the worker's own path
(``worker.imaging.preprocess`` + ``worker.engine.Engine``): full decode, and decode at the
smallest resolution level that covers the model input (``PreprocessSpec.j2k_reduce``, the
default). Reported: top-1 agreement, probability differences, priority agreement, decode +
preprocess time of both. Caveat: upscaled 256 px images carry no detail finer than the original
pixels, so they are smoother than a detector's; the real-DICOM check in
``tests/worker/test_imaging.py`` bounds the pixel difference on sharp content.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from worker import imaging  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.modelcard import default_model_dir, triage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from worker.testing.dicom import make_image

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--manifest", type=Path, default=REPO.parent / "shared" / "data" / "cxr" / "manifest.csv")
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--side", type=int, default=2048)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "j2k_reduce.json")
    a = p.parse_args(argv)
    rows = [r for r in csv.DictReader(a.manifest.open()) if r["split"] == "test"]
    rows = sorted(rows, key=lambda r: r["file"])[:: max(1, len(rows) // a.n)][: a.n]
    engine = Engine(a.model)
    card = engine.card
    spec = imaging.PreprocessSpec.from_card(card.raw)
    full_spec = dataclasses.replace(spec, j2k_reduce=False)
    agree = prio_agree = 0
    dmax, dmean, t_full, t_red = [], [], [], []
    for r in rows:
        grey = Image.open(a.manifest.parent / r["file"]).convert("L").resize((a.side, a.side), Image.Resampling.BICUBIC)
        pix = np.rint(np.asarray(grey, dtype=np.float64) * 4095 / 255).astype(np.uint16)
        ds = make_image(pix, stored=12, window=(2048, 4096))
        ds.compress(JPEG2000Lossless)
        t0 = time.perf_counter()
        x_full = imaging.preprocess(ds, full_spec)
        t1 = time.perf_counter()
        x_red = imaging.preprocess(ds, spec)
        t2 = time.perf_counter()
        t_full.append((t1 - t0) * 1e3)
        t_red.append((t2 - t1) * 1e3)
        pf, pr = engine.probabilities(np.stack([x_full, x_red]))
        agree += max(pf, key=pf.get) == max(pr, key=pr.get)
        prio_agree += triage(pf, card).priority == triage(pr, card).priority
        d = np.abs(np.array([pf[c] - pr[c] for c in card.classes]))
        dmax.append(float(d.max()))
        dmean.append(float(d.mean()))
    n = len(rows)
    out = {
        "model": f"{card.name} {card.version} ({engine.precision})", "n": n, "side": a.side,
        "top1_agreement": round(agree / n, 4), "priority_agreement": round(prio_agree / n, 4),
        "prob_diff_max": round(max(dmax), 4), "prob_diff_mean": round(statistics.mean(dmean), 5),
        "decode_preprocess_ms_full_median": round(statistics.median(t_full), 1),
        "decode_preprocess_ms_reduced_median": round(statistics.median(t_red), 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    for k, v in out.items():
        print(f"{k:<38} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
