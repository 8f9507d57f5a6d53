"""Log setup for the node's processes: text or one JSON object per line, on stderr.

Library modules only call ``logging.getLogger(__name__)``; this is the one place that
installs handlers (the node's main process and its worker process each call it once).
Messages at INFO and above carry UIDs, AE titles, states and numbers, never patient
names or IDs. pynetdicom, pydicom and highdicom are kept at WARNING unless the level is
DEBUG, because their INFO and DEBUG output can echo dataset contents; so can the text of
pydicom's and highdicom's warnings (a person name without ``^`` is quoted back, for one),
and of every Python warning: below DEBUG those records keep their origin and lose their text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from liverfat.service.config import LogSection

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("pynetdicom", "pydicom", "highdicom")
DATASET_ECHOING_LOGGERS = ("pydicom", "highdicom", "py.warnings")  # their text may quote data set values
WARNINGS_LOGGER = "py.warnings"  # the logger Python's warnings go to (as with logging.captureWarnings)
WITHHELD = "text withheld: it may quote data set values ([log] level = DEBUG shows it)"
RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, process, message, and any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        data.update({k: v for k, v in vars(record).items() if k not in RECORD_ATTRIBUTES})
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class WithholdDatasetText(logging.Filter):
    """Replace the text of records from loggers that may quote data set values by where they came from."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pydicom" and record.funcName == "warn_and_log":
            return False  # pydicom logs and warns the same text; the warning is logged, once per text
        if any(record.name == name or record.name.startswith(name + ".") for name in DATASET_ECHOING_LOGGERS):
            origin = f"{'/'.join(Path(record.pathname).parts[-2:])}:{record.lineno}"
            what = getattr(record, "category", f"{record.name} message")
            record.msg, record.args = f"{what} at {origin} ({WITHHELD})", None
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


class ConnectionErrorsInOneLine(logging.Filter):
    """pynetdicom logs a traceback with each connection error (a peer gone mid-PDU, a failed TLS handshake): one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("pynetdicom") and isinstance(error, OSError):
            record.msg, record.args = f"{type(error).__name__}: {record.getMessage()}", None
            record.exc_info, record.exc_text = None, None
        return True


def log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                file: TextIO | None = None, line: str | None = None) -> None:  # fmt: skip
    """``warnings.showwarning`` for the node: a WARNING record on ``py.warnings`` that keeps the origin.

    ``logging.captureWarnings`` logs the formatted text only, from logging's own file and line;
    this record's path, line and ``category`` are the warning's, so a withheld record still says
    which library and line it was.
    """
    logger = logging.getLogger(WARNINGS_LOGGER)
    record = logger.makeRecord(logger.name, logging.WARNING, filename, lineno, "%s: %s",
                               (category.__name__, message), None, extra={"category": category.__name__})  # fmt: skip
    logger.handle(record)


def configure_logging(section: LogSection) -> None:
    """Replace the root logger's handlers with one stderr handler in the configured format.

    Python warnings become log records (``log_warning``); below DEBUG the records of
    ``DATASET_ECHOING_LOGGERS`` carry their origin but not their text.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if section.format == "json" else logging.Formatter(TEXT_FORMAT))
    level = logging.getLevelName(section.level.upper())
    handler.addFilter(ConnectionErrorsInOneLine())
    if level != logging.DEBUG:
        handler.addFilter(WithholdDatasetText())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level == logging.DEBUG else max(level, logging.WARNING))
    warnings.showwarning = log_warning
