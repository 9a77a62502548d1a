"""Shortcut attention: where a converted model looks, measured over a whole split (issue 17).

This data set invites shortcut learning: every COVID-19 image is an adult's, most normal and
pneumonia images are children's, and many COVID-19 images come from publications with arrows,
labels and burned-in text, mostly near the top and bottom edges.  A model that reads those
instead of the lungs can score well and still be useless.  This report puts numbers on it,
from the deployed model itself (the worker's Engine and Grad-CAM, :mod:`worker.heatmap`):

* per image, the Grad-CAM of the PREDICTED class (what the answer rests on), and three shares of
  its mass (the heatmap normalised to sum 1 over the 224 x 224 input):

  - ``outside``: outside the central chest region, the box rows 12.5-87.5 %, columns 15-85 % of
    the model's (centre-square) input.  A crude fixed proxy for "the lungs", not a segmentation:
    on a well-framed PA chest film the lung fields lie inside it, shoulders, neck, abdomen and
    the film's margins outside.  A uniform heatmap has ``outside`` = 0.478 at 224 px.
  - ``top`` / ``bottom``: in the top and bottom 12.5 % bands, where burned-in text, markers and
    publication labels sit (uniform: 0.125 each);

* means of those shares per true class and per source collection, beside the **source check**
  (AUROC of P(covid19) for adults vs children among the non-COVID test images, the number
  ``training.compare`` reports: near 0.5 means the COVID-19 score does not tell age apart);
* mean heatmaps per class and per source collection (``mean_heatmaps.png``);
* a montage of the images with the largest ``outside`` share, heatmap over the input
  (``montage_outside.png``): the model's worst habits, for a person to look at.

Run it on any model directory with heatmap outputs::

    python -m conversion.attention MODEL_DIR --manifest CSV --out DIR [--split test] [--limit N]

``cxr-triage convert`` runs it on the deployed model of every conversion whose IR has heatmap
outputs, into ``OUT/attention/`` (and its summary into ``conversion.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

__all__ = ["CENTRAL", "BAND", "attention_report", "main", "redistributable", "region_shares"]

#: Central chest region: (row start, row end, column start, column end) as fractions of the input.
CENTRAL = (0.125, 0.875, 0.15, 0.85)
#: Height of the top and bottom text bands, as a fraction of the input.
BAND = 0.125
_TILE = 112  # px per tile in the PNG figures
_GRID = 56  # resolution the per-image heatmaps are kept at for the figures


def redistributable(licence: str | None) -> bool:
    """A manifest ``license`` that allows redistribution with credit (the samples' rule,
    samples/README.md): CC BY (any version), CC0 / public-domain-like ("no restriction"); never
    NC, ND, unknown or empty."""
    text = (licence or "").strip().lower()
    if not text or "unknown" in text or "-nc" in text or "-nd" in text or " nc" in text or " nd" in text:
        return False
    return text.startswith("cc by") or text.startswith("cc0") or "no restriction" in text


def region_shares(cam: np.ndarray) -> dict[str, float]:
    """``outside`` / ``top`` / ``bottom`` shares of the mass of one ``(H, W)`` heatmap (see the
    module docstring); NaN for a heatmap without mass."""
    c = np.asarray(cam, dtype=np.float64)
    total = c.sum()
    if not total > 0:
        return {"outside": float("nan"), "top": float("nan"), "bottom": float("nan")}
    h, w = c.shape
    r0, r1 = round(CENTRAL[0] * h), round(CENTRAL[1] * h)
    c0, c1 = round(CENTRAL[2] * w), round(CENTRAL[3] * w)
    band = round(BAND * h)
    return {
        "outside": float(1.0 - c[r0:r1, c0:c1].sum() / total),
        "top": float(c[:band].sum() / total),
        "bottom": float(c[h - band :].sum() / total),
    }


def _auroc(pos: np.ndarray, score: np.ndarray) -> float | None:
    """Mann-Whitney AUROC (ties count half); None without both groups."""
    pos = np.asarray(pos, bool)
    if pos.all() or not pos.any():
        return None
    s = np.asarray(score, np.float64)
    p, n = s[pos], s[~pos]
    greater = (p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()
    return float(greater / (p.size * n.size))


def _group_table(keys: Sequence[str], shares: list[dict[str, float]], extra: Mapping[str, Sequence[bool]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in sorted(set(keys)):
        idx = [i for i, kk in enumerate(keys) if kk == k]
        row: dict[str, Any] = {"n": len(idx)}
        for m in ("outside", "top", "bottom"):
            v = np.array([shares[i][m] for i in idx], dtype=np.float64)
            row[m] = float(np.nanmean(v)) if np.isfinite(v).any() else None
        row["bands"] = None if row["top"] is None else row["top"] + row["bottom"]
        for name, flags in (extra or {}).items():
            row[name] = float(np.mean([flags[i] for i in idx]))
        out[k] = row
    return out


def _colour(heat: np.ndarray) -> np.ndarray:
    from worker.overlay import colour_table

    h = np.clip(heat, 0.0, 1.0)
    return colour_table()[(h * 255).round().astype(np.uint8)]


def _font() -> Any:
    loader = getattr(ImageFont, "load_default_imagefont", None)
    return loader() if loader is not None else ImageFont.load_default()


def _tile(rgb: np.ndarray, caption: Sequence[str]) -> Image.Image:
    img = Image.fromarray(rgb).resize((_TILE, _TILE), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (_TILE, _TILE + 12 * len(caption)), (0, 0, 0))
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(caption):
        d.text((1, _TILE + 12 * i), line[:20], fill=(255, 255, 255), font=_font())
    return canvas


def _grid(tiles: Sequence[Image.Image], cols: int) -> Image.Image:
    rows = (len(tiles) + cols - 1) // cols
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    out = Image.new("RGB", (cols * tw, rows * th), (0, 0, 0))
    for i, t in enumerate(tiles):
        out.paste(t, ((i % cols) * tw, (i // cols) * th))
    return out


def _frame_overlay(sq: np.ndarray) -> np.ndarray:
    """Draw the central region's outline and the band limits onto a (S, S, 3) tile, in white."""
    s = sq.shape[0]
    out = sq.copy()
    r0, r1 = round(CENTRAL[0] * s), round(CENTRAL[1] * s) - 1
    c0, c1 = round(CENTRAL[2] * s), round(CENTRAL[3] * s) - 1
    out[[r0, r1], c0 : c1 + 1] = 255
    out[r0 : r1 + 1, [c0, c1]] = 255
    return out


