"""Typed configuration, validated once at start-up.

Precedence, lowest to highest: built-in defaults < TOML file (``--config FILE`` or
``CXR_TRIAGE_CONFIG``) < ``CXR_TRIAGE_<SECTION>_<KEY>`` environment variables < command-line
flags. Every error names the setting that is wrong, in the dotted form used by the TOML file
(``listener.port``) and, where it came from the environment, the variable's name.

The commented reference file is ``config/default.toml``; a test checks that it parses to
exactly these defaults, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "CXR_TRIAGE_"
#: The configuration file of an installed node (the systemd units' ``--config``): the default
#: configuration of every command when ``--config`` is not given and ``CXR_TRIAGE_CONFIG`` is
#: not set, so that an operator on the node's host gets the node's own state without flags.
DEFAULT_CONFIG_FILE = Path("/etc/cxr-triage/node.toml")
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: AE VR, no backslash, <= 16 chars


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the setting."""


@dataclass(frozen=True)
class ListenerSettings:
    """The DICOM Storage and Verification SCP (``cxr-triage serve``)."""

    ae_title: str = "CXRTRIAGE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    max_pdu: int = 131072
    max_associations: int = 10
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    allowed_calling_aets: list[str] = field(default_factory=list)
    require_called_aet: bool = True
    allowed_peers: list[str] = field(default_factory=list)
    max_object_mb: int = 1024
    accept_out_of_scope: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False


@dataclass(frozen=True)
class StorageSettings:
    """Where received objects and the triage database live."""

    data_dir: Path = Path("var")
    spool_dir: Path | None = None
    database_url: str | None = None
    disk_reserve_mb: int = 1024
    fsync: bool = True
    audit_log: Path | None = None
    retention_days: int = 0

    @property
    def audit_path(self) -> Path:
        """The JSON-lines audit trail (``data_dir/audit.jsonl`` unless set)."""
        return self.audit_log if self.audit_log is not None else self.data_dir / "audit.jsonl"

    @property
    def spool_path(self) -> Path:
        """The spool folder (``data_dir/spool`` unless set)."""
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the triage database (SQLite in ``data_dir`` unless set)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'triage.db').resolve()}"


@dataclass(frozen=True)
class DatabaseSettings:
    """How long the triage database keeps rows (the database itself is ``storage.database_url``)."""

    retention_days: int = 0


@dataclass(frozen=True)
class ModelSettings:
    """The OpenVINO IR and its model card."""

    path: Path | None = None
    precision: str | None = None
    max_image_mb: int = 512


@dataclass(frozen=True)
class BatchSettings:
    """The batch pipeline: claim, decode, preprocess, infer, store."""

    size: int = 16
    lease_seconds: int = 300
    max_attempts: int = 3
    poll_seconds: float = 0.25
    #: threads for reading, decoding, preprocessing and result building (0 = the machine's cores, at most 4)
    threads: int = 0


@dataclass(frozen=True)
class ScheduleSettings:
    """When batches run (APScheduler)."""

    mode: str = "continuous"
    interval_minutes: float = 15.0
    cron: str = "0 * * * *"
    gather_seconds: float = 0.25
    max_batch_seconds: float = 0.0
    misfire_grace_seconds: int = 3600


@dataclass(frozen=True)
class SendSettings:
    """Delivery of result objects to the destinations."""

    secondary_capture: bool = False
    heatmap: bool = False  # issue 17: an RGB Secondary Capture with the model's Grad-CAM heatmap
    max_attempts: int = 10
    backoff_seconds: float = 10.0
    backoff_max_seconds: float = 900.0
    jitter: float = 0.2
    retry_poll_seconds: float = 5.0
    lease_seconds: int = 120
    timeout: float = 30.0
    #: C-STORE associations open at once per DICOM destination (objects spread over them)
    associations: int = 4


