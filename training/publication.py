"""The small results of an experiment, kept apart from its checkpoints (issue 20).

A run folder holds checkpoints (``best.pt``, ``last.pt``: ~100 MB each, never committed) and small
results: ``run.json``, ``history.jsonl``, ``metrics.json``, ``predictions_*.csv`` and ``done.json``,
from which ``cxr-triage report`` builds every table.  :func:`publish` copies the small results of
the FINISHED runs (and the experiment's own ``experiment.json``, ``folds.json``, ``config.toml``)
into a results folder that is committed, so a finished run survives the machine it ran on;
:func:`restore` copies them back into an experiment folder, where ``--resume`` then skips those
runs (:func:`training.train.train_run` treats ``done.json`` + ``metrics.json`` as finished).
``cxr-triage train ... --results DIR`` does both: restore at the start, publish after each run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

__all__ = ["publish", "restore", "finished_runs", "RUN_FILES", "EXPERIMENT_FILES"]

log = logging.getLogger(__name__)

#: A finished run's small results (glob patterns, relative to the run folder).
RUN_FILES = ("run.json", "history.jsonl", "metrics.json", "done.json", "predictions_*.csv")
#: The experiment's own small files.
EXPERIMENT_FILES = ("experiment.json", "folds.json", "config.toml", "finished.json")


def finished_runs(root: str | Path) -> list[Path]:
    """Run folders below ``root`` (the experiment folder itself for a single run) with
    ``done.json`` and ``metrics.json``, relative to ``root``, sorted."""
    root = Path(root)
    return sorted(p.parent.relative_to(root) for p in root.rglob("done.json") if (p.parent / "metrics.json").is_file())


def _copy_small(src: Path, dst: Path, patterns: tuple[str, ...]) -> int:
    n = 0
    for pattern in patterns:
        for f in sorted(src.glob(pattern)):
            if f.is_file():
                dst.mkdir(parents=True, exist_ok=True)
                tmp = dst / f".{f.name}.tmp"
                shutil.copy2(f, tmp)
                tmp.replace(dst / f.name)  # a reader never sees half a file
                n += 1
    return n


def publish(experiment: str | Path, results: str | Path) -> list[Path]:
    """Copy the small results of every finished run of ``experiment`` (and its own small files)
    into ``results``, in the same layout; returns the runs copied.  Unfinished runs are left out:
    their history would be overwritten when they resume anyway."""
    experiment, results = Path(experiment), Path(results)
    _copy_small(experiment, results, EXPERIMENT_FILES)
    runs = finished_runs(experiment)
    for rel in runs:
        _copy_small(experiment / rel, results / rel, RUN_FILES)
    log.info("published %d finished run(s) of %s to %s", len(runs), experiment, results)
    return runs


def restore(results: str | Path, experiment: str | Path) -> list[Path]:
    """Copy finished runs from ``results`` into ``experiment`` where the experiment lacks them
    (a run the experiment has finished itself is kept as it is); returns the runs restored.
    The experiment's ``experiment.json`` is restored too when missing, so that ``--resume``
    checks the configuration against the one the published runs were made with."""
    results, experiment = Path(results), Path(experiment)
    if not results.is_dir():
        return []
    if not (experiment / "experiment.json").exists():
        _copy_small(results, experiment, ("experiment.json", "folds.json", "config.toml"))
    restored = []
    for rel in finished_runs(results):
        target = experiment / rel
        if (target / "done.json").exists() and (target / "metrics.json").exists():
            continue
        if target.exists():  # an unfinished copy (its checkpoints are of no use beside the finished run)
            for f in target.iterdir():
                if f.is_file():
                    f.unlink()
        _copy_small(results / rel, target, RUN_FILES)
        restored.append(rel)
    if restored:
        log.info("restored %d finished run(s) from %s into %s", len(restored), results, experiment)
    return restored
