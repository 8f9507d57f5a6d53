"""The node's configuration: one TOML file, every key overridable by an environment variable.

Layout (every section and key is optional; ``deploy/liverfat.example.toml`` lists them all)::

    [node]        ae_title, host, port, allowed_callers, max_associations, acse_timeout_s,
                  network_timeout_s
    [spool]       dir, min_free_disk_mb, keep_days
    [series]      stable_seconds, complete_on_release
    [model]       name, device
    [worker]      max_attempts, shutdown_grace_s, ineligible_result
    [eligibility] passed to ``EligibilityPolicy.from_mapping``
    [analysis]    passed to ``AnalysisConfig.from_mapping`` (roi_mode, working_spacing_mm)
    [grading]     passed to ``GradingConfig.from_mapping`` (threshold_hu, ...)
    [outputs]     institution_name, institutional_department_name, disclaimer
    [send]        destinations, max_attempts, first_delay_s, backoff_factor, max_delay_s, timeout_s,
                  connect_timeout_s, acse_timeout_s, dimse_timeout_s, probe_interval_s, unhealthy_after_s
    [http]        host, port
    [tls]         enabled, certificate, private_key, ca_certificates, require_client_certificate,
                  check_hostname
    [log]         level, format

``LIVERFAT_<SECTION>_<KEY>`` overrides ``[section] key`` (``LIVERFAT_NODE_AE_TITLE=PACSNODE``,
``LIVERFAT_SEND_DESTINATIONS=ORTHANC@10.0.0.5:4242,BACKUP@10.0.0.6:104``). Defaults live only
in the dataclasses below; the environment is read by :func:`load_config`, never at import.
"""

from __future__ import annotations

import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from liverfat.dicom_io.eligibility import EligibilityPolicy
from liverfat.dicom_io.site import DEFAULT_DISCLAIMER, OutputSettings
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.pipeline import AnalysisConfig

ENV_PREFIX = "LIVERFAT_"
AE_TITLE_MAX_LENGTH = 16  # PS3.5 Table 6.2-1, VR AE
DEVICES = ("auto", "cpu", "cuda")
INELIGIBLE_RESULTS = ("nothing", "sr")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
PASS_THROUGH_SECTIONS = ("eligibility", "analysis", "grading")
FOREIGN_VARIABLES = frozenset({"LIVERFAT_MODEL_CACHE"})  # read by liverfat.inference.models.weights, not a config key


def check_ae_title(value: str) -> str | None:
    """Why ``value`` is not a valid AE title under PS3.5 (VR AE), or ``None`` when it is.

    At most 16 characters of the default character repertoire, no backslash, no control
    characters, not only spaces. Leading and trailing spaces are not significant.
    """
    if not value.strip():
        return "an AE title must contain at least one character that is not a space"
    if len(value) > AE_TITLE_MAX_LENGTH:
        return f"an AE title has at most {AE_TITLE_MAX_LENGTH} characters, got {len(value)}"
    if not value.isascii() or "\\" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "an AE title may not contain backslashes, control characters or non-ASCII characters"
    return None


