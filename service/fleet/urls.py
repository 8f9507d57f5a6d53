"""Broker URLs as they may be shown: the password replaced (logs, status page, ``config check``).

Apart from ``broker.py`` so that ``liverfat config check`` uses it without importing Celery.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit


def redacted(url: str | None) -> str:
    """``url`` with its password replaced by ``***`` (the form every log line and status page shows)."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return SplitResult(parts.scheme, netloc, parts.path, parts.query, parts.fragment).geturl()
