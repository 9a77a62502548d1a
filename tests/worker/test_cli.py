"""The ``cxr-triage`` command as an operator uses it: a real process, dcmtk as the independent client."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import CT_STORAGE, free_port, make_image, wait_for

from worker import cli
from worker.settings import Settings

needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk (storescu, echoscu) is not installed")


def _query(data_dir: Path, *extra: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "query", "--data-dir", str(data_dir), "--format", "json", *extra],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout)


@pytest.fixture
def served(tmp_path: Path, toy_model: Path) -> Iterator[tuple[subprocess.Popen, int, Path]]:
    """``cxr-triage serve`` in its own process, configured by flags and environment."""
    port, data_dir = free_port(), tmp_path / "var"
    env = {
        **os.environ,
        "CXR_TRIAGE_LISTENER_BIND_ADDRESS": "127.0.0.1",
        "CXR_TRIAGE_LISTENER_ALLOWED_CALLING_AETS": "STORESCU,ECHOSCU,MODALITY",
        "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0",
        "CXR_TRIAGE_BATCH_POLL_SECONDS": "0.2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
         "--model", str(toy_model), "--ae-title", "TRIAGE1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_for(lambda: _echo(port) == 0 or proc.poll() is not None, timeout=60), "node did not start"
        assert proc.poll() is None, proc.stderr.read()
        yield proc, port, data_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _echo(port: int, aet: str = "ECHOSCU", called: str = "TRIAGE1") -> int:
    if shutil.which("echoscu"):
        return subprocess.run(["echoscu", "-aet", aet, "-aec", called, "127.0.0.1", str(port)], capture_output=True).returncode
    from support import echo

    return 0 if echo(port, calling=aet, called=called) == 0 else 1


@needs_dcmtk
def test_serve_screens_what_storescu_sends_and_stops_cleanly(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    proc, port, data_dir = served
    files = []
    for i in range(4):
        p = tmp_path / f"img{i}.dcm"
        make_image(rows=300, cols=250, seed=i).save_as(p, enforce_file_format=True)
        files.append(p)
    ct = tmp_path / "ct.dcm"
    make_image(sop_class=CT_STORAGE, modality="CT").save_as(ct, enforce_file_format=True)
    r = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "TRIAGE1", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the CT is refused per object with 0x0122; storescu reports it and exits non-zero
    r = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "TRIAGE1", "127.0.0.1", str(port), str(ct)],
                       capture_output=True, text=True)
    assert "0122" in r.stdout + r.stderr or r.returncode != 0
    # a calling AE title that is not allowed cannot associate
    r = subprocess.run(["storescu", "-aet", "INTRUDER", "-aec", "TRIAGE1", "127.0.0.1", str(port), str(files[0])],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert _echo(port) == 0

    assert wait_for(lambda: [x["state"] for x in _query(data_dir)] == ["done"] * 4, timeout=60)
    rows = _query(data_dir)
    for row in rows:
        assert row["model_name"] == "toy" and row["priority"] in {"urgent", "routine"}
        assert set(row["probabilities"]) == {"normal", "pneumonia", "covid19"}
        assert row["received_at"].endswith("Z") and row["finished_at"].endswith("Z")
    events = _query(data_dir, "--events")
    kinds = sorted(e["kind"] for e in events)
    assert kinds == ["association_rejected", "refused"]
    assert any(e["status"] == "0x0122" for e in events)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_query_filters_and_formats(served, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    from support import send

    proc, port, data_dir = served
    dss = [make_image(rows=64, cols=64, seed=i) for i in range(3)]
    dss[0].AccessionNumber = "ACC-X"
    assert send(dss, port, calling="MODALITY", called="TRIAGE1") == [0, 0, 0]
    assert wait_for(lambda: [x["state"] for x in _query(data_dir)] == ["done"] * 3, timeout=60)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)

    rows = _query(data_dir, "--accession", "ACC-X")
    assert [r["sop_instance_uid"] for r in rows] == [dss[0].SOPInstanceUID]
    cls = rows[0]["predicted_class"]
    assert all(r["predicted_class"] == cls for r in _query(data_dir, "--class", cls))
    assert _query(data_dir, "--min-probability", "1.0") == []  # softmax of the toy model: never exactly 1
    assert len(_query(data_dir, "--min-probability", "0")) == 3
    assert len(_query(data_dir, "--since", "2000-01-01")) == 3
    assert _query(data_dir, "--until", "2000-01-01") == []
    assert len(_query(data_dir, "--state", "done", "--state", "queued")) == 3

    assert cli.main(["query", "--data-dir", str(data_dir), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("sop_instance_uid,") and "p_covid19" in lines[0] and len(lines) == 4
    assert cli.main(["query", "--data-dir", str(data_dir)]) == 0
    assert "(3 rows)" in capsys.readouterr().out
    assert cli.main(["status", "--data-dir", str(data_dir), "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"]["done"] == 3 and status["oldest_waiting"] is None


def test_serve_without_any_model_says_what_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import modelcard

    monkeypatch.setattr(modelcard, "DEFAULT_MODEL_DIR", tmp_path / "no-default-model")  # an install without one
    rc = cli.main(["serve", "--data-dir", str(tmp_path), "--port", str(free_port())])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.path is not set" in err and "no default model" in err and "--model DIR" in err


def test_no_model_configured_means_the_packaged_default(settings: Settings) -> None:
    from worker.modelcard import default_model_dir
    from worker.node import load_engine

    assert settings.model.path is None
    engine = load_engine(settings)
    assert engine.card.card_path is not None and engine.card.card_path.parent == default_model_dir()


def test_bad_model_dir_and_bad_setting_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["batch", "--once", "--data-dir", str(tmp_path), "--model", str(tmp_path / "none")]) == 2
    assert "model" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "99999", "--model", str(tmp_path)]) == 2
    assert "listener.port" in capsys.readouterr().err


def test_batch_once_drains_a_queue_filled_by_a_listener_only_node(tmp_path: Path, toy_model: Path) -> None:
    from support import send

    from worker.node import Node
    from worker.settings import load_settings

    data_dir, port = tmp_path / "var", free_port()
    s = load_settings(None, {"storage.data_dir": str(data_dir), "listener.port": port,
                             "listener.bind_address": "127.0.0.1", "storage.disk_reserve_mb": 0}, environ={})
    n = Node(s, batch=False)  # `serve --no-batch`: no model needed
    n.start()
    try:
        assert send([make_image(rows=64, cols=64, seed=i) for i in range(5)], n.port) == [0] * 5
    finally:
        n.stop()
    assert cli.main(["batch", "--once", "--data-dir", str(data_dir), "--model", str(toy_model)]) == 0
    assert [r["state"] for r in _query(data_dir)] == ["done"] * 5
    assert cli.main(["migrate", "--data-dir", str(data_dir)]) == 0


def test_upstream_commands_are_dispatched_lazily(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`cxr-triage train|evaluate|report|convert` go to their stage's CLI; a missing extra is a clear error."""
    import builtins

    real_import = builtins.__import__

    def no_training(name: str, *a, **k):  # type: ignore[no-untyped-def]
        if name.startswith(("training.cli", "conversion.cli")):
            raise ImportError("No module named 'torch'", name="torch")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_training)
    import importlib

    monkeypatch.setattr(importlib, "import_module", lambda n: no_training(n))
    assert cli.main(["convert", "x.pt", "--out", "y"]) == 2
    assert "pip install 'cxr-triage[train]'" in capsys.readouterr().err


