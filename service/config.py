"""The node's configuration: one TOML file, every key overridable by an environment variable.

Layout (every section and key is optional; ``deploy/liverfat.example.toml`` lists them all)::

    [node]        ae_title, host, port, allowed_callers, max_associations, acse_timeout_s,
                  network_timeout_s, receivers
    [spool]       dir, min_free_disk_mb, keep_days, nearly_full_margin_mb
    [series]      stable_seconds, complete_on_release
    [model]       name, device, cache
    [worker]      max_attempts, shutdown_grace_s, ineligible_result
    [eligibility] built by ``EligibilityPolicy.from_mapping``
    [analysis]    built by ``AnalysisConfig.from_mapping`` (roi_mode, working_spacing_mm)
    [grading]     built by ``GradingConfig.from_mapping`` (threshold_hu, ...); the analysis's grading
    [outputs]     institution_name, institutional_department_name, disclaimer
    [send]        destinations, max_attempts, first_delay_s, backoff_factor, max_delay_s, timeout_s,
                  connect_timeout_s, acse_timeout_s, dimse_timeout_s, probe_interval_s, unhealthy_after_s
    [http]        host, port, token
    [tls]         enabled, certificate, private_key, ca_certificates, require_client_certificate,
                  check_hostname
    [log]         level, format

``LIVERFAT_<SECTION>_<KEY>`` overrides ``[section] key`` (``LIVERFAT_NODE_AE_TITLE=PACSNODE``,
``LIVERFAT_SEND_DESTINATIONS=ORTHANC@10.0.0.5:4242,BACKUP@10.0.0.6:104``). Defaults live only
in the models below; the environment is read by :func:`load_config`, never at import.

The sections are frozen dataclasses that pydantic validates (their ``__pydantic_config__``
forbids unknown keys): :func:`load_config` converts and checks TOML and environment text, while
code that builds a section itself (tests, benchmarks) gets it as written, and
``dataclasses.replace`` works on all of them.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_type_hints

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from liverfat.dicom_io.eligibility import EligibilityPolicy
from liverfat.dicom_io.site import DEFAULT_DISCLAIMER, OutputSettings
from liverfat.errors import LiverfatError, Reason
from liverfat.inference.grading import GradingConfig
from liverfat.inference.models.devices import DEVICE_AUTO, device_problem
from liverfat.inference.models.weights import DEFAULT_MODEL_CACHE
from liverfat.inference.pipeline import AnalysisConfig

ENV_PREFIX = "LIVERFAT_"
AE_TITLE_MAX_LENGTH = 16  # PS3.5 Table 6.2-1, VR AE
TOML_VALUED_SECTIONS = ("eligibility", "analysis", "grading")
"""Sections whose owners take TOML values: their environment values are parsed as TOML, not as text."""

T = TypeVar("T")


class _Validated:
    """Unknown keys are refused; defaults are validated too, so relative default paths resolve."""

    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(extra="forbid", validate_default=True)


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


# Field types: pydantic parses TOML and environment text; these add liverfat's rules.


def _ae_title(value: str) -> str:
    why = check_ae_title(value)
    if why is not None:
        raise ValueError(f"{why} ({value!r})")
    return value


def _device(value: str) -> str:
    problem = device_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _no_booleans(kind: str) -> BeforeValidator:
    """pydantic reads ``true`` as 1; a number written as true or false is a mistake."""

    def refuse(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticCustomError(f"{kind}_type", "not a number")
        return value

    return BeforeValidator(refuse)


def _blank_is_none(value: Any) -> Any:
    """An empty value (``LIVERFAT_TLS_CERTIFICATE=``) unsets an optional key."""
    return None if value == "" else value


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """``~`` expanded; a relative path taken from ``base`` in the validation context (set by load_config)."""
    value = value.expanduser()
    base = (info.context or {}).get("base")
    return value if base is None or value.is_absolute() else base / value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _split(value: Any) -> Any:
    """A comma-separated environment value as a list; TOML lists pass through."""
    return [part for part in value.split(",") if part.strip()] if isinstance(value, str) else value


def _destination_table(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    ae_title, at, address = value.strip().partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not host:
        raise ValueError(f"a destination is written AE@host:port, got {value.strip()!r}")
    return {"ae_title": ae_title, "host": host.strip("[]"), "port": port}


def _caller_table(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    ae_title, _, host = value.strip().partition("@")
    return {"ae_title": ae_title, "host": host or None}


Int = Annotated[int, _no_booleans("int")]
Float = Annotated[float, _no_booleans("float")]
PositiveInt = Annotated[Int, Field(gt=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegativeFloat = Annotated[Float, Field(ge=0)]
Port = Annotated[Int, Field(ge=1, le=65535)]
AeTitle = Annotated[str, AfterValidator(_ae_title)]
Device = Annotated[str, AfterValidator(_device)]
ConfigPath = Annotated[Path, AfterValidator(_resolve)]
OptionalPath = Annotated[ConfigPath | None, BeforeValidator(_blank_is_none)]
OptionalText = Annotated[str | None, BeforeValidator(_blank_is_none)]


@dataclass(frozen=True)
class Destination(_Validated):
    """A DICOM node that receives our results (``AE@host:port``)."""

    ae_title: AeTitle
    host: str
    port: Port

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Caller(_Validated):
    """A calling AE title allowed to send to us, optionally only from one host."""

    ae_title: AeTitle
    host: str | None = None

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


Destinations = Annotated[tuple[Annotated[Destination, BeforeValidator(_destination_table)], ...],
                         BeforeValidator(_split)]  # fmt: skip
Callers = Annotated[tuple[Annotated[Caller, BeforeValidator(_caller_table)], ...], BeforeValidator(_split)]


def _tls_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """A TLS file is required, and must exist, when ``enabled`` (validated before it) is true."""
    if not info.data.get("enabled"):
        return value
    if value is None:
        raise ValueError("required when TLS is enabled")
    if not value.is_file():
        raise ValueError(f"no such file {value}")
    return value


TlsFile = Annotated[OptionalPath, AfterValidator(_tls_file)]


def _receivers(value: Any) -> Literal["auto"] | int:
    """``[node] receivers``: ``"auto"`` or a whole number above 0 (a TOML integer, or environment text)."""
    if isinstance(value, str) and value.strip().isdecimal():
        value = int(value)
    if value == "auto" or (type(value) is int and value > 0):
        return value
    raise ValueError(f'must be "auto" or a whole number above 0, got {value!r}')


Receivers = Annotated[Literal["auto"] | int, PlainValidator(_receivers)]


@dataclass(frozen=True)
class NodeSection(_Validated):
    ae_title: AeTitle = "LIVERFAT"
    host: str = "0.0.0.0"
    port: Port = 11112
    allowed_callers: Callers = ()  # empty: any caller
    max_associations: PositiveInt = 10  # concurrent associations; a connection waiting for its A-ASSOCIATE-RQ counts
    acse_timeout_s: PositiveFloat = 10.0  # a connection that sends no A-ASSOCIATE-RQ within this is closed
    network_timeout_s: PositiveFloat = 60.0  # an association idle this long is aborted
    receivers: Receivers = "auto"  # processes that serve associations; "auto": min(usable cores, 4)


@dataclass(frozen=True)
class SpoolSection(_Validated):
    dir: ConfigPath = Path("liverfat-spool")
    min_free_disk_mb: Annotated[Int, Field(ge=0)] = 500  # below this, C-STORE answers 0xA700 Out of Resources
    keep_days: NonNegativeFloat = 7.0  # received CT and results of a finished series are deleted after this; 0: never
    nearly_full_margin_mb: Annotated[Int, Field(ge=0)] = 1024  # /healthz is red below min_free_disk_mb + this


@dataclass(frozen=True)
class SeriesSection(_Validated):
    stable_seconds: PositiveFloat = 10.0  # a series is complete after this long without a new instance
    complete_on_release: bool = False  # also complete a sender's series when it releases the association


@dataclass(frozen=True)
class ModelSection(_Validated):
    name: str = "default"
    device: Device = DEVICE_AUTO
    cache: ConfigPath = DEFAULT_MODEL_CACHE  # the default model's weights and the model store
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # the default model's arithmetic; auto: bf16 on bf16 hardware


WORKER_DEVICES_HELP = '"auto" (a worker per visible GPU, else `count` on the CPU), "cpu", or GPU indices like [0, 1]'


def _device_list(value: Any) -> Any:
    """``[worker] devices`` checked in one readable line: a word, or GPU indices each once (``"0,1"`` from the env)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "cpu"):
        return value.strip().lower()
    parts = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not parts or not all(_gpu_index(part) for part in parts):
        raise ValueError(f"must be {WORKER_DEVICES_HELP}, got {value!r}")
    indices = tuple(int(part) for part in parts)
    if len(set(indices)) < len(indices):
        raise ValueError(f"lists a GPU twice ({value!r}); a worker per GPU, each listed once")
    return indices


