"""The edge worker's install boundary: no torch, one console script, migrations shipped."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

from support import REPO

WORKER_MODULES = [
    "worker.cli", "worker.settings", "worker.listener", "worker.spool", "worker.store", "worker.imaging", "worker.validation",
    "worker.filters", "worker.modelcard", "worker.engine", "worker.pipeline", "worker.scheduler", "worker.node",
    "worker.testing.toymodel", "worker.results", "worker.sender", "worker.demo", "worker.priority", "worker.hl7",
    "worker.fhir", "worker.worklist", "worker.web", "worker.web.pages", "worker.web.auth", "worker.preflight", "worker.logs",
    "worker.modelsummary", "worker.retention", "worker.commandline", "worker.maintenance", "worker.heatmap", "worker.overlay",
]


def test_license_file_matches_pyproject() -> None:
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text


def test_changelog_names_the_current_version() -> None:
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    text = (REPO / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog") and f"## {version} (" in text


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
    names = {p.stem for p in (REPO / "worker").rglob("*.py")}
    assert not names & set(sys.stdlib_module_names)


def test_nothing_shipped_imports_the_test_support() -> None:
    """worker.testing (DICOM builders, SCU, toy model, Orthanc) is for tests and bench/ only."""
    offenders = [
        str(p.relative_to(REPO)) for p in (REPO / "worker").rglob("*.py")
        if "testing" not in p.relative_to(REPO / "worker").parts
        and ("worker.testing" in (text := p.read_text()) or "from worker import testing" in text)
    ]
    assert offenders == []


def test_no_worker_module_is_over_600_lines() -> None:
    """House style: one concept per module, none over about 600 lines (issue 15)."""
    long = {str(p.relative_to(REPO)): n for p in (REPO / "worker").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}


def test_the_wheel_carries_the_default_model_and_no_samples(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``pip install`` must bring the default model (issue 6): build the wheel from a copy of the tree."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    for pkg in ("worker", "training", "conversion"):
        shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
         str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "dist").glob("cxr_triage-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("model.xml", "model.bin", "model.json"):
        assert f"worker/default_model/{f}" in names
    assert "worker/migrations/versions/0001_initial.py" in names or any("migrations/versions/0001" in n for n in names)
    assert not any(n.startswith("samples/") or n.endswith(".dcm") for n in names)
    assert {"worker/web/templates/worklist.html", "worker/web/templates/_rows.html", "worker/web/worklist.js"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # PEP 639: the licence travels
