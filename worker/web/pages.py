"""The routes of the worklist page (Starlette + Jinja2, no JavaScript build step).

``GET /`` worklist, ``GET /rows`` its table body (what the page's small script fetches to
refresh without reloading), ``GET /problems`` skipped and failed images with their reasons and
the refused objects, ``GET /model`` the model card, ``GET /queue`` the queue status,
``GET /api/studies`` the rows of ``cxr-triage query --format json`` in worklist order.
Everything is read-only; the only POST is the login.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlencode

from pydicom import dcmread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from worker import store, worklist
from worker.modelcard import ModelCard
from worker.priority import PRIORITIES, PriorityMap
from worker.settings import Settings
from worker.spool import Spool
from worker.web.auth import COOKIE, Gate

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
WAITING = ("done", "queued", "running")  # the worklist tab; skipped and failed have their own
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Headers:
    """Study date and (only when ``web.show_patient_names``) patient name from the stored
    object's header: the database keeps neither. Read once per image (headers do not change)."""

    def __init__(self, spool: Spool, with_names: bool, size: int = 4096) -> None:
        self.spool, self.with_names, self.size = spool, with_names, size
        self._cache: OrderedDict[str, dict[str, str]] = OrderedDict()

    def get(self, uid: str, relpath: str | None) -> dict[str, str]:
        if uid in self._cache:
            self._cache.move_to_end(uid)
            return self._cache[uid]
        out = {"study_date": "", "patient_name": ""}
        tags = ["StudyDate"] + (["PatientName"] if self.with_names else [])
        try:
            if relpath:
                ds = dcmread(self.spool.path(relpath), stop_before_pixels=True, specific_tags=tags)
                d = str(ds.get("StudyDate", "") or "")
                out["study_date"] = f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else d
                if self.with_names:
                    out["patient_name"] = str(ds.get("PatientName", "") or "").replace("^", " ").strip()
        except Exception:  # a missing or unreadable file shows blanks, never an error page
            log.debug("header of %s not readable", uid)
        self._cache[uid] = out
        if len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return out


def _png(pixels: Any) -> bytes:
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _when(text: str | None, end: bool = False) -> dt.datetime | None:
    """A date (YYYY-MM-DD) or ISO time from a filter; ``end`` makes a date inclusive."""
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if end and len(text) == 10:
        when += dt.timedelta(days=1)
    return when


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