def _gpu_index(part: Any) -> bool:
    return (isinstance(part, int) and not isinstance(part, bool) and part >= 0) or (
        isinstance(part, str) and part.isdigit()
    )


WorkerDevices = Annotated[Literal["auto", "cpu"] | tuple[int, ...], BeforeValidator(_device_list)]


def _worker_name(value: str | None) -> str | None:
    """``[worker] name``: a fleet worker's Celery name is ``liverfat@<name>``, unique in the fleet."""
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", value):
        raise ValueError(f"must be letters, digits, '.', '_' or '-' (a letter or digit first, at most 100), "
                         f"got {value!r}")  # fmt: skip
    return value


WorkerName = Annotated[OptionalText, AfterValidator(_worker_name)]


@dataclass(frozen=True)
class WorkerSection(_Validated):
    count: PositiveInt = 1  # CPU worker processes (they split the cores); with GPUs, see devices
    devices: WorkerDevices = "auto"  # "auto": one worker per visible GPU, else `count` on CPU; "cpu"; or GPU indices
    max_attempts: PositiveInt = 3  # a series whose processing killed the worker this often is marked failed
    shutdown_grace_s: NonNegativeFloat = 30.0  # on SIGTERM, wait this long for the series in hand, then park it
    ineligible_result: Literal["nothing", "sr"] = "nothing"  # "sr": a short "not applicable" SR
    name: WorkerName = None  # fleet worker: Celery name liverfat@<name>; default <host>-<devices>, one per host


