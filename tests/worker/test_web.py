"""The worklist page: a node that screened the shipped samples (default model) plus a lateral view,
read over HTTP and in headless Chromium (Debian ``chromium`` + ``chromium-driver``, Selenium)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette", reason="the web extra (starlette, jinja2, uvicorn) is not installed")

from pydicom import dcmread  # noqa: E402
from support import free_port, make_image, send  # noqa: E402
from test_security import pki  # noqa: E402,F401  (the test CA and certificates, a fixture)

from worker import cli, pipeline, store  # noqa: E402
from worker.engine import Engine  # noqa: E402
from worker.modelcard import ModelCard, default_model_dir  # noqa: E402
from worker.node import Node  # noqa: E402
from worker.settings import Settings, SettingsError, load_settings  # noqa: E402
from worker.web import WebServer  # noqa: E402
from worker.web.auth import hash_password, verify_password  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed (Debian packages chromium and chromium-driver; tests/run installs them)",
)


def _settings(data_dir: Path, **web: Any) -> Settings:
    return load_settings(None, {
        "storage.data_dir": str(data_dir), "storage.disk_reserve_mb": "0", "listener.bind_address": "127.0.0.1",
        "listener.port": str(free_port()), "web.port": str(free_port()), **{f"web.{k}": v for k, v in web.items()},
    }, environ={})


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, str, dict[str, str]]]:
    """A node (web page on) that screened the 12 samples with the default model and skipped a lateral view."""
    if default_model_dir() is None:
        pytest.skip("this checkout has no default model (worker/default_model)")
    s = _settings(tmp_path_factory.mktemp("web") / "var", refresh_seconds="1")
    node = Node(s, batch=False)
    node.start()
    files = sorted(SAMPLES.glob("*.dcm"))
    dss = [dcmread(f) for f in files]
    lateral = make_image(rows=128, cols=128, view="LL")
    lateral.AccessionNumber = "LAT-1"
    assert send(dss + [lateral], node.port) == [0] * (len(dss) + 1)
    report = pipeline.drain(node.db, node.spool, Engine(default_model_dir()), s, pipeline.worker_id())
    assert (report.done, report.skipped) == (len(dss), 1)
    try:
        yield node, f"http://127.0.0.1:{node.web.port}", {"lateral": lateral.SOPInstanceUID}
    finally:
        node.stop()


def _get(url: str, **headers: str) -> tuple[int, bytes, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers), timeout=10) as rsp:
            return rsp.status, rsp.read(), dict(rsp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


# --------------------------------------------------------------------------- HTTP


def test_api_studies_is_query_json_in_worklist_order(screened, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    node, base, _ = screened
    status, body, _ = _get(base + "/api/studies")
    assert status == 200
    api = json.loads(body)
    assert cli.main(["query", "--data-dir", str(node.settings.storage.data_dir), "--format", "json"]) == 0
    query = json.loads(capsys.readouterr().out)
    assert sorted(api, key=lambda r: r["sop_instance_uid"]) == sorted(query, key=lambda r: r["sop_instance_uid"])
    rank = {"urgent": 0, "high": 1, "routine": 2, None: 3}
    keys = [(r["state"] != "done", rank[r["priority"]],
             -(r["probabilities"][r["predicted_class"]] if r["probabilities"] else 0)) for r in api]
    assert keys == sorted(keys)
    assert {r["priority"] for r in api if r["state"] == "done"} == {"urgent", "routine"}  # the samples have both
    assert api[-1]["state"] == "skipped"
    status, body, _ = _get(base + "/api/studies?priority=routine")
    assert {r["priority"] for r in json.loads(body)} == {"routine"}


def test_pages_render_and_hide_patient_names(screened) -> None:  # type: ignore[no-untyped-def]
    node, base, uids = screened
    names = {str(dcmread(f, specific_tags=["PatientName"]).PatientName) for f in SAMPLES.glob("*.dcm")}
    for path in ("/", "/rows", "/problems", "/model", "/queue"):
        status, body, headers = _get(base + path)
        assert status == 200, path
        text = body.decode()
        assert "script-src 'self'" in headers["content-security-policy"]
        assert not any(n and n.replace("^", " ") in text for n in names), f"a patient name on {path}"
    text = _get(base + "/model")[1].decode()
    card = ModelCard.load(default_model_dir())
    assert card.name in text and card.version in text and "adult" in text and "child" in text
    assert f"{card.thresholds['covid19']:.3f}" in text
    text = _get(base + "/problems")[1].decode()
    assert uids["lateral"] in text and "lateral" in text.lower()
    text = _get(base + "/queue")[1].decode()
    assert 'id="state-done">12<' in text and 'id="state-skipped">1<' in text


def test_patient_names_shown_when_configured(screened) -> None:  # type: ignore[no-untyped-def]
    node, _, _ = screened
    s = dataclasses.replace(node.settings, web=dataclasses.replace(node.settings.web, port=0, show_patient_names=True))
    web = WebServer(s, node.db, node.spool, None).start()
    try:
        text = _get(f"http://127.0.0.1:{web.port}/")[1].decode()
        assert "<th>Patient</th>" in text and "Test Patient" not in text  # samples only, the lateral is skipped
        text = _get(f"http://127.0.0.1:{web.port}/problems")[1].decode()
        assert "Test Patient" in text  # the lateral view's name, from its stored header
    finally:
        web.stop()


def test_login_settings(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="beyond loopback.*no default password"):
        _settings(tmp_path, bind_address="0.0.0.0")
    with pytest.raises(SettingsError, match="cxr-triage hash-password"):
        _settings(tmp_path, bind_address="0.0.0.0", password_hash="plain")
    assert _settings(tmp_path, bind_address="0.0.0.0", token="t" * 20).web.login_required
    env = load_settings(None, environ={"CXR_TRIAGE_WEB_PORT": "8088"})
    assert env.web.enabled and env.web.port == 8088 and not Settings().web.enabled
    h = hash_password("correct horse")
    assert verify_password("correct horse", h) and not verify_password("wrong", h) and h != hash_password("correct horse")


def test_hash_password_command() -> None:
    out = subprocess.run([sys.executable, "-m", "worker.cli", "hash-password"], input="s3cret-pass\n",
                         capture_output=True, text=True, check=True).stdout.strip()
    assert verify_password("s3cret-pass", out)


def test_login_required_with_credentials(screened) -> None:  # type: ignore[no-untyped-def]
    node, _, _ = screened
    token = "tok-" + "x" * 20
    s = dataclasses.replace(node.settings, web=dataclasses.replace(node.settings.web, port=0, token=token))
    web = WebServer(s, node.db, node.spool, None).start()
    try:
        base = f"http://127.0.0.1:{web.port}"
        status, _, headers = _get(base + "/")
        assert status == 303 and headers["location"].startswith("/login")
        assert _get(base + "/api/studies")[0] == 401
        assert _get(base + "/api/studies", Authorization=f"Bearer {token}")[0] == 200
        assert _get(base + "/api/studies", Authorization="Bearer wrong")[0] == 401

        def login(password: str, nxt: str) -> tuple[int, dict[str, str]]:
            req = urllib.request.Request(base + "/login", method="POST",
                                         data=urllib.parse.urlencode({"password": password, "next": nxt}).encode())
            opener = urllib.request.build_opener(type("NoRedirect", (urllib.request.HTTPRedirectHandler,),
                                                      {"redirect_request": lambda *a: None}))
            try:
                with opener.open(req, timeout=10) as rsp:
                    return rsp.status, dict(rsp.headers)
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers)

        assert login("wrong", "/queue")[0] == 401
        status, headers = login(token, "/queue")
        assert status == 303 and headers["location"] == "/queue"
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert _get(base + "/queue", Cookie=cookie.split(";")[0])[0] == 200
        assert _get(base + "/queue", Cookie="cxr_triage_session=99999999999.forged")[0] == 303
        for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example/"):
            assert login(token, evil)[1]["location"] == "/"  # never sent elsewhere
    finally:
        web.stop()


def test_https_with_the_listeners_certificate_style(screened, pki) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    import ssl

    node, _, _ = screened
    s = dataclasses.replace(node.settings, web=dataclasses.replace(
        node.settings.web, port=0, tls_cert=pki["server_crt"], tls_key=pki["server_key"]))
    web = WebServer(s, node.db, node.spool, None).start()
    try:
        ctx = ssl.create_default_context(cafile=str(pki["ca_crt"]))
        with urllib.request.urlopen(f"https://127.0.0.1:{web.port}/api/studies", context=ctx, timeout=10) as rsp:
            assert rsp.status == 200 and len(json.loads(rsp.read())) == 13
        with pytest.raises(OSError):  # plain HTTP gets no answer
            urllib.request.urlopen(f"http://127.0.0.1:{web.port}/api/studies", timeout=5).read()
    finally:
        web.stop()


# --------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is not installed (Debian packages chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000", "--no-proxy-server"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def _rows(drv: Any) -> list[dict[str, str]]:
    """The table's rows as they are now (read in one script: the table is replaced as it refreshes)."""
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#rows tr[data-sop]')).map(r => "
        "({priority: r.dataset.priority, cls: r.dataset.class, sop: r.dataset.sop}));")