class Pages:
    """The state behind the routes: settings, database, spool, model card, login gate."""

    def __init__(self, settings: Settings, db: store.Database, spool: Spool, card: ModelCard | None) -> None:
        self.settings, self.db, self.spool, self.card = settings, db, spool, card
        self.pmap = (PriorityMap.build(card, settings.triage.priorities, settings.triage.thresholds)
                     if card is not None else None)
        self.gate = Gate(settings.web.password_hash, settings.web.token)
        self.headers = Headers(spool, settings.web.show_patient_names)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))

    # ------------------------------------------------------------------ plumbing

    def _authorised(self, request: Request) -> bool:
        if not self.gate.enabled:
            return True
        return self.gate.session_ok(request.cookies.get(COOKIE)) or self.gate.bearer_ok(
            request.headers.get("authorization"))

    def _page(self, request: Request, name: str, **context: Any) -> Response:
        rsp = self.templates.TemplateResponse(request, name, {
            "tab": name.removesuffix(".html"), "login": self.gate.enabled, "priorities": PRIORITIES,
            "classes": list(self.card.classes) if self.card else [], **context})
        rsp.headers.update(_HEADERS)
        return rsp

    def guard(self, handler: Any, api: bool = False) -> Any:
        async def wrapped(request: Request) -> Response:
            if self._authorised(request):
                return cast(Response, await handler(request))
            if api:
                return JSONResponse({"error": "login required"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse("/login?" + urlencode({"next": nxt}), status_code=303)
        return wrapped

    # ------------------------------------------------------------------ data

    def _filters(self, request: Request, default_states: tuple[str, ...] = ()) -> worklist.Filters:
        q = request.query_params
        states = [s for s in q.getlist("state") if s in {st.value for st in store.State}]
        limit = q.get("limit", "1000")
        return worklist.Filters(
            states=tuple(states) or default_states,
            predicted_class=q.get("class") or None,
            priority=q.get("priority") if q.get("priority") in PRIORITIES else None,
            since=_when(q.get("since")), until=_when(q.get("until"), end=True),
            limit=int(limit) if limit.isdigit() else 1000,
        )

    def _display(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows for the table: what the page shows beside the API's fields."""
        uids = [r["sop_instance_uid"] for r in rows]
        paths = store.instance_paths(self.db, uids)
        now = store.utcnow()
        out = []
        for r in rows:
            received = dt.datetime.fromisoformat(r["received_at"].replace("Z", "+00:00"))
            finished = dt.datetime.fromisoformat(r["finished_at"].replace("Z", "+00:00")) if r["finished_at"] else None
            probs = r["probabilities"] or {}
            out.append({
                **r, **self.headers.get(r["sop_instance_uid"], paths.get(r["sop_instance_uid"])),
                "probs": [(c, f"{p:.2f}") for c, p in probs.items()],
                "received": received.strftime("%Y-%m-%d %H:%M:%S"),
                "screened": finished.strftime("%H:%M:%S") if finished else "",
                "waiting": _age((now - received).total_seconds()),
                "sends": [(d["destination"], d["state"], d["last_error"] or "") for d in r["deliveries"]],
                "heatmap": any(d["kind"] == "heatmap" for d in r["deliveries"]),
            })
        return out

    # ------------------------------------------------------------------ routes

    async def worklist_page(self, request: Request) -> Response:
        f = self._filters(request, WAITING)
        rows = self._display(worklist.rows(self.db, f, order="worklist"))
        return self._page(request, "worklist.html", rows=rows, q=request.query_params,
                          counts=store.priority_counts(self.db), refresh=self.settings.web.refresh_seconds,
                          show_names=self.settings.web.show_patient_names)

    async def rows_fragment(self, request: Request) -> Response:
        rows = self._display(worklist.rows(self.db, self._filters(request, WAITING), order="worklist"))
        rsp = self.templates.TemplateResponse(request, "_rows.html", {
            "rows": rows, "show_names": self.settings.web.show_patient_names})
        rsp.headers.update(_HEADERS)
        return rsp

    async def heatmap_image(self, request: Request) -> Response:
        """The heatmap Secondary Capture of one image (issue 17, worker/overlay.py) as a PNG, from
        the spool; 404 when there is none (heatmaps off, not yet screened, or purged)."""
        uid = request.path_params["sop"]
        path = store.delivery_path(self.db, uid, "heatmap")
        try:
            if not path:
                raise FileNotFoundError(uid)
            png = _png(dcmread(self.spool.path(path)).pixel_array)
        except Exception:  # noqa: BLE001 - absent or unreadable: no heatmap to show
            return Response("no heatmap for this image", status_code=404, media_type="text/plain", headers=_HEADERS)
        return Response(png, media_type="image/png", headers=_HEADERS)

    async def api_studies(self, request: Request) -> Response:
        return JSONResponse(worklist.rows(self.db, self._filters(request), order="worklist"), headers=_HEADERS)

    async def problems_page(self, request: Request) -> Response:
        f = self._filters(request, ("skipped", "failed"))
        rows = self._display(worklist.rows(self.db, f, order="arrival")[::-1])
        refused = [e for e in worklist.events(self.db, limit=200, newest_first=True) if e["kind"] != "duplicate"]
        return self._page(request, "problems.html", rows=rows, events=refused,
                          show_names=self.settings.web.show_patient_names)

    async def model_page(self, request: Request) -> Response:
        card = self.card
        metrics: dict[str, Any] = dict(card.raw.get("metrics") or {}) if card else {}
        source = metrics.get("deployed") if metrics.get("deployed") in metrics else (
            "torch" if "torch" in metrics else None)
        block = metrics.get(source) if source else None
        groups: list[tuple[str, dict[str, Any]]] = []
        if isinstance(block, dict):
            if isinstance(block.get("overall"), dict):
                groups.append(("all", block["overall"]))
            groups += [(k, v) for k, v in (block.get("by_age_group") or {}).items() if isinstance(v, dict)]
        return self._page(request, "model.html", card=card, rules=self.pmap.describe() if self.pmap else [],
                          thresholds=self.pmap.thresholds if self.pmap else {}, groups=groups, source=source,
                          split=metrics.get("split"), n=metrics.get("n"))

    async def queue_page(self, request: Request) -> Response:
        counts = store.counts(self.db)
        waiting, oldest = store.queued_summary(self.db)
        per_dest = store.delivery_counts_by_destination(self.db)
        refused = store.intake_event_count(self.db, not_kinds=["duplicate"])
        dests: dict[str, dict[str, int]] = {}
        for name, state, n in per_dest:
            dests.setdefault(name, {st.value: 0 for st in store.SendState})[state] = n
        by_priority = store.priority_counts(self.db)
        return self._page(request, "queue.html", counts={st.value: counts.get(st.value, 0) for st in store.State},
                          by_priority={p: by_priority.get(p, 0) for p in PRIORITIES}, dests=dests,
                          waiting=waiting, oldest=_age((store.utcnow() - oldest).total_seconds()) if oldest else None,
                          refused=refused)

    async def login_form(self, request: Request) -> Response:
        return self._page(request, "login.html", next=request.query_params.get("next", "/"), failed=False)

    async def login(self, request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        nxt = (form.get("next") or ["/"])[0]
        if not nxt.startswith("/") or nxt.startswith("//") or "\\" in nxt:  # only our own paths
            nxt = "/"
        if self.gate.enabled and self.gate.accepts((form.get("password") or [""])[0]):
            rsp = RedirectResponse(nxt, status_code=303)
            rsp.set_cookie(COOKIE, self.gate.issue(), httponly=True, samesite="strict",
                           secure=self.settings.web.tls_cert is not None, max_age=12 * 3600)
            return rsp
        log.warning("web login failed from %s", request.client.host if request.client else "?")
        page = self._page(request, "login.html", next=nxt, failed=True)
        page.status_code = 401
        return page

    async def logout(self, request: Request) -> Response:
        rsp = RedirectResponse("/login", status_code=303)
        rsp.delete_cookie(COOKIE)
        return rsp

    async def script(self, request: Request) -> Response:
        return FileResponse(HERE / "worklist.js", media_type="text/javascript", headers=_HEADERS)

    def app(self) -> Starlette:
        g = self.guard
        return Starlette(routes=[
            Route("/", g(self.worklist_page)),
            Route("/rows", g(self.rows_fragment)),
            Route("/problems", g(self.problems_page)),
            Route("/model", g(self.model_page)),
            Route("/queue", g(self.queue_page)),
            Route("/api/studies", g(self.api_studies, api=True)),
            Route("/heatmap/{sop}", g(self.heatmap_image)),
            Route("/worklist.js", self.script),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout),
        ])
