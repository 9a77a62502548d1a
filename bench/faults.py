"""The long fault run: storescu sends while the node is SIGKILLed >= 50 times (issue 7).

    python bench/faults.py --studies 120 --kills 60 [--seed 1] [--deadline-s 1800] [--out bench/out/faults.json]

Needs dcmtk (storescu) and Orthanc. The harness is tests/reliability/faultrun.py (the short
run in CI uses the same code). Prints the counts and writes them as JSON; exit status 0 only
when nothing was lost, duplicated, left running or undelivered.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The one path edit left in bench/: the fault harness is part of the reliability tests (it reads the
# node's SQLite file with raw SQL to check invariants), so it lives in tests/reliability, not in the
# shipped package, and tests/ is not a package. pytest finds it through [tool.pytest] pythonpath.
sys.path.insert(0, str(REPO / "tests" / "reliability"))

import faultrun  # noqa: E402


def _stop(signum: int, _frame: object) -> None:
    # SIGTERM: leave through the harness's finally blocks, which stop the node and Orthanc.
    raise SystemExit(f"stopped by signal {signum}")


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=120)
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-up", type=float, default=0.3, help="shortest time the node runs between kills (s)")
    ap.add_argument("--max-up", type=float, default=3.0, help="longest time the node runs between kills (s)")
    ap.add_argument("--deadline-s", type=float, default=None, help="stop killing after this long (then verify)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "faults.json")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cxr-faults-"))
    print(f"fault run in {work}: {args.studies} studies, {args.kills} kills, seed {args.seed}", flush=True)
    c = faultrun.run(work, studies=args.studies, kills=args.kills, seed=args.seed, min_up=args.min_up,
                     max_up=args.max_up, deadline_s=args.deadline_s, say=lambda s: print(s, flush=True))
    print("| sent | acknowledged | screened | delivered | duplicates | lost | kills | phases | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {c.sent} | {c.acknowledged}/{c.instances} | {c.screened} | {c.delivered} | {c.duplicates} | {c.lost} "
          f"| {c.kills} | {c.kill_phases} | {c.seconds:.0f} |")
    print(c.line())
    for p in c.problems[:20]:
        print("problem:", p)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**dataclasses.asdict(c), "ok": c.ok(), "seed": args.seed,
                                    "kills_requested": args.kills}, indent=2))
    print("OK" if c.ok() else "FAILED", flush=True)
    return 0 if c.ok() else 1


if __name__ == "__main__":
    raise SystemExit(main())