def _until(predicate: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.1)
    return predicate()


@needs_browser
def test_browser_urgent_first_and_filter_narrows(screened, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.support.ui import Select

    node, base, _ = screened
    browser.get(base + "/")
    prios = [r["priority"] for r in _rows(browser)]
    assert len(prios) == 12 and "urgent" in prios and "routine" in prios
    assert prios == sorted(prios, key=["urgent", "high", "routine"].index)  # urgent rows first
    Select(browser.find_element("id", "priority")).select_by_value("routine")
    assert _until(lambda: {r["priority"] for r in _rows(browser)} == {"routine"})
    n_routine = len(_rows(browser))
    assert 0 < n_routine < 12 and "priority=routine" in browser.current_url  # in place, no reload
    Select(browser.find_element("id", "priority")).select_by_value("")
    Select(browser.find_element("id", "class")).select_by_value("covid19")
    assert _until(lambda: {r["cls"] for r in _rows(browser)} == {"covid19"})


@needs_browser
def test_browser_table_refreshes_without_reload(screened, browser) -> None:  # type: ignore[no-untyped-def]
    node, base, _ = screened
    browser.get(base + "/")
    browser.execute_script("window.__marker = 42;")  # gone if the page reloads
    before = len(_rows(browser))
    new = make_image(rows=128, cols=128, seed=7)
    assert send([new], node.port) == [0]  # queued: a waiting row appears at the bottom
    assert _until(lambda: len(_rows(browser)) == before + 1, timeout=15)
    assert browser.execute_script("return window.__marker;") == 42
    with node.db.sessions.begin() as s:  # leave the module's node as it was for the other tests
        s.query(store.Instance).filter(store.Instance.sop_instance_uid == new.SOPInstanceUID).delete()


@needs_browser
def test_browser_skipped_tab_shows_the_lateral_views_reason(screened, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    node, base, uids = screened
    browser.get(base + "/")
    browser.find_element(By.ID, "tab-problems").click()
    row = _until(lambda: browser.find_elements(By.CSS_SELECTOR, f'#problems tr[data-sop="{uids["lateral"]}"]'))
    reason = row[0].find_element(By.CSS_SELECTOR, "td.reason").text
    assert "lateral" in reason.lower() and row[0].find_element(By.CSS_SELECTOR, "td").text == "skipped"


@needs_browser
def test_browser_login_required(screened, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    node, _, _ = screened
    s = dataclasses.replace(node.settings, web=dataclasses.replace(
        node.settings.web, port=0, password_hash=hash_password("radiology-2026")))
    web = WebServer(s, node.db, node.spool, None).start()
    try:
        base = f"http://127.0.0.1:{web.port}"
        browser.get(base + "/queue")
        assert "/login" in browser.current_url and not browser.find_elements(By.ID, "states")
        browser.find_element(By.ID, "password").send_keys("wrong")
        browser.find_element(By.ID, "login-submit").click()
        assert _until(lambda: browser.find_elements(By.ID, "login-failed"))
        browser.find_element(By.ID, "password").send_keys("radiology-2026")
        browser.find_element(By.ID, "login-submit").click()
        assert _until(lambda: browser.find_elements(By.ID, "states"))  # back where we wanted to go
        assert browser.current_url == base + "/queue"
    finally:
        web.stop()


def test_serve_web_port_flag_and_environment(tmp_path: Path) -> None:
    """``cxr-triage serve --web-port N`` (and ``CXR_TRIAGE_WEB_PORT``) in its own process."""
    import os
    import signal

    from support import wait_for

    for how in ("flag", "env"):
        web_port = free_port()
        env = {**os.environ, "CXR_TRIAGE_LISTENER_BIND_ADDRESS": "127.0.0.1", "CXR_TRIAGE_STORAGE_DISK_RESERVE_MB": "0"}
        argv = [sys.executable, "-m", "worker.cli", "serve", "--no-batch", "--data-dir", str(tmp_path / how),
                "--port", str(free_port())]
        if how == "flag":
            argv += ["--web-port", str(web_port)]
        else:
            env["CXR_TRIAGE_WEB_PORT"] = str(web_port)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            def up(web_port: int = web_port, proc: subprocess.Popen[str] = proc) -> bool:
                try:
                    return _get(f"http://127.0.0.1:{web_port}/api/studies")[0] == 200
                except OSError:
                    return proc.poll() is not None
            assert wait_for(up, timeout=60) and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            assert json.loads(_get(f"http://127.0.0.1:{web_port}/api/studies")[1]) == []
            assert _get(f"http://127.0.0.1:{web_port}/")[0] == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            assert f"worklist page on http://127.0.0.1:{web_port}/" in proc.stdout.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- heatmaps (issue 17)


def test_worklist_links_each_heatmap_and_serves_it_as_png(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from worker.testing.toymodel import build_toy_heatmap_model

    s = _settings(tmp_path / "var")
    s = dataclasses.replace(s, model=dataclasses.replace(s.model, path=build_toy_heatmap_model(tmp_path / "hm")),
                            send=dataclasses.replace(s.send, heatmap=True))
    node = Node(s, batch=False)
    node.start()
    try:
        ds = make_image(rows=300, cols=260, seed=5)
        plain = make_image(rows=64, cols=64, seed=6)
        assert send([ds], node.port) == [0]
        assert pipeline.drain(node.db, node.spool, Engine(s.model.path), s, pipeline.worker_id()).done == 1
        base = f"http://127.0.0.1:{node.web.port}"
        status, body, _ = _get(base + "/")
        assert status == 200 and f'href="heatmap/{ds.SOPInstanceUID}"'.encode() in body
        status, png, headers = _get(f"{base}/heatmap/{ds.SOPInstanceUID}")
        assert status == 200 and headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(png))
        sc = next(dcmread(p) for p in (s.storage.data_dir / "results").iterdir() if dcmread(p).Modality == "OT")
        assert img.mode == "RGB" and img.size == (sc.Columns, sc.Rows)
        assert _get(f"{base}/heatmap/{plain.SOPInstanceUID}")[0] == 404
    finally:
        node.stop()
