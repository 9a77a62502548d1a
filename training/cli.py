"""``cxr-triage train | evaluate | report`` (dispatched here by ``worker.cli`` with argv[0] the subcommand).

    cxr-triage train --config training/configs/paper-3class.toml [--mode cv] [--set train.epochs=5 ...] --out runs/paper-3class
    cxr-triage train --config training/configs/paper-3class.toml --out runs/paper-3class --resume   # after an interruption
    cxr-triage train --config C --out runs/x --results docs/results/x/runs   # restore + publish small results (another machine)
    cxr-triage evaluate runs/paper-3class                       # metrics + plots for every run found below
    cxr-triage evaluate --checkpoint runs/x/best.pt --manifest M [--split test] --out DIR
    cxr-triage report runs/paper-3class [more experiment folders] --out docs/results/paper-3class
    cxr-triage compare runs/a runs/b --manifest M --out docs/results/x   # single-split runs side by side
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-triage", description="training stage: train, evaluate, report")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (or the cv protocol) from a manifest")
    t.add_argument("--config", help="TOML experiment config (defaults: the paper's recipe)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.lr=3e-4 (repeatable)")
    t.add_argument("--mode", choices=("single", "cv"), help="= --set experiment.mode=...")
    t.add_argument("--models", help="comma-separated, = --set experiment.models=[...]")
    t.add_argument("--out", required=True, help="experiment folder")
    t.add_argument("--results", metavar="DIR",
                   help="published small results (committed): finished runs there are restored into --out and skipped, "
                        "each run's small results are copied there when it finishes (implies --resume)")
    t.add_argument("--resume", action="store_true",
                   help="continue the experiment in --out: finished runs are skipped, an interrupted one goes on after its last finished epoch")

    e = sub.add_parser("evaluate", help="metrics and plots for runs, or a checkpoint on a manifest split")
    e.add_argument("paths", nargs="*", help="experiment or run folders (every run below is evaluated)")
    e.add_argument("--checkpoint", help="evaluate this checkpoint instead")
    e.add_argument("--manifest", help="with --checkpoint: the manifest")
    e.add_argument("--split", default="test", help="with --checkpoint: split value to evaluate ('' = all rows)")
    e.add_argument("--label", help="with --checkpoint: label column (default from the checkpoint's config)")
    e.add_argument("--out", help="with --checkpoint: output folder")
    e.add_argument("--no-plots", action="store_true")

    r = sub.add_parser("report", help="Markdown report with the paper's tables from experiment folders")
    r.add_argument("paths", nargs="+", help="experiment folders")
    r.add_argument("--out", required=True, help="report folder (report.md, tables, PNGs)")
    r.add_argument("--title", default="")
    r.add_argument("--label", default="", help="a line under the title (e.g. REDUCED CPU SETTINGS)")
    c = sub.add_parser("compare", help="single-split runs side by side: cost, validation, test per age group and source")
    c.add_argument("paths", nargs="+", help="finished run folders (each with run.json, metrics.json, predictions_test.csv)")
    c.add_argument("--manifest", required=True, help="the manifest the runs used (for the source of each test image)")
    c.add_argument("--out", required=True, help="folder for compare.md and compare.json")
    c.add_argument("--names", default="", help="comma-separated column names (default: the folder names)")
    c.add_argument("--title", default="Comparison")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            from .config import ConfigError, load_config
            from .train import run_experiment

            overrides = list(args.overrides)
            if args.mode:
                overrides.append(f"experiment.mode={args.mode}")
            if args.models:
                overrides.append("experiment.models=[" + ",".join(f'"{m.strip()}"' for m in args.models.split(",")) + "]")
            try:
                cfg = load_config(args.config, overrides)
            except ConfigError as exc:
                print(f"cxr-triage train: configuration error: {exc}", file=sys.stderr)
                return 2
            from .train import ExperimentExists

            try:
                run_experiment(cfg, args.out, command="cxr-triage " + " ".join(shlex.quote(a) for a in argv), resume=args.resume,
                               results=args.results)
            except ExperimentExists as exc:
                print(f"cxr-triage train: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "evaluate":
            from .evaluate import evaluate_checkpoint, evaluate_paths

            if args.checkpoint:
                if not args.manifest or not args.out:
                    print("cxr-triage evaluate: --checkpoint needs --manifest and --out", file=sys.stderr)
                    return 2
                evaluate_checkpoint(args.checkpoint, args.manifest, args.out, split=args.split, label=args.label, plots=not args.no_plots)
                return 0
            if not args.paths:
                print("cxr-triage evaluate: give experiment folders or --checkpoint", file=sys.stderr)
                return 2
            n = evaluate_paths(args.paths, plots=not args.no_plots)
            print(f"evaluated {n} runs")
            return 0 if n else 1
        if args.command == "compare":
            from .compare import write_comparison

            names = [n.strip() for n in args.names.split(",") if n.strip()]
            if names and len(names) != len(args.paths):
                print("cxr-triage compare: --names needs one name per run folder", file=sys.stderr)
                return 2
            print(write_comparison(args.paths, args.manifest, args.out, title=args.title, names=names))
            return 0
        if args.command == "report":
            from .report import write_report

            path = write_report(args.paths, args.out, title=args.title, label=args.label, command="cxr-triage " + " ".join(shlex.quote(a) for a in argv))
            print(path)
            return 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"cxr-triage {args.command}: {exc}", file=sys.stderr)
        return 1
    return 2