def attention_report(
    model_dir: str | os.PathLike[str], manifest: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
    split: str = "test", limit: int | None = None, montage: int = 16, precision: str | None = None, seed: int = 0,
    all_licences: bool = False,
) -> dict[str, Any]:
    """Measure, write ``attention.json``, ``attention.md``, ``mean_heatmaps.png`` and
    ``montage_outside.png`` into ``out_dir``; returns the JSON's content.

    The montage shows the pixels of the images with the largest ``outside`` share among those
    whose manifest licence allows redistribution (:func:`redistributable`; a manifest without a
    ``license`` column counts as allowed), so the figure can be committed; ``all_licences`` drops
    that rule (for a local look only).  The table of the worst images names every image."""
    from conversion.data import load_split, read_manifest
    from worker import heatmap
    from worker.engine import Engine
    from worker.imaging import PreprocessSpec

    t0 = time.perf_counter()
    engine = Engine(Path(model_dir), precision=precision)
    if engine.heatmap is None:
        raise RuntimeError(f"{model_dir}: {engine.heatmap_unavailable}")
    card = engine.card
    classes = list(card.classes)
    spec = PreprocessSpec.from_card(card.raw)
    rows = read_manifest(Path(manifest))
    data = load_split(Path(manifest), split, classes, spec, limit=limit, seed=seed, rows=rows)
    source_of = {r["file"]: r.get("source") or "unknown" for r in rows}
    licence_ok = {r["file"]: all_licences or "license" not in r or redistributable(r.get("license")) for r in rows}
    sources = [source_of.get(f, "unknown") for f in data.files]
    size = spec.size
    probs_all: list[np.ndarray] = []
    shares: list[dict[str, float]] = []
    small: list[np.ndarray] = []
    for i in range(0, len(data), 16):
        p, maps = engine.infer_maps(data.x[i : i + 16])
        for row, m in zip(p, maps, strict=True):
            cam = heatmap.gradcam(engine.heatmap, m, [int(row.argmax())], size)[0]
            shares.append(region_shares(cam))
            small.append(np.asarray(Image.fromarray(cam).resize((_GRID, _GRID), Image.Resampling.BOX)))
        probs_all.append(p)
    probs = np.concatenate(probs_all)
    pred = probs.argmax(1)
    true_names = [classes[int(t)] for t in data.y]
    correct = [bool(a == b) for a, b in zip(pred, data.y, strict=True)]
    by_class = _group_table(true_names, shares, {"accuracy": correct})
    by_source = _group_table(sources, shares, {"accuracy": correct})
    by_age = _group_table(list(data.age_groups), shares, {"accuracy": correct})
    overall = _group_table(["all"] * len(shares), shares, {"accuracy": correct})["all"]
    source_check = None
    if "covid19" in classes:
        k = classes.index("covid19")
        keep = np.array([t != k and g in ("adult", "child") for t, g in zip(data.y, data.age_groups, strict=True)])
        if keep.any():
            adult = np.array([g == "adult" for g in data.age_groups])[keep]
            source_check = _auroc(adult, probs[keep, k])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cams = np.stack(small)
    # mean heatmaps: per true class, then per source (each tile normalised to its own maximum)
    tiles = []
    for label, keys in (("class", true_names), ("source", sources)):
        for key in sorted(set(keys)):
            idx = [i for i, kk in enumerate(keys) if kk == key]
            mean = cams[idx].mean(axis=0)
            mean = mean / mean.max() if mean.max() > 0 else mean
            name = key.split("/")[-1]
            tiles.append(_tile(_frame_overlay(_colour(mean)), [f"{label}: {name}", f"n={len(idx)}"]))
    _grid(tiles, 4).quantize(256, dither=Image.Dither.NONE).save(out / "mean_heatmaps.png", optimize=True)
    # montage: largest outside share
    outside = np.array([s["outside"] for s in shares], dtype=np.float64)
    ranked = [int(i) for i in np.argsort(np.nan_to_num(outside, nan=-1.0))[::-1]]
    order = ranked[:montage]  # the table: the worst, whatever their licence
    shown = [i for i in ranked if licence_ok.get(data.files[i], True)][:montage]
    mean_c = np.asarray(spec.mean, np.float32)[0]
    std_c = np.asarray(spec.std, np.float32)[0]
    from worker.overlay import colourize

    mtiles = []
    worst = [{"file": data.files[i], "source": sources[i], "label": true_names[i],
              "predicted": classes[int(pred[i])], "in_montage": i in shown,
              **{k: (round(v, 4) if np.isfinite(v) else None) for k, v in shares[i].items()}} for i in order]
    for i in shown:
        grey = np.clip((data.x[i, 0] * std_c + mean_c) * 255.0, 0, 255).astype(np.uint8)
        heat = np.asarray(Image.fromarray(cams[i]).resize(grey.shape[::-1], Image.Resampling.BILINEAR))
        rgb = _frame_overlay(colourize(grey, heat))
        name = sources[i].split("/")[-1]
        mtiles.append(_tile(rgb, [name[:20], f"{true_names[i]}->{classes[int(pred[i])]}", f"out {outside[i]:.2f}"]))
    if mtiles:
        _grid(mtiles, 4).quantize(256, dither=Image.Dither.NONE).save(out / "montage_outside.png", optimize=True)

    report = {
        "model": {"dir": str(model_dir), "name": card.name, "version": card.version, "precision": engine.precision},
        "split": split, "n": len(shares), "manifest": str(manifest),
        "method": "Grad-CAM of the predicted class (worker.heatmap), mass shares",
        "regions": {"central": {"rows": [CENTRAL[0], CENTRAL[1]], "cols": [CENTRAL[2], CENTRAL[3]]}, "band": BAND,
                    "uniform_heatmap": region_shares(np.ones(size))},
        "overall": overall, "by_class": by_class, "by_source": by_source, "by_age_group": by_age,
        "source_check_auroc": source_check,
        "largest_outside": worst,
        "montage": {"images": [data.files[i] for i in shown],
                    "licences": "all" if all_licences else "redistributable only (CC BY, CC0 / no restriction)"},
        "figures": {"mean_heatmaps": "mean_heatmaps.png", "montage": "montage_outside.png" if mtiles else None},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "attention.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "attention.md").write_text(markdown(report) + "\n")
    log.info("attention report: %d %s images, outside share %.3f, bands %.3f, source check %s -> %s",
             len(shares), split, overall["outside"] or float("nan"), overall["bands"] or float("nan"),
             "n/a" if source_check is None else f"{source_check:.3f}", out)
    return report


def _pct(v: Any) -> str:
    return "-" if v is None or not np.isfinite(float(v)) else f"{100 * float(v):.1f}"


def markdown(report: Mapping[str, Any]) -> str:
    """The report's tables, for a README or the model card."""
    u = report["regions"]["uniform_heatmap"]
    lines = [
        f"## Shortcut attention: {report['model']['name']} {report['model']['version']} ({report['model']['precision']}), "
        f"{report['split']} split, n = {report['n']}",
        "",
        "Share of the predicted class's Grad-CAM mass (%) outside the central chest region (rows 12.5-87.5 %, "
        "columns 15-85 % of the input) and in the top / bottom 12.5 % bands where burned-in text sits. "
        f"A uniform heatmap gives {_pct(u['outside'])} / {_pct(u['top'])} / {_pct(u['bottom'])}.",
        "",
        "Source check (AUROC of P(covid19), adults vs children, non-COVID images; near 0.5 = age not told apart): "
        + ("-" if report["source_check_auroc"] is None else f"{report['source_check_auroc']:.3f}"),
        "",
        "| group | n | accuracy % | outside % | top band % | bottom band % |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    def row(name: str, r: Mapping[str, Any]) -> str:
        return f"| {name} | {r['n']} | {_pct(r.get('accuracy'))} | {_pct(r['outside'])} | {_pct(r['top'])} | {_pct(r['bottom'])} |"

    lines.append(row("all", report["overall"]))
    for title, key in (("class", "by_class"), ("source", "by_source"), ("age group", "by_age_group")):
        for name, r in report[key].items():
            lines.append(row(f"{title}: {name}", r))
    lines += ["", f"Largest outside share ({len(report['largest_outside'])} images; `montage_outside.png` shows the "
              f"{len(report['montage']['images'])} largest whose licence is {report['montage']['licences']}):", "",
              "| file | source | label -> predicted | outside % | top % | bottom % | in montage |",
              "|---|---|---|---:|---:|---:|---|"]
    for w in report["largest_outside"]:
        lines.append(f"| {w['file']} | {w['source']} | {w['label']} -> {w['predicted']} | {_pct(w['outside'])} | "
                     f"{_pct(w['top'])} | {_pct(w['bottom'])} | {'yes' if w['in_montage'] else 'no'} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m conversion.attention", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model directory with heatmap outputs")
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--out", required=True, help="folder for attention.json/.md and the PNG figures")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="a stratified subset (smoke runs only)")
    ap.add_argument("--montage", type=int, default=16)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--all-licences", action="store_true",
                    help="montage from every image, whatever its licence (a local look; do not commit it)")
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        attention_report(args.model, args.manifest, args.out, split=args.split, limit=args.limit,
                         montage=args.montage, precision=args.precision, all_licences=args.all_licences)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