# --------------------------------------------------------------------------- read-only commands (issue 19, item 2)


def _cli(*args: str, cwd: Path, default_config: Path | None = None, env: dict[str, str] | None = None,
         ) -> subprocess.CompletedProcess[str]:
    """``cxr-triage ARGS`` in its own process; ``default_config`` stands in for /etc/cxr-triage/node.toml."""
    code = "import sys; from worker.cli import main; sys.exit(main(sys.argv[1:]))"
    if default_config is not None:
        code = (f"import pathlib, worker.settings as s; s.DEFAULT_CONFIG_FILE = pathlib.Path({str(default_config)!r}); "
                + code)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(Path(cli.__file__).resolve().parents[1]), **(env or {})})


@pytest.mark.parametrize("command", ["status", "query", "resend"])
def test_read_only_commands_never_create_a_database(tmp_path: Path, command: str) -> None:
    r = _cli(command, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"cxr-triage {command}: no triage database at {tmp_path / 'var' / 'triage.db'} "
                                "(storage.data_dir = var); pass --data-dir DIR or --database URL of the node, "
                                "or --config FILE")
    r = _cli(command, "--data-dir", str(tmp_path / "elsewhere"), cwd=tmp_path)
    assert r.returncode == 2 and str(tmp_path / "elsewhere" / "triage.db") in r.stderr
    assert list(tmp_path.iterdir()) == []  # no folder, no database