@dataclass(frozen=True)
class TriageSettings:
    """How probabilities become a priority (worker/priority.py); thresholds default to the card's."""

    priorities: dict[str, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthSettings:
    """The HTTP health and metrics endpoint (off by default, loopback by default)."""

    enabled: bool = False
    bind_address: str = "127.0.0.1"
    port: int = 9110


@dataclass(frozen=True)
class WebSettings:
    """The read-only worklist page (worker/web): off unless a port is set; loopback by default.

    Beyond loopback a login is required (``password_hash`` from ``cxr-triage hash-password``, or
    ``token``); there is no default password. Either one also turns the login on for loopback.
    """

    port: int | None = None
    bind_address: str = "127.0.0.1"
    show_patient_names: bool = False
    password_hash: str = ""
    token: str = ""
    refresh_seconds: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.port is not None

    @property
    def login_required(self) -> bool:
        return bool(self.password_hash or self.token)


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOM peer (C-STORE), a local folder, a RIS (HL7 v2 over MLLP) or a
    FHIR R4 server."""

    name: str
    type: str  # "dicom" | "folder" | "hl7" | "fhir"
    ae_title: str = ""
    host: str = ""
    port: int = 104
    calling_ae_title: str = ""
    path: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # hl7: MSH-3/4 (us) and MSH-5/6 (the RIS)
    sending_application: str = "CXRTRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    # fhir: the server's base URL and an optional bearer token
    url: str = ""
    token: str = ""

    @property
    def message_based(self) -> bool:
        """HL7 and FHIR destinations get one message per screened image, not the DICOM objects."""
        return self.type in ("hl7", "fhir")

    @classmethod
    def parse(cls, spec: str) -> Destination:
        """``AET@host:port`` (a DICOM peer), ``folder:PATH``, ``hl7:HOST:PORT`` or
        ``fhir:https://host/base``; an optional ``name=`` prefix."""
        name = ""
        if "=" in spec.split("@")[0].split(":")[0]:
            name, spec = spec.split("=", 1)
        if spec.startswith("folder:"):
            path = spec[len("folder:"):]
            if not path:
                raise SettingsError(f"destination {spec!r}: folder:PATH needs a path")
            return cls(name=name or "folder", type="folder", path=Path(path).expanduser())
        if spec.startswith("hl7:"):
            m = re.match(r"^hl7:([^:]+):([0-9]{1,5})$", spec)
            if not m:
                raise SettingsError(f"destination {spec!r}: hl7:HOST:PORT needs a host and a port")
            return cls(name=name or "hl7", type="hl7", host=m.group(1), port=int(m.group(2)))
        if spec.startswith("fhir:"):
            return cls(name=name or "fhir", type="fhir", url=spec[len("fhir:"):])
        m = re.match(r"^([^@]{1,16})@([^:]+):([0-9]{1,5})$", spec)
        if not m:
            raise SettingsError(
                f"destination {spec!r} is none of AET@host:port, folder:PATH, hl7:HOST:PORT, fhir:URL"
            )
        return cls(name=name or m.group(1), type="dicom", ae_title=m.group(1), host=m.group(2), port=int(m.group(3)))


@dataclass(frozen=True)
class Settings:
    """The whole configuration of one node."""

    listener: ListenerSettings = field(default_factory=ListenerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    send: SendSettings = field(default_factory=SendSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    triage: TriageSettings = field(default_factory=TriageSettings)
    web: WebSettings = field(default_factory=WebSettings)
    destinations: list[Destination] | None = None
    log_level: str = "INFO"
    log_format: str = "text"

    @property
    def result_destinations(self) -> list[Destination]:
        """The configured destinations; unset means a folder ``<data_dir>/results``."""
        if self.destinations is None:
            return [Destination(name="folder", type="folder", path=self.storage.data_dir / "results")]
        return list(self.destinations)


_SECTIONS: dict[str, type] = {
    "listener": ListenerSettings,
    "storage": StorageSettings,
    "database": DatabaseSettings,
    "model": ModelSettings,
    "batch": BatchSettings,
    "schedule": ScheduleSettings,
    "send": SendSettings,
    "health": HealthSettings,
    "triage": TriageSettings,
    "web": WebSettings,
}
_TOP_LEVEL = {"log_level", "log_format"}


def _coerce(value: Any, tp: Any, name: str, from_text: bool) -> Any:
    """Convert ``value`` to type ``tp``; raise SettingsError naming ``name``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_text and value == ""):
            return None
        return _coerce(value, args[0], name, from_text)
    if origin is dict:
        key_tp, item_tp = typing.get_args(tp)
        if from_text and isinstance(value, str):  # "covid19=urgent,pneumonia=high"
            pairs = [v.split("=", 1) for v in value.split(",") if v.strip()]
            if any(len(kv) != 2 for kv in pairs):
                raise SettingsError(f"{name} must be KEY=VALUE pairs separated by commas, got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, Mapping):
            raise SettingsError(f"{name} must be a table, got {value!r}")
        return {_coerce(k, key_tp, name, from_text): _coerce(v, item_tp, f"{name}.{k}", from_text)
                for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise SettingsError(f"{name} must be a list, got {value!r}")
        return [_coerce(v, item_tp, name, from_text) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in {"1", "true", "yes", "on"}:
                return True
            if from_text and str(value).lower() in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if tp is Path:
            if not isinstance(value, (str, Path)):
                raise ValueError
            return Path(value).expanduser()
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be of type {getattr(tp, '__name__', tp)}, got {value!r}") from None
    raise SettingsError(f"{name}: unsupported setting type {tp!r}")  # pragma: no cover


def _apply(base: Settings, values: Mapping[str, Any], source: str, from_text: bool) -> Settings:
    """Overlay a nested mapping ``{section: {key: value}}`` on ``base``."""
    top: dict[str, Any] = {}
    for section, body in values.items():
        if section == "destinations":
            top["destinations"] = _destinations(body, source)
            continue
        if section in _TOP_LEVEL:
            top[section] = _coerce(body, str, f"{section} ({source})", from_text)
            continue
        cls = _SECTIONS.get(section)
        if cls is None:
            raise SettingsError(f"unknown configuration section [{section}] ({source})")
        if not isinstance(body, Mapping):
            raise SettingsError(f"[{section}] must be a table ({source})")
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key not in known:
                raise SettingsError(f"unknown setting {section}.{key} ({source})")
            where = env_name(f"{section}.{key}") if source == "environment" else source
            changes[key] = _coerce(value, hints[key], f"{section}.{key} ({where})", from_text)
        top[section] = dataclasses.replace(getattr(base, section), **changes)
    return dataclasses.replace(base, **top)


def _destinations(value: Any, source: str) -> list[Destination]:
    """``[[destinations]]`` tables, or specs (``AET@host:port``, ``folder:PATH``) as a list or comma-separated text."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise SettingsError(f"destinations must be a list ({source})")
    out = []
    hints = typing.get_type_hints(Destination)
    for i, item in enumerate(value):
        if isinstance(item, Destination):
            out.append(item)
        elif isinstance(item, str):
            out.append(Destination.parse(item))
        elif isinstance(item, Mapping):
            known = {f.name for f in dataclasses.fields(Destination)}
            unknown = set(item) - known
            if unknown:
                raise SettingsError(f"destinations[{i}]: unknown setting(s) {sorted(unknown)} ({source})")
            if "name" not in item or "type" not in item:
                raise SettingsError(f"destinations[{i}] needs name and type ({source})")
            kw = {k: _coerce(v, hints[k], f"destinations[{i}].{k} ({source})", False) for k, v in item.items()}
            if kw.get("type") == "hl7" and "port" not in kw:
                kw["port"] = 2575  # the IANA port for HL7 over MLLP (104 is DICOM's)
            out.append(Destination(**kw))
        else:
            raise SettingsError(f"destinations[{i}] must be a table or a spec string ({source})")
    return out


def env_name(dotted: str) -> str:
    """``listener.port`` -> ``CXR_TRIAGE_LISTENER_PORT``."""
    return ENV_PREFIX + dotted.replace(".", "_").upper()


def _from_env(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Collect ``CXR_TRIAGE_<SECTION>_<KEY>`` variables into a nested mapping."""
    out: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        for f in dataclasses.fields(cls):
            name = env_name(f"{section}.{f.name}")
            if name in environ:
                out.setdefault(section, {})[f.name] = environ[name]
    for key in _TOP_LEVEL | {"destinations"}:
        if env_name(key) in environ:
            out[key] = environ[env_name(key)]
    return out


def default_config_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """:data:`DEFAULT_CONFIG_FILE` when it exists and ``CXR_TRIAGE_CONFIG`` is not set (an empty
    ``CXR_TRIAGE_CONFIG=`` means: no file at all); else None."""
    environ = os.environ if environ is None else environ
    if ENV_PREFIX + "CONFIG" in environ:
        return None
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build and validate the configuration.

    ``overrides`` holds command-line values as dotted keys (``{"listener.port": 104}``);
    ``None`` values are ignored so that unset flags do not mask the file or environment.
    """
    environ = os.environ if environ is None else environ
    settings = Settings()
    path = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    if path:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise SettingsError(f"configuration file {p} does not exist") from None
        except PermissionError:
            raise SettingsError(f"configuration file {p} is not readable by this user (uid {os.geteuid()}); "
                                "run the command as the node's user, e.g. sudo -u cxr-triage") from None
        except IsADirectoryError:
            raise SettingsError(f"configuration file {p} is a folder") from None
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"configuration file {p} is not valid TOML: {exc}") from None
        settings = _apply(settings, data, str(p), from_text=False)
    env_values = _from_env(environ)
    if env_values:
        settings = _apply(settings, env_values, "environment", from_text=True)
    if overrides:
        nested: dict[str, Any] = {}
        for dotted, value in overrides.items():
            if value is None:
                continue
            if dotted == "destinations":
                nested["destinations"] = list(value)
            elif "." in dotted:
                section, key = dotted.split(".", 1)
                nested.setdefault(section, {})[key] = value
            else:
                nested[dotted] = value
        if nested:
            settings = _apply(settings, nested, "command line", from_text=True)
    from worker.validation import validate  # here: worker.validation imports this module

    validate(settings)
    return settings
