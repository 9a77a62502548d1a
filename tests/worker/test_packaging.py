"""The edge worker's install boundary: no torch, one console script, migrations shipped."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

from support import REPO

WORKER_MODULES = [
    "worker.cli", "worker.settings", "worker.listener", "worker.spool", "worker.jobs", "worker.imaging",
    "worker.filters", "worker.modelcard", "worker.engine", "worker.pipeline", "worker.scheduler", "worker.node",
    "worker.toymodel", "worker.results", "worker.sender",
]


def test_filter_and_results_agree_on_own_markers() -> None:
    from worker import filters, results

    assert filters.OWN_SERIES_DESCRIPTION == results.SERIES_DESCRIPTION
    assert filters.OWN_MANUFACTURER == results.MANUFACTURER


def test_worker_never_imports_torch() -> None:
    code = (
        "import sys, importlib\n"
        f"for m in {WORKER_MODULES!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'torchvision', 'timm', 'nncf'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == ""


def test_listener_only_process_does_not_load_openvino() -> None:
    code = "import sys, worker.node, worker.cli; print('openvino' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_migrations_are_package_data() -> None:
    versions = resources.files("worker") / "migrations" / "versions"
    assert any(p.name.startswith("0001") for p in versions.iterdir())
    assert (resources.files("worker") / "migrations" / "env.py").is_file()


def test_no_module_named_after_the_standard_library() -> None:
    names = {p.stem for p in (REPO / "worker").glob("*.py")}
    assert not names & set(sys.stdlib_module_names)