@dataclass(frozen=True)
class QueueSection(_Validated):
    broker: OptionalText = None  # "amqp://user:password@host:5672/vhost" (or amqps://): Celery on RabbitMQ
    path_map: Annotated[tuple[str, ...], BeforeValidator(_split)] = ()  # "PUBLISHER_PREFIX=THIS_HOST_PREFIX"
    ca_certificates: OptionalPath = None  # amqps://: CA bundle that signed the broker's certificate (else the system's)
    certificate: OptionalPath = None  # amqps:// with client certificates: ours, and its private key
    private_key: OptionalPath = None


@dataclass(frozen=True)
class OutputsSection(_Validated):
    """What the SEG, SRs and key image say about the site (the station name is ``[node] ae_title``)."""

    institution_name: OptionalText = None
    institutional_department_name: OptionalText = None
    disclaimer: str = DEFAULT_DISCLAIMER

    def settings(self, station_name: str) -> OutputSettings:
        return OutputSettings(station_name=station_name, institution_name=self.institution_name,
                              institutional_department_name=self.institutional_department_name,
                              disclaimer=self.disclaimer)  # fmt: skip


def _valid_outputs(outputs: OutputsSection) -> OutputsSection:
    """OutputSettings' limits, checked at load; the station name is checked as ``[node] ae_title``."""
    outputs.settings(OutputSettings.station_name)
    return outputs


@dataclass(frozen=True)
class SendSection(_Validated):
    destinations: Destinations = ()
    max_attempts: PositiveInt = 50  # with the delays below: about 7.5 hours of retrying
    first_delay_s: NonNegativeFloat = 10.0
    backoff_factor: Annotated[Float, Field(ge=1)] = 2.0
    max_delay_s: PositiveFloat = 600.0
    timeout_s: PositiveFloat = 30.0  # an association that receives nothing for this long is aborted
    connect_timeout_s: PositiveFloat = 5.0  # TCP connection to a destination
    acse_timeout_s: PositiveFloat = 10.0  # a destination not answering the association request this long is down
    dimse_timeout_s: PositiveFloat = 30.0  # waiting for one C-STORE or C-ECHO response
    probe_interval_s: PositiveFloat = 10.0  # a destination that is down is probed (C-ECHO) this often
    unhealthy_after_s: PositiveFloat = 180.0  # results failing this long to a destination make /healthz answer 503


