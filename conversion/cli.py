"""``cxr-triage convert CHECKPOINT --out DIR [...]`` (dispatched here by ``worker.cli``).

Exit status: 0 accepted; 1 a gate was missed (one line per missed gate on stderr: gate name,
measured value, limit; the measured artefacts are kept in ``DIR.rejected``); 2 usage or input
error (bad arguments, missing checkpoint or manifest, non-empty ``--out``).  There is no way to
skip the gates.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _target(text: str) -> tuple[str, float]:
    cls, sep, val = text.partition("=")
    try:
        v = float(val)
    except ValueError:
        v = -1.0
    if not sep or not cls or not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected CLASS=SENSITIVITY with 0 < SENSITIVITY <= 1, got {text!r}")
    return cls, v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-triage", description="conversion stage (torch -> OpenVINO IR + model card)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint to a gated OpenVINO IR + model card")
    c.add_argument("checkpoint", help="training checkpoint (.pt, format cxr-triage-checkpoint/1)")
    c.add_argument("--out", required=True, help="output model directory (must be absent or empty)")
    c.add_argument("--fp32", action="store_true", help="save FP32 IR weights (default: FP16-compressed)")
    c.add_argument("--int8", nargs="?", const="ptq", choices=("ptq", "qat"), default=None, metavar="ptq|qat",
                   help="deploy an INT8 IR: ptq = NNCF post-training quantisation (the default of a bare --int8); "
                        "qat = quantisation-aware fine-tuning of the checkpoint (conversion/qat.py), PTQ reported beside it")
    c.add_argument("--int8-float", action="append", choices=("resnet", "mobilenet", "head"), default=[], metavar="PART",
                   help="PTQ mixed precision: keep this part of the hybrid in float (resnet, mobilenet, head; repeatable)")
    c.add_argument("--qat-epochs", type=int, default=2, metavar="N", help="QAT epochs (default 2)")
    c.add_argument("--qat-lr", type=float, default=1e-5, metavar="LR", help="QAT learning rate, Adam (default 1e-5)")
    c.add_argument("--qat-images", type=int, default=None, metavar="N",
                   help="QAT training images per epoch, a seeded random subset (default: the whole train split)")
    c.add_argument("--precision", choices=("f32", "bf16"), default=None,
                   help="worker precision for the float IR when deployed (default f32; bf16 is gated like INT8)")
    c.add_argument("--manifest", help="manifest CSV (default: the one in the checkpoint's training config)")
    c.add_argument("--calibration", type=int, default=300, metavar="N",
                   help="INT8 calibration images from the train split (default 300)")
    c.add_argument("--target", type=_target, action="append", metavar="CLASS=SENS",
                   help="threshold calibration target on the validation split, repeatable "
                        "(default covid19=0.95 pneumonia=0.90)")
    c.add_argument("--name", help="model name for the card (default cxr-<architecture>)")
    c.add_argument("--version", help="model version for the card (default 0.1.0)")
    c.add_argument("--no-accuracy-control", action="store_true",
                   help="do not fall back to accuracy-aware quantisation when plain INT8 misses its gate")
    c.add_argument("--log-level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("nncf", "openvino"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.calibration <= 0:
        print("cxr-triage convert: --calibration must be a positive number of images", file=sys.stderr)
        return 2

    try:
        from conversion.convert import ConvertOptions, convert_checkpoint
        from conversion.gates import GateError
        from conversion.metrics import DEFAULT_TARGETS
        from conversion.qat import QatOptions
    except ImportError as exc:
        print(f"cxr-triage convert: needs the training dependencies ({exc.name or exc}); "
              "install them with: pip install 'cxr-triage[train]'", file=sys.stderr)
        return 2

    try:
        qat = QatOptions(epochs=args.qat_epochs, lr=args.qat_lr, images_per_epoch=args.qat_images, calibration=args.calibration)
    except ValueError as exc:
        print(f"cxr-triage convert: {exc}", file=sys.stderr)
        return 2
    if args.int8_float and args.int8 != "ptq":
        print("cxr-triage convert: --int8-float needs --int8 ptq", file=sys.stderr)
        return 2
    if args.int8 != "qat" and (args.qat_epochs != 2 or args.qat_lr != 1e-5 or args.qat_images is not None):
        print("cxr-triage convert: --qat-epochs/--qat-lr/--qat-images need --int8 qat", file=sys.stderr)
        return 2
    opts = ConvertOptions(
        manifest=args.manifest, fp32=args.fp32, int8=args.int8 or False, precision=args.precision, qat=qat,
        int8_float=tuple(args.int8_float),
        calibration=args.calibration, name=args.name, version=args.version,
        targets=dict(args.target) if args.target else dict(DEFAULT_TARGETS),
        accuracy_control=not args.no_accuracy_control,
    )
    try:
        result = convert_checkpoint(args.checkpoint, args.out, opts)
    except GateError as exc:
        print(f"cxr-triage convert: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as exc:
        print(f"cxr-triage convert: {exc}", file=sys.stderr)
        return 2
    for g in result.gates:
        print(g.line())
    print(f"accepted: {result.out_dir} (precision {result.precision}); card {result.out_dir / 'model.json'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