def test_a_database_without_our_schema_is_not_read_as_empty(tmp_path: Path) -> None:
    import sqlite3

    (tmp_path / "var").mkdir()
    sqlite3.connect(tmp_path / "var" / "triage.db").close()
    r = _cli("status", cwd=tmp_path)
    assert r.returncode == 2 and "is not a cxr-triage database (no schema)" in r.stderr


def test_the_installed_nodes_config_is_the_default(tmp_path: Path) -> None:
    node_dir = tmp_path / "lib" / "cxr-triage"
    assert cli.main(["migrate", "--data-dir", str(node_dir)]) == 0
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{node_dir}"\n')
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    r = _cli("status", "--format", "json", cwd=elsewhere, default_config=config)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total"] == 0
    # CXR_TRIAGE_CONFIG wins, and set empty it means "no file": back to ./var, which does not exist
    r = _cli("status", cwd=elsewhere, default_config=config, env={"CXR_TRIAGE_CONFIG": ""})
    assert r.returncode == 2 and str(elsewhere / "var" / "triage.db") in r.stderr
    # an absent default file is no error
    r = _cli("status", "--data-dir", str(node_dir), cwd=elsewhere, default_config=tmp_path / "absent.toml")
    assert r.returncode == 0, r.stderr
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------- version, model card, argument checks (item 4)


def test_version() -> None:
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "worker.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"cxr-triage {version('cxr-triage')}"


