#!/usr/bin/env python3
"""Serve the prebuilt OHIF v3 viewer and Orthanc's DICOMweb API from one origin.

OHIF is a single-page application: its files come from ``--dist`` (the ``package/dist``
folder of the npm package ``@ohif/app``), every unknown path without a file extension
answers ``index.html`` (so ``/viewer?StudyInstanceUIDs=...`` works after a reload), and
``/app-config.js`` is replaced by ``--app-config``. Requests under ``/dicom-web`` and
``/wado`` are forwarded unchanged to Orthanc, so the browser sees a single origin and
needs no CORS. Standard library only, so it runs with any Python 3.11.

It binds ``--host`` (default 127.0.0.1): anyone who can reach this port can read every
study in Orthanc, so put an authenticating reverse proxy in front before exposing it.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import logging
import mimetypes
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

logger = logging.getLogger("serve_ohif")

PROXIED_PREFIXES = ("/dicom-web", "/wado")
# The Host header is forwarded unchanged: Orthanc's DICOMweb plugin builds the absolute
# BulkDataURI values in its metadata from it, and they must point back at this origin.
HOP_BY_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
     "transfer-encoding", "upgrade"}
)
# a missing file with one of these suffixes is a real 404; any other path is a route of the app
ASSET_SUFFIXES = frozenset(
    {".js", ".mjs", ".css", ".map", ".wasm", ".json", ".png", ".svg", ".ico", ".woff", ".woff2", ".html", ".txt"}
)
COPY_CHUNK_BYTES = 256 * 1024
UPSTREAM_TIMEOUT_S = 120.0

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")


class OhifHandler(SimpleHTTPRequestHandler):
    """Static files with SPA fallback, plus a pass-through proxy to Orthanc."""

    protocol_version = "HTTP/1.1"
    app_config: Path
    upstream: urllib.parse.SplitResult
    upstream_auth: str | None

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if self._is_proxied():
            self._proxy()
        else:
            super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if self._is_proxied():
            self._proxy()
        else:
            super().do_HEAD()

    def do_POST(self) -> None:  # noqa: N802 (STOW-RS)
        if self._is_proxied():
            self._proxy()
        else:
            self.send_error(405)

    def translate_path(self, path: str) -> str:
        request_path = urllib.parse.urlsplit(path).path
        if request_path == "/app-config.js":
            return str(self.app_config)
        local = Path(super().translate_path(path))
        if not local.exists() and Path(request_path).suffix.lower() not in ASSET_SUFFIXES:
            return str(Path(self.directory) / "index.html")  # SPA route such as /viewer
        return str(local)

    def end_headers(self) -> None:
        if not self._is_proxied():
            self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base-class signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def _is_proxied(self) -> bool:
        path = urllib.parse.urlsplit(self.path).path
        return any(path == prefix or path.startswith(prefix + "/") for prefix in PROXIED_PREFIXES)

    def _proxy(self) -> None:
        body = None
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            body = self.rfile.read(length)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP_HEADERS}
        if self.upstream_auth:
            headers["Authorization"] = self.upstream_auth
        connection = http.client.HTTPConnection(
            self.upstream.hostname or "127.0.0.1", self.upstream.port or 80, timeout=UPSTREAM_TIMEOUT_S
        )
        try:
            connection.request(self.command, self.upstream.path.rstrip("/") + self.path, body=body, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            logger.warning("Orthanc at %s did not answer %s: %s", self.upstream.geturl(), self.path, error)
            connection.close()
            self.send_error(502, f"Orthanc did not answer: {error}")
            return
        try:
            self.send_response(response.status, response.reason)
            payload_length = response.getheader("Content-Length")
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP_HEADERS:
                    self.send_header(name, value)
            if payload_length is None and self.command != "HEAD":
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                self._copy_body(response, chunked=payload_length is None)
        except (OSError, http.client.HTTPException) as error:  # the browser went away mid-answer
            logger.debug("relaying %s stopped: %s", self.path, error)
            self.close_connection = True
        finally:
            connection.close()

    def _copy_body(self, response: http.client.HTTPResponse, *, chunked: bool) -> None:
        while chunk := response.read(COPY_CHUNK_BYTES):
            if chunked:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            else:
                self.wfile.write(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def make_server(
    dist: Path, app_config: Path, upstream_url: str, host: str, port: int, credentials: str | None = None
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for OHIF at ``http://host:port/``."""
    upstream = urllib.parse.urlsplit(upstream_url)
    auth = "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None
    handler = type(
        "ConfiguredOhifHandler",
        (OhifHandler,),
        {"app_config": app_config.resolve(), "upstream": upstream, "upstream_auth": auth},
    )

    def factory(*args: Any, **kwargs: Any) -> OhifHandler:
        return handler(*args, directory=str(dist.resolve()), **kwargs)

    server = ThreadingHTTPServer((host, port), factory)
    server.daemon_threads = True
    return server


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, required=True, help="OHIF package/dist folder (see install_ohif.sh)")
    parser.add_argument("--app-config", type=Path, default=here / "app-config.js")
    parser.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc base URL (DICOMweb plugin on)")
    parser.add_argument(
        "--orthanc-user", default=None, help="USER:PASSWORD for Orthanc, when its AuthenticationEnabled is true"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s")
    if not (args.dist / "index.html").is_file():
        parser.error(f"{args.dist} has no index.html: expected the package/dist folder of @ohif/app")
    server = make_server(args.dist, args.app_config, args.orthanc, args.host, args.port, args.orthanc_user)
    logger.info("OHIF on http://%s:%d/ (DICOMweb from %s)", args.host, server.server_port, args.orthanc)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