@dataclass(frozen=True)
class Destination:
    """A DICOM node that receives our results (``AE@host:port``)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Caller:
    """A calling AE title allowed to send to us, optionally only from one host."""

    ae_title: str
    host: str | None = None

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = "LIVERFAT"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_callers: tuple[Caller, ...] = ()  # empty: any caller
    max_associations: int = 10  # concurrent associations; a connection waiting for its A-ASSOCIATE-RQ counts
    acse_timeout_s: float = 10.0  # a connection that sends no A-ASSOCIATE-RQ within this is closed
    network_timeout_s: float = 60.0  # an association idle this long is aborted


@dataclass(frozen=True)
class SpoolSection:
    dir: Path = Path("liverfat-spool")
    min_free_disk_mb: int = 500  # below this, C-STORE answers 0xA700 Out of Resources
    keep_days: float = 7.0  # received CT and results of a finished series are deleted after this; 0: never


@dataclass(frozen=True)
class SeriesSection:
    stable_seconds: float = 10.0  # a series is complete after this long without a new instance
    complete_on_release: bool = False  # also complete a sender's series when it releases the association


@dataclass(frozen=True)
class ModelSection:
    name: str = "default"
    device: str = "auto"


@dataclass(frozen=True)
class WorkerSection:
    max_attempts: int = 3  # a series whose processing killed the worker this often is marked failed
    shutdown_grace_s: float = 30.0  # on SIGTERM, wait this long for the series in hand, then park it
    ineligible_result: str = "nothing"  # "nothing" or "sr" (a short "not applicable" SR)


@dataclass(frozen=True)
class OutputsSection:
    """What the SEG, SRs and key image say about the site (the station name is ``[node] ae_title``)."""

    institution_name: str | None = None
    institutional_department_name: str | None = None
    disclaimer: str = DEFAULT_DISCLAIMER


@dataclass(frozen=True)
class SendSection:
    destinations: tuple[Destination, ...] = ()
    max_attempts: int = 50  # with the delays below: about 7.5 hours of retrying
    first_delay_s: float = 10.0
    backoff_factor: float = 2.0
    max_delay_s: float = 600.0
    timeout_s: float = 30.0  # an association that receives nothing for this long is aborted
    connect_timeout_s: float = 5.0  # TCP connection to a destination
    acse_timeout_s: float = 10.0  # a destination that does not answer the association request in this long is down
    dimse_timeout_s: float = 30.0  # waiting for one C-STORE or C-ECHO response
    probe_interval_s: float = 10.0  # a destination that is down is probed (C-ECHO) this often
    unhealthy_after_s: float = 180.0  # results failing this long to a destination make /healthz answer 503


@dataclass(frozen=True)
class HttpSection:
    host: str = "127.0.0.1"
    port: int = 9112  # 0: no HTTP server


@dataclass(frozen=True)
class TlsSection:
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True
    check_hostname: bool = False  # destinations are often addressed by IP


@dataclass(frozen=True)
class LogSection:
    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``liverfat serve`` needs, validated; ``source`` is the file it came from."""

    node: NodeSection = field(default_factory=NodeSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    series: SeriesSection = field(default_factory=SeriesSection)
    model: ModelSection = field(default_factory=ModelSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    eligibility: Mapping[str, Any] = field(default_factory=dict)
    analysis: Mapping[str, Any] = field(default_factory=dict)
    grading: Mapping[str, Any] = field(default_factory=dict)
    outputs: OutputsSection = field(default_factory=OutputsSection)
    send: SendSection = field(default_factory=SendSection)
    http: HttpSection = field(default_factory=HttpSection)
    tls: TlsSection = field(default_factory=TlsSection)
    log: LogSection = field(default_factory=LogSection)
    source: Path | None = None


SECTIONS: dict[str, type] = {
    "node": NodeSection, "spool": SpoolSection, "series": SeriesSection, "model": ModelSection,
    "worker": WorkerSection, "outputs": OutputsSection, "send": SendSection, "http": HttpSection, "tls": TlsSection, "log": LogSection,
}  # fmt: skip


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``path`` (or the embedded defaults), apply ``LIVERFAT_*`` overrides, validate.

    Relative paths are resolved against the config file's folder, or against the current
    folder when there is no file. Raises ``LiverfatError(Reason.CONFIG_INVALID)`` with the
    section, key and what was wrong.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise LiverfatError(Reason.CONFIG_INVALID, f"cannot read configuration {path}: {error}") from error
    raw = _apply_environment(raw, os.environ if environ is None else environ)
    base = path.resolve().parent if path is not None else Path.cwd()
    unknown = sorted(set(raw) - set(SECTIONS) - set(PASS_THROUGH_SECTIONS))
    if unknown:
        known = ", ".join([*SECTIONS, *PASS_THROUGH_SECTIONS])
        raise _invalid(f"unknown section(s) {', '.join(unknown)}; known: {known}")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name, {})
        if not isinstance(values, Mapping):
            raise _invalid(f"[{name}] must be a table, got {values!r}")
        sections[name] = _build_section(name, cls, values, base)
    for name in PASS_THROUGH_SECTIONS:
        sections[name] = dict(raw.get(name, {}))
    config = NodeConfig(**sections, source=path.resolve() if path is not None else None)
    _validate(config)
    return config


def parse_destination(value: Any) -> Destination:
    """``"AE@host:port"`` or ``{ae_title, host, port}`` as a :class:`Destination`."""
    if isinstance(value, Mapping):
        extra = set(value) - {"ae_title", "host", "port"}
        if extra or not {"ae_title", "host", "port"} <= set(value):
            raise _invalid(f"a destination needs exactly ae_title, host and port, got {dict(value)!r}")
        return Destination(str(value["ae_title"]), str(value["host"]), _to_int("send", "destinations", value["port"]))
    text = str(value).strip()
    ae_title, at, address = text.partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host:
        raise _invalid(f"a destination is written AE@host:port, got {text!r}")
    return Destination(ae_title, host.strip("[]"), _to_int("send", "destinations", port))


def parse_caller(value: Any) -> Caller:
    """``"AE"`` or ``"AE@host"`` as a :class:`Caller`."""
    ae_title, _, host = str(value).strip().partition("@")
    return Caller(ae_title, host or None)


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {name: dict(values) if isinstance(values, Mapping) else values for name, values in raw.items()}
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable in FOREIGN_VARIABLES:
            continue
        section, _, key = variable[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS and section not in PASS_THROUGH_SECTIONS:
            continue  # LIVERFAT_* variables of other parts of liverfat
        if not key:
            raise _invalid(f"environment variable {variable} names no key; write {ENV_PREFIX}{section.upper()}_<KEY>")
        target = merged.setdefault(section, {})
        target[key] = value if section in SECTIONS else _toml_value(value)
    return merged


def _toml_value(text: str) -> Any:
    """An environment value for a pass-through section: a TOML value if it parses as one, else the text."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def _build_section(name: str, cls: type, values: Mapping[str, Any], base: Path) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise _invalid(f"unknown key(s) {', '.join(unknown)} in [{name}]; known: {', '.join(sorted(known))}")
    converted = {key: _convert(name, key, value, hints[key]) for key, value in values.items()}
    section = cls(**converted)
    relative = {f.name: base / value for f in fields(cls)
                if isinstance(value := getattr(section, f.name), Path) and not value.is_absolute()}  # fmt: skip
    return replace(section, **relative)


def _convert(section: str, key: str, value: Any, hint: Any) -> Any:
    optional = get_origin(hint) in (Union, types.UnionType) and type(None) in get_args(hint)
    if optional:
        if value in (None, ""):
            return None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if hint is bool:
        return _to_bool(section, key, value)
    if hint is int:
        return _to_int(section, key, value)
    if hint is float:
        return _to_float(section, key, value)
    if hint is str:
        if not isinstance(value, str):
            raise _invalid(f"[{section}] {key} must be a string, got {value!r}")
        return value
    if hint is Path:
        return Path(str(value)).expanduser()
    if get_origin(hint) is tuple:
        item_type = get_args(hint)[0]
        items = [part for part in value.split(",") if part.strip()] if isinstance(value, str) else list(value)
        parse = {Destination: parse_destination, Caller: parse_caller}[item_type]
        return tuple(parse(item) for item in items)
    raise TypeError(f"no conversion for [{section}] {key}: {hint}")  # a programming error in the dataclasses


def _to_bool(section: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise _invalid(f"[{section}] {key} must be true or false, got {value!r}")


def _to_int(section: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _invalid(f"[{section}] {key} must be a whole number, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _invalid(f"[{section}] {key} must be a whole number, got {value!r}") from None


def _to_float(section: str, key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise _invalid(f"[{section}] {key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _invalid(f"[{section}] {key} must be a number, got {value!r}") from None


def _validate(config: NodeConfig) -> None:
    problems: list[str] = []
    titles = [("[node] ae_title", config.node.ae_title)]
    titles += [("[node] allowed_callers", c.ae_title) for c in config.node.allowed_callers]
    titles += [("[send] destinations", d.ae_title) for d in config.send.destinations]
    problems += [f"{where}: {why} ({title!r})" for where, title in titles if (why := check_ae_title(title))]
    ports = [("[node] port", config.node.port, 1), ("[http] port", config.http.port, 0)]
    ports += [("[send] destinations", d.port, 1) for d in config.send.destinations]
    problems += [f"{where}: port {port} is outside {low}..65535" for where, port, low in ports
                 if not low <= port <= 65535]  # fmt: skip
    positive = {
        "[series] stable_seconds": config.series.stable_seconds,
        "[node] max_associations": config.node.max_associations,
        "[node] network_timeout_s": config.node.network_timeout_s, "[worker] max_attempts": config.worker.max_attempts,
        "[node] acse_timeout_s": config.node.acse_timeout_s,
        "[send] max_attempts": config.send.max_attempts, "[send] timeout_s": config.send.timeout_s,
        "[send] max_delay_s": config.send.max_delay_s,
        "[send] connect_timeout_s": config.send.connect_timeout_s, "[send] acse_timeout_s": config.send.acse_timeout_s,
        "[send] dimse_timeout_s": config.send.dimse_timeout_s, "[send] probe_interval_s": config.send.probe_interval_s,
        "[send] unhealthy_after_s": config.send.unhealthy_after_s,
    }  # fmt: skip
    problems += [f"{where} must be greater than 0, got {value}" for where, value in positive.items() if value <= 0]
    not_negative = {
        "[spool] min_free_disk_mb": config.spool.min_free_disk_mb, "[spool] keep_days": config.spool.keep_days,
        "[send] first_delay_s": config.send.first_delay_s,
        "[worker] shutdown_grace_s": config.worker.shutdown_grace_s,
    }  # fmt: skip
    problems += [f"{where} must not be negative, got {value}" for where, value in not_negative.items() if value < 0]
    if config.send.backoff_factor < 1:
        problems.append(f"[send] backoff_factor must be at least 1, got {config.send.backoff_factor}")
    choices = [
        ("[model] device", config.model.device, DEVICES), ("[log] level", config.log.level.upper(), LOG_LEVELS),
        ("[log] format", config.log.format, LOG_FORMATS),
        ("[worker] ineligible_result", config.worker.ineligible_result, INELIGIBLE_RESULTS),
    ]  # fmt: skip
    problems += [f"{where} must be one of {', '.join(allowed)}, got {value!r}" for where, value, allowed in choices
                 if value not in allowed]  # fmt: skip
    problems += _tls_problems(config.tls)
    try:
        output_settings(config)
    except ValueError as error:
        problems.append(f"[outputs] {error}")
    problems += _pass_through_problems(config)
    if problems:
        source = config.source or "the embedded defaults"
        raise _invalid(f"configuration from {source} is invalid:\n  " + "\n  ".join(problems))


def _tls_problems(tls: TlsSection) -> list[str]:
    if not tls.enabled:
        return []
    required = {"certificate": tls.certificate, "private_key": tls.private_key, "ca_certificates": tls.ca_certificates}
    problems = [f"[tls] {key} is required when TLS is enabled" for key, value in required.items() if value is None]
    problems += [f"[tls] {key}: no such file {value}" for key, value in required.items()
                 if value is not None and not value.is_file()]  # fmt: skip
    return problems


def _pass_through_problems(config: NodeConfig) -> list[str]:
    """Eligibility, analysis and grading keys are checked by their owners' ``from_mapping``."""
    problems = []
    for name, build in (("eligibility", eligibility_policy), ("analysis", analysis_config)):
        try:
            build(config)
        except (LiverfatError, ValueError, TypeError) as error:
            problems.append(f"[{name}] {getattr(error, 'message', error)}")
    return problems


def eligibility_policy(config: NodeConfig) -> EligibilityPolicy:
    return EligibilityPolicy.from_mapping(config.eligibility)


def analysis_config(config: NodeConfig) -> AnalysisConfig:
    """``[analysis]`` with ``[grading]`` as its grading settings."""
    if "grading" in config.analysis:
        raise ValueError("grading settings belong in the [grading] section, not in [analysis]")
    return AnalysisConfig.from_mapping({**config.analysis, "grading": config.grading})


def output_settings(config: NodeConfig) -> OutputSettings:
    """``[outputs]``, with this node's AE title as station name and device observer."""
    outputs = config.outputs
    return OutputSettings(station_name=config.node.ae_title.strip(), institution_name=outputs.institution_name,
                          institutional_department_name=outputs.institutional_department_name,
                          disclaimer=outputs.disclaimer)  # fmt: skip


def _invalid(message: str) -> LiverfatError:
    return LiverfatError(Reason.CONFIG_INVALID, message)
