"""The range and format checks of a loaded :class:`~worker.settings.Settings` that types alone do
not catch (AE titles, ports, addresses, destinations, the web page's login and TLS files); every
error names the setting, in the dotted form of the TOML file.

Run once by :func:`worker.settings.load_settings`, after every source is applied.
"""

from __future__ import annotations

import ipaddress
import re

from worker.settings import AE_TITLE_RE, Settings, SettingsError, WebSettings


def validate(s: Settings) -> None:
    """Range and format checks that types alone do not catch."""
    li = s.listener
    if not AE_TITLE_RE.match(li.ae_title) or not li.ae_title.strip():
        raise SettingsError(f"listener.ae_title must be 1-16 printable characters without '\\', got {li.ae_title!r}")
    for aet in li.allowed_calling_aets:
        if not AE_TITLE_RE.match(aet):
            raise SettingsError(f"listener.allowed_calling_aets: {aet!r} is not a valid AE title")
    if not 0 <= li.port <= 65535:
        raise SettingsError(f"listener.port must be 0-65535, got {li.port}")
    if li.max_pdu != 0 and li.max_pdu < 4096:
        raise SettingsError(f"listener.max_pdu must be 0 (unlimited) or >= 4096, got {li.max_pdu}")
    if li.max_associations < 1:
        raise SettingsError(f"listener.max_associations must be >= 1, got {li.max_associations}")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
        if getattr(li, key) <= 0:
            raise SettingsError(f"listener.{key} must be > 0 seconds")
    for peer in li.allowed_peers:
        try:
            ipaddress.ip_network(peer, strict=False)
        except ValueError:
            raise SettingsError(f"listener.allowed_peers: {peer!r} is not an IP address or network") from None
    if li.max_object_mb < 1:
        raise SettingsError("listener.max_object_mb must be >= 1")
    if (li.tls_cert is None) != (li.tls_key is None):
        raise SettingsError("listener.tls_cert and listener.tls_key must be set together")
    if li.tls_require_client_cert and (li.tls_cert is None or li.tls_ca is None):
        raise SettingsError("listener.tls_require_client_cert needs listener.tls_cert, tls_key and tls_ca")
    for key in ("tls_cert", "tls_key", "tls_ca"):
        path = getattr(li, key)
        if path is not None and not path.is_file():
            raise SettingsError(f"listener.{key}: {path} is not a readable file")
    if s.storage.disk_reserve_mb < 0:
        raise SettingsError("storage.disk_reserve_mb must be >= 0")
    if s.storage.retention_days < 0:
        raise SettingsError(f"storage.retention_days must be >= 0 (0 = keep for ever), got {s.storage.retention_days}")
    if s.database.retention_days < 0:
        raise SettingsError(
            f"database.retention_days must be >= 0 (0 = keep for ever), got {s.database.retention_days}"
        )
    if s.database.retention_days and not 0 < s.storage.retention_days <= s.database.retention_days:
        raise SettingsError(
            f"database.retention_days ({s.database.retention_days}) needs storage.retention_days between 1 and it "
            f"(got {s.storage.retention_days}): rows outlive the images they describe"
        )
    if s.model.precision not in (None, "f32", "bf16", "f16", "int8"):
        raise SettingsError(f"model.precision must be one of f32, bf16, f16, int8, got {s.model.precision!r}")
    if s.model.max_image_mb < 1:
        raise SettingsError("model.max_image_mb must be >= 1")
    b = s.batch
    if b.size < 1:
        raise SettingsError(f"batch.size must be >= 1, got {b.size}")
    if b.lease_seconds < 1:
        raise SettingsError("batch.lease_seconds must be >= 1")
    if b.max_attempts < 1:
        raise SettingsError("batch.max_attempts must be >= 1")
    if b.poll_seconds <= 0:
        raise SettingsError("batch.poll_seconds must be > 0")
    if not 0 <= b.threads <= 64:
        raise SettingsError(f"batch.threads must be from 0 (the machine's cores) to 64, got {b.threads}")
    sc = s.schedule
    if sc.mode not in ("continuous", "interval", "cron"):
        raise SettingsError(f"schedule.mode must be continuous, interval or cron, got {sc.mode!r}")
    if sc.interval_minutes <= 0:
        raise SettingsError("schedule.interval_minutes must be > 0")
    if sc.mode == "cron":
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(sc.cron, timezone="UTC")
        except ValueError as exc:
            raise SettingsError(f"schedule.cron {sc.cron!r} is not a crontab expression: {exc}") from None
    if sc.gather_seconds < 0 or sc.max_batch_seconds < 0 or sc.misfire_grace_seconds < 0:
        raise SettingsError("schedule.gather_seconds, max_batch_seconds and misfire_grace_seconds must be >= 0")
    se = s.send
    if se.max_attempts < 1:
        raise SettingsError("send.max_attempts must be >= 1")
    if se.backoff_seconds <= 0 or se.backoff_max_seconds < se.backoff_seconds:
        raise SettingsError("send.backoff_seconds must be > 0 and <= send.backoff_max_seconds")
    if not 0 <= se.jitter < 1:
        raise SettingsError("send.jitter must be in [0, 1)")
    if not 1 <= se.associations <= 16:
        raise SettingsError(f"send.associations must be from 1 to 16, got {se.associations}")
    from worker.priority import PRIORITIES

    for cls_name, prio in s.triage.priorities.items():
        if prio not in PRIORITIES:
            raise SettingsError(f"triage.priorities.{cls_name} must be one of {', '.join(PRIORITIES)}, got {prio!r}")
    for cls_name, thr in s.triage.thresholds.items():
        if not 0.0 <= thr <= 1.0:
            raise SettingsError(f"triage.thresholds.{cls_name} must be a probability in [0, 1], got {thr}")
    if not 0 <= s.health.port <= 65535:
        raise SettingsError(f"health.port must be 0-65535, got {s.health.port}")
    _validate_web(s.web)
    names = [d.name for d in s.destinations or []]
    if len(names) != len(set(names)):
        raise SettingsError(f"destinations: names must be unique, got {names}")
    for d in s.destinations or []:
        if d.type == "dicom":
            if not AE_TITLE_RE.match(d.ae_title) or not d.host or not 0 < d.port <= 65535:
                raise SettingsError(f"destinations.{d.name}: a DICOM destination needs ae_title, host and port 1-65535")
            if (d.tls_cert is None) != (d.tls_key is None):
                raise SettingsError(f"destinations.{d.name}: tls_cert and tls_key must be set together")
        elif d.type == "folder":
            if d.path is None:
                raise SettingsError(f"destinations.{d.name}: a folder destination needs path")
        elif d.type == "hl7":
            if not d.host or not 0 < d.port <= 65535:
                raise SettingsError(f"destinations.{d.name}: an hl7 destination needs host and port 1-65535")
            if (d.tls_cert is None) != (d.tls_key is None):
                raise SettingsError(f"destinations.{d.name}: tls_cert and tls_key must be set together")
            for key in ("sending_application", "sending_facility", "receiving_application", "receiving_facility"):
                if re.search(r"[|^~\\&\r\n]", getattr(d, key)):
                    raise SettingsError(f"destinations.{d.name}.{key} must not contain HL7 delimiters |^~\\&")
        elif d.type == "fhir":
            if not re.match(r"^https?://[^/\s]+", d.url):
                raise SettingsError(f"destinations.{d.name}: a fhir destination needs url http(s)://host/base, "
                                    f"got {d.url!r}")
            import importlib.util

            if importlib.util.find_spec("fhir.resources") is None:
                raise SettingsError(f"destinations.{d.name}: a fhir destination needs the fhir extra "
                                    "(pip install 'cxr-triage[fhir]')")
        else:
            raise SettingsError(f"destinations.{d.name}: type must be dicom, folder, hl7 or fhir, got {d.type!r}")
    if s.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise SettingsError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {s.log_level!r}")
    if s.log_format not in ("text", "json"):
        raise SettingsError(f"log_format must be text or json, got {s.log_format!r}")