def test_model_prints_the_card_a_person_needs(tmp_path: Path) -> None:
    import json as _json

    from worker.modelcard import default_model_dir

    r = _cli("model", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    card = _json.loads((default_model_dir() / "model.json").read_text())
    overall = card["metrics"][card["metrics"]["deployed"]]
    assert f"{card['name']} {card['version']}" in out.splitlines()[0]
    assert f"precision: {card['precision']}" in out and "classes: normal, pneumonia, covid19" in out
    for cls, t in card["thresholds"].items():
        assert f"{cls} P >= {t:.4f}" in out
    assert f"{overall['overall']['accuracy'] * 100:.1f}" in out  # overall accuracy, as the card records it
    for group, m in overall["by_age_group"].items():
        row = next(ln for ln in out.splitlines() if ln.strip().startswith(group + " "))
        assert f"{m['accuracy'] * 100:.1f}" in row
    assert "training data and licences:" in out and "CC BY-NC" in out
    assert list(tmp_path.iterdir()) == []


def test_model_of_another_folder(tmp_path: Path, toy_model: Path) -> None:
    r = _cli("model", "--model", str(toy_model), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("toy ") and "training data and licences: not recorded" in r.stdout
    r = _cli("model", "--model", str(tmp_path / "none"), cwd=tmp_path)
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_query_and_resend_check_their_arguments(tmp_path: Path) -> None:
    from worker.modelcard import ModelCard, default_model_dir

    card = ModelCard.load(default_model_dir())  # the message names the shipped model, whatever its version
    data = tmp_path / "var"
    assert cli.main(["migrate", "--data-dir", str(data)]) == 0
    cases = [
        (["query", "--class", "covid"],
         f"cxr-triage query: --class 'covid' is not a class of model {card.name} {card.version} "
         "(classes: normal, pneumonia, covid19)"),
        (["query", "--min-probability", "1.5"], "cxr-triage query: --min-probability must be a probability in [0, 1], got 1.5"),
        (["query", "--min-probability", "-0.1"], "cxr-triage query: --min-probability must be a probability in [0, 1], got -0.1"),
        (["query", "--since", "yesterday"], "cxr-triage query: --since: 'yesterday' is not an ISO 8601 date or time"),
        (["resend", "--to", "PACS"], "cxr-triage resend: --to 'PACS' is not a destination (destinations: folder)"),
    ]
    for args, expected in cases:
        r = _cli(*args, "--data-dir", str(data), cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.strip() == expected, r.stderr
        assert "configuration error" not in r.stderr
    r = _cli("query", "--class", "covid19", "--data-dir", str(data), cwd=tmp_path)
    assert r.returncode == 0 and "(0 rows)" in r.stdout
    r = _cli("resend", "--to", "pacs", "--data-dir", str(data), cwd=tmp_path,
             env={"CXR_TRIAGE_DESTINATIONS": "pacs=PACS@127.0.0.1:104"})
    assert r.returncode == 0 and "0 failed deliveries queued again" in r.stdout


def test_query_table_shows_the_delivery_error(tmp_path: Path, toy_model: Path) -> None:
    from support import send

    from worker.node import Node
    from worker.settings import load_settings

    data_dir, port, dead = tmp_path / "var", free_port(), free_port()  # nothing listens on `dead`
    s = load_settings(None, {"storage.data_dir": str(data_dir), "listener.port": port,
                             "listener.bind_address": "127.0.0.1", "storage.disk_reserve_mb": 0}, environ={})
    n = Node(s, batch=False)
    n.start()
    try:
        assert send([make_image(rows=64, cols=64)], n.port) == [0]
    finally:
        n.stop()
    env = {"CXR_TRIAGE_DESTINATIONS": f"PACS@127.0.0.1:{dead}", "CXR_TRIAGE_SEND_MAX_ATTEMPTS": "1",
           "CXR_TRIAGE_SEND_TIMEOUT": "2"}
    r = _cli("batch", "--once", "--data-dir", str(data_dir), "--model", str(toy_model), cwd=tmp_path, env=env)
    assert r.returncode == 0 and "send_failed 1" in r.stdout, r.stdout + r.stderr
    (row,) = _query(data_dir)
    (d,) = row["deliveries"]
    assert d["state"] == "send_failed" and d["last_error"].startswith("PACS ")
    r = _cli("query", "--data-dir", str(data_dir), cwd=tmp_path)
    head, _, line, *_ = r.stdout.splitlines()
    assert head.split()[-1] == "send_error" and line.rstrip().endswith(d["last_error"])


def test_the_demo_never_takes_the_hosts_node_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a node's host, /etc/cxr-triage/node.toml names the production PACS: the demo must not send there."""
    from worker import settings as settings_mod

    config = tmp_path / "node.toml"
    config.write_text('destinations = ["PACS@10.0.0.5:104"]\n')
    monkeypatch.setattr(settings_mod, "DEFAULT_CONFIG_FILE", config)
    for k in [k for k in os.environ if k.startswith("CXR_TRIAGE_")]:
        monkeypatch.delenv(k)
    assert cli._settings(cli.build_parser().parse_args(["demo"])).destinations is None
    (dest,) = cli._settings(cli.build_parser().parse_args(["status"])).destinations
    assert dest.host == "10.0.0.5"
