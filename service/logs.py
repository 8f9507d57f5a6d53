"""Log setup for the node's processes: text or one JSON object per line, on stderr.

Library modules only call ``logging.getLogger(__name__)``; this is the one place that
installs handlers (the node's main process and its worker process each call it once).
Messages at INFO and above carry UIDs, AE titles, states and numbers, never patient
names or IDs; pynetdicom, pydicom and highdicom are kept at WARNING unless the level is
DEBUG, because their INFO and DEBUG output can echo dataset contents.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from liverfat.service.config import LogSection

TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("pynetdicom", "pydicom", "highdicom")
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


def configure_logging(section: LogSection) -> None:
    """Replace the root logger's handlers with one stderr handler in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if section.format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = logging.getLevelName(section.level.upper())
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if level == logging.DEBUG else max(level, logging.WARNING))