def _validate_web(w: WebSettings) -> None:
    """The page: a port, a login wherever it is reachable from the network, TLS files that exist."""
    if not w.enabled:
        return
    if not 0 <= w.port <= 65535:  # type: ignore[operator]
        raise SettingsError(f"web.port must be 0-65535, got {w.port}")
    try:
        loopback = ipaddress.ip_address(w.bind_address).is_loopback
    except ValueError:
        loopback = w.bind_address == "localhost"
    if not loopback and not w.login_required:
        raise SettingsError(
            f"web.bind_address {w.bind_address} is beyond loopback: set web.password_hash "
            "(cxr-triage hash-password) or web.token; there is no default password"
        )
    if w.password_hash and not w.password_hash.startswith("pbkdf2_sha256$"):
        raise SettingsError("web.password_hash must come from `cxr-triage hash-password` (pbkdf2_sha256$...)")
    if w.token and len(w.token) < 16:
        raise SettingsError("web.token must be at least 16 characters")
    if w.refresh_seconds <= 0:
        raise SettingsError("web.refresh_seconds must be > 0")
    if (w.tls_cert is None) != (w.tls_key is None):
        raise SettingsError("web.tls_cert and web.tls_key must be set together")
    for key in ("tls_cert", "tls_key"):
        path = getattr(w, key)
        if path is not None and not path.is_file():
            raise SettingsError(f"web.{key}: {path} is not a readable file")
    import importlib.util

    missing = [m for m in ("starlette", "jinja2", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise SettingsError(f"web.port is set but {', '.join(missing)} missing: pip install 'cxr-triage[web]'")