@dataclass(frozen=True)
class HttpSection(_Validated):
    host: str = "127.0.0.1"
    port: Annotated[Int, Field(ge=0, le=65535)] = 9112  # 0: no HTTP server
    token: OptionalText = None  # when set, / and /metrics need it (Bearer header or ?token=); /healthz stays open


@dataclass(frozen=True)
class TlsSection(_Validated):
    enabled: bool = False
    certificate: TlsFile = None
    private_key: TlsFile = None
    ca_certificates: TlsFile = None
    require_client_certificate: bool = True
    check_hostname: bool = False  # destinations are often addressed by IP


@dataclass(frozen=True)
class LogSection(_Validated):
    level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)] = "INFO"
    format: Literal["text", "json"] = "text"


def _table(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a table, got {value!r}")  # noqa: TRY004 (pydantic reports ValueErrors)
    return value


def _built(value: Any, owner: type[T], from_mapping: Callable[[Mapping[str, Any]], T]) -> T:
    """A section its owner builds (dicom_io and inference know no pydantic); an instance passes as it is."""
    return value if isinstance(value, owner) else from_mapping(_table(value))


def _eligibility(value: Any) -> EligibilityPolicy:
    return _built(value, EligibilityPolicy, EligibilityPolicy.from_mapping)


def _grading(value: Any) -> GradingConfig:
    return _built(value, GradingConfig, GradingConfig.from_mapping)


def _analysis(value: Any) -> AnalysisConfig:
    if isinstance(value, Mapping) and "grading" in value:
        raise ValueError("grading settings belong in the [grading] section, not in [analysis]")
    return _built(value, AnalysisConfig, AnalysisConfig.from_mapping)


@dataclass(frozen=True)
class NodeConfig(_Validated):
    """Everything ``liverfat serve`` (and the research commands) need, validated; ``source`` is the file."""

    node: NodeSection = field(default_factory=NodeSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    series: SeriesSection = field(default_factory=SeriesSection)
    model: ModelSection = field(default_factory=ModelSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    queue: QueueSection = field(default_factory=QueueSection)
    eligibility: Annotated[EligibilityPolicy, PlainValidator(_eligibility)] = field(default_factory=EligibilityPolicy)
    analysis: Annotated[AnalysisConfig, PlainValidator(_analysis)] = field(default_factory=AnalysisConfig)
    grading: Annotated[GradingConfig, PlainValidator(_grading)] = field(default_factory=GradingConfig)
    outputs: Annotated[OutputsSection, AfterValidator(_valid_outputs)] = field(default_factory=OutputsSection)
    send: SendSection = field(default_factory=SendSection)
    http: HttpSection = field(default_factory=HttpSection)
    tls: TlsSection = field(default_factory=TlsSection)
    log: LogSection = field(default_factory=LogSection)
    source: Path | None = None

    def __post_init__(self) -> None:
        """``[grading]`` is the analysis's grading: ``analysis.grading`` is always ``grading``."""
        if self.analysis.grading is not self.grading:
            object.__setattr__(self, "analysis", replace(self.analysis, grading=self.grading))

    @cached_property
    def site(self) -> OutputSettings:
        """``[outputs]``, with this node's AE title as station name and device observer."""
        return self.outputs.settings(self.node.ae_title.strip())


SECTIONS = tuple(f.name for f in fields(NodeConfig) if f.name != "source")
_NODE_CONFIG = TypeAdapter(NodeConfig)
_DESTINATION = TypeAdapter(Annotated[Destination, BeforeValidator(_destination_table)])


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> NodeConfig:
    """Read ``path`` (or the embedded defaults), apply ``LIVERFAT_*`` overrides, validate.

    Relative paths are resolved against the config file's folder, or against the current
    folder when there is no file. Raises ``LiverfatError(Reason.CONFIG_INVALID)`` listing every
    problem, one per line, each with its section and key.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise LiverfatError(Reason.CONFIG_INVALID, f"cannot read configuration {path}: {error}") from error
    raw, problems = _apply_environment(raw, os.environ if environ is None else environ)
    problems += [f"unknown section [{name}]; known: {', '.join(SECTIONS)}" for name in sorted(set(raw) - set(SECTIONS))]
    source = path.resolve() if path is not None else None
    sections = {name: raw.get(name, {}) for name in SECTIONS}  # every section validated: its defaults' paths resolve
    config = None
    try:
        config = _NODE_CONFIG.validate_python({**sections, "source": source},
                                              context={"base": source.parent if source else Path.cwd()})  # fmt: skip
    except ValidationError as error:
        problems += [_problem(details) for details in error.errors()]
    if problems or config is None:
        where = source or "the embedded defaults"
        raise _invalid(f"configuration from {where} is invalid:\n  " + "\n  ".join(problems))
    return config


def parse_destination(value: str) -> Destination:
    """``"AE@host:port"`` (how the outbox names a destination) as a :class:`Destination`."""
    try:
        return _DESTINATION.validate_python(value)
    except ValidationError as error:
        raise _invalid("; ".join(_problem({**d, "loc": ("send", "destinations", *d["loc"])}) for d in error.errors()))


def _apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    merged = {name: dict(values) if isinstance(values, Mapping) else values for name, values in raw.items()}
    problems = []
    for variable, value in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        section, _, key = variable[len(ENV_PREFIX) :].lower().partition("_")
        if section not in SECTIONS:
            continue  # LIVERFAT_* variables of other parts of liverfat
        if not key:
            problems.append(f"environment variable {variable} names no key; write {ENV_PREFIX}{section.upper()}_<KEY>")
            continue
        target = merged.setdefault(section, {})
        if isinstance(target, dict):  # else: not a table, reported by validation
            target[key] = _toml_value(value) if section in TOML_VALUED_SECTIONS else value
    return merged, problems


def _toml_value(text: str) -> Any:
    """An environment value for a TOML-valued section: a TOML value if it parses as one, else the text."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


_TYPE_PROBLEMS = {
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_type": "must be a number", "float_parsing": "must be a number",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false", "string_type": "must be a string",
    "path_type": "must be a path", "tuple_type": "must be a list", "dataclass_type": "must be a table",
    "dataclass_args_type": "must be a table", "literal_error": "must be one of {expected}",
    "greater_than": "must be greater than {gt}", "less_than_equal": "must be at most {le}",
}  # fmt: skip
_UNKNOWN_KEY = ("unexpected_keyword_argument", "extra_forbidden")


def _problem(error: ErrorDetails) -> str:
    """One pydantic error as a line: ``[section] key must ..., got value``, or ``[section] key: message``."""
    loc, kind, ctx = error["loc"], error["type"], error.get("ctx", {})
    if kind in _UNKNOWN_KEY:
        known = ""
        if len(loc) == 2:  # a key of a section
            known = f"; known: {', '.join(f.name for f in fields(get_type_hints(NodeConfig)[str(loc[0])]))}"
        return f"unknown key {loc[-1]} in {_where(loc[:-1])}{known}"
    if kind == "value_error":  # a message of ours or of a section's owner, about the value named before it
        return f"{_where(loc)}{':' if len(loc) > 1 else ''} {ctx['error']}"
    if kind in ("missing", "missing_argument"):
        return f"{_where(loc)} is required"
    if kind == "greater_than_equal":
        wrong = "must not be negative" if ctx["ge"] == 0 else f"must be at least {ctx['ge']}"
    else:
        wrong = _TYPE_PROBLEMS[kind].format(**ctx) if kind in _TYPE_PROBLEMS else error["msg"]
    return f"{_where(loc)} {wrong}, got {error['input']!r}"


def _where(loc: tuple[int | str, ...]) -> str:
    """``("send", "destinations", 0, "port")`` as ``[send] destinations[0] port``."""
    section, *keys = loc
    return f"[{section}]" + "".join(f"[{key}]" if isinstance(key, int) else f" {key}" for key in keys)


def _invalid(message: str) -> LiverfatError:
    return LiverfatError(Reason.CONFIG_INVALID, message)
