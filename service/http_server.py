"""The node's HTTP endpoints: ``/`` (status page), ``/healthz`` and ``/metrics``, on one read-only server.

The server is the standard library's ``ThreadingHTTPServer`` on a daemon thread, bound to
``[http] host`` (loopback by default). With ``[http] token`` set, ``/`` and ``/metrics`` need it,
as ``Authorization: Bearer TOKEN`` (Prometheus' ``authorization`` scrape setting) or as
``?token=TOKEN`` (a browser); ``/healthz`` stays open, so load balancers and monitors that
cannot send a header keep working: it shows counts, destination names and their errors, no
series and no patient data.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import HttpSection
from liverfat.service.health import NodeStatus, assess
from liverfat.service.metrics import exposition, node_registry
from liverfat.service.status_page import render_status_page

log = logging.getLogger(__name__)

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",  # no script, nothing fetched
    "Referrer-Policy": "no-referrer",  # a ?token= in the address is not passed on
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


class HttpServer:
    """The three endpoints; ``status`` is called once per request, ``report`` once per page."""

    def __init__(self, http: HttpSection, status: Callable[[], NodeStatus],
                 report: Callable[[], dict[str, Any]]) -> None:  # fmt: skip
        handler = _handler_class(status, report, http.token)
        try:
            self._server = ThreadingHTTPServer((http.host, http.port), handler)
        except OSError as error:
            why = f"cannot listen on {http.host}:{http.port} ([http] host, port): {error}"
            raise LiverfatError(Reason.CONFIG_INVALID, why) from error
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="liverfat-http", daemon=True)
        self._protected = http.token is not None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        host = self._server.server_address[0]
        log.info("status page on http://%s:%d/%s, /healthz and /metrics", host, self.port,
                 " (token required for / and /metrics)" if self._protected else "")  # fmt: skip
        if not self._protected and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("the status page and /metrics on %s:%d are open to anyone who can reach them: set [http] "
                        "token, or host = \"127.0.0.1\"", host, self.port)  # fmt: skip

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _handler_class(status: Callable[[], NodeStatus], report: Callable[[], dict[str, Any]],
                   token: str | None) -> type[BaseHTTPRequestHandler]:  # fmt: skip
    registry = node_registry(status)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            url = urlsplit(self.path)
            if url.path == "/healthz":
                current = status()
                health = assess(current)
                self._reply(200 if health.ok else 503, "application/json",
                            (json.dumps(health.to_json(current), indent=2) + "\n").encode())  # fmt: skip
            elif url.path not in ("/", "/metrics"):
                self._reply(404, "text/plain; charset=utf-8", b"try /, /healthz or /metrics\n")
            elif token is not None and not _authorised(token, self.headers.get("Authorization"), url.query):
                self._reply(401, "text/plain; charset=utf-8", b"a token is needed ([http] token): send "
                            b"'Authorization: Bearer TOKEN' or add ?token=TOKEN\n",
                            {"WWW-Authenticate": 'Bearer realm="liverfat"'})  # fmt: skip
            elif url.path == "/metrics":
                body, content_type = exposition(registry, self.headers.get("Accept"))
                self._reply(200, content_type, body)
            else:
                self._reply(200, "text/html; charset=utf-8", render_status_page(report()).encode(), PAGE_HEADERS)

        def _reply(self, code: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            """One DEBUG line per request, without the query (it may hold the token)."""
            log.debug("http %s %s %s %s", self.client_address[0], self.command, urlsplit(self.path).path, code)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's signature)
            log.debug("http %s " + format, self.client_address[0], *args)

    return Handler


def _authorised(token: str, authorization: str | None, query: str) -> bool:
    """Whether the request carries ``token``, as a Bearer header or a ``token`` query parameter."""
    offered = list(parse_qs(query).get("token", []))
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer":
        offered.append(credentials.strip())
    return any(hmac.compare_digest(value.encode(), token.encode()) for value in offered)
