"""The read-only status page (``GET /``): the status report (``service/report.py``) as one HTML page.

Rendered on the server with ``html.escape`` around every value; no script, no external
resource, a refresh every ``REFRESH_S`` seconds by a meta tag. It shows what ``liverfat status``
shows and no patient data (see ``service/report.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from liverfat.service.report import local_time

REFRESH_S = 30
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
th { background: #f3f3f3; } .time { white-space: nowrap; }
.uid { font-family: monospace; font-size: 0.9em; word-break: break-all; } td .uid { display: inline-block; max-width: 24em; }
.ok { color: #176117; } .bad { color: #a40000; font-weight: bold; } .warn { color: #8a5a00; }
.verdict { padding: 0.4em 0.8em; display: inline-block; border-radius: 4px; }
.verdict.ok { background: #e3f4e3; } .verdict.bad { background: #fbe3e3; }
footer { margin-top: 2em; color: #666; font-size: 0.9em; }
"""


def render_status_page(report: dict[str, Any]) -> str:
    """The whole page for one status report."""
    node, health = report["node"], report["health"]
    title = f"liverfat {node['ae_title']}: {'healthy' if health['ok'] else 'UNHEALTHY'}"
    body = [
        f"<h1>liverfat node {_e(node['ae_title'])}</h1>",
        _verdict(health),
        _section("Node", _rows([
            ("version", report["version"]), ("DICOM port", node["port"]), ("spool", node["spool"]),
            ("spool free", f"{node['spool_free_mib']} MiB"), ("model", _model(report["model"])),
            ("page generated", report["generated_at"]),
        ])),
        _section("Queue", _rows([
            ("series", _counts(report["series"])), ("result files", _counts(report["outbox"])),
            ("instances received", report["instances_received"]), ("failed send attempts", report["send_failures"]),
            *_broker(report["queue"]),
        ])),
        _section("Workers", _workers(report["workers"])),
        _section("Destinations", _destinations(report["destinations"])),
        _section("Recent series", _recent(report["recent"])),
        _section("Errors", _errors(report["job_errors"], report["send_errors"])),
        ("<footer>Read-only. Series are named by their Series Instance UID: this page shows no patient name, ID or "
         f"accession number. Refreshes every {REFRESH_S} s.</footer>"),
    ]  # fmt: skip
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH_S}\"><title>{_e(title)}</title>"
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _verdict(health: dict[str, Any]) -> str:
    word = "healthy" if health["ok"] else "unhealthy"
    items = [f'<li class="bad">problem: {_e(p)}</li>' for p in health["problems"]]
    items += [f'<li class="warn">warning: {_e(w)}</li>' for w in health["warnings"]]
    listing = f"<ul>{''.join(items)}</ul>" if items else ""
    return f'<p id="health" class="verdict {"ok" if health["ok"] else "bad"}">Health: {word}</p>{listing}'


def _section(title: str, content: str) -> str:
    return f"<h2>{_e(title)}</h2>\n{content}"


def _rows(pairs: Iterable[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>" for key, value in pairs) + "</table>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    """A table of already escaped cells, or ``empty`` as a paragraph."""
    if not rows:
        return f"<p>{_e(empty)}</p>"
    head = "".join(f"<th>{_e(name)}</th>" for name in header)
    return f"<table><tr>{head}</tr>" + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                                               for row in rows) + "</table>"  # fmt: skip


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{state} {n}" for state, n in counts.items())


def _model(model: dict[str, Any] | None) -> str:
    if model is None:
        return "not reported yet"
    return str(model["detail"]) if model["loaded"] else f"NOT LOADED: {model['detail']}"


def _broker(queue: dict[str, Any] | None) -> list[tuple[str, Any]]:
    """The fleet's broker queue rows (none in local mode)."""
    if queue is None:
        return []
    state = "connected" if queue["connected"] else "NOT CONNECTED"
    return [("broker", f"{queue['broker']} ({state})"), ("waiting in the broker", queue["waiting"]),
            ("in flight", queue["in_flight"]), ("dead-lettered", queue["dead_lettered"])]  # fmt: skip


def _workers(workers: list[dict[str, Any]] | None) -> str:
    if workers is None:
        return "<p>Not known here.</p>"
    rows = [[_e(w["name"]), _e(w["host"]), _e(w["device"]),
             '<span class="ok">up</span>' if w["up"] else '<span class="bad">DOWN</span>', _e(w["restarts"]),
             _e(w["jobs_done"]), f'<span class="time">{_e(w["last_seen"] or "never")}</span>',
             _e(_model(w["model"]))] for w in workers]  # fmt: skip
    return _table(("worker", "host", "device", "state", "restarts", "series done", "last seen", "model"), rows,
                  "No worker seen yet.")  # fmt: skip


def _destinations(destinations: list[dict[str, Any]]) -> str:
    css = {"ok": "ok", "failing": "warn", "unhealthy": "bad"}
    rows = [[_e(d["destination"]), f'<span class="{css[d["state"]]}">{_e(d["state"])}</span>', _e(d["waiting"]),
             f'<span class="time">{_e(d["failing_since"] or "")}</span>', _e(d["last_error"] or "")]
            for d in destinations]  # fmt: skip
    return _table(("destination", "state", "files waiting", "failing since", "last error"), rows,
                  "No destination configured: results stay in the spool ([send] destinations).")  # fmt: skip


def _recent(jobs: list[dict[str, Any]]) -> str:
    rows = [[f'<span class="time">{_e(local_time(job["updated_at"]))}</span>',
             f'<span class="uid">{_e(job["series_uid"])}</span> v{job["version"]}',
             _e(job["state"]), _e(job["grade"] or ""),
             _e("" if job["parenchymal_hu"] is None else f"{job['parenchymal_hu']:.1f} HU"),
             '<span class="warn">borderline</span>' if job["borderline"] else "",
             "<br>".join(f"{_e(r['code'])}: {_e(r['message'])}" for r in job["reasons"]),
             _e("" if job["processing_s"] is None else f"{job['processing_s']:.1f} s")] for job in jobs]  # fmt: skip
    return _table(("time", "series", "state", "grade", "DL-parenchymal", "borderline", "reasons", "took"), rows,
                  "No series received yet.")  # fmt: skip


def _errors(job_errors: list[dict[str, Any]], send_errors: list[dict[str, Any]]) -> str:
    rows = [[f'series <span class="uid">{_e(j["series_uid"])}</span> v{j["version"]}', _e(j["state"]),
             _e(j["last_error"])] for j in job_errors]  # fmt: skip
    rows += [[f'send {_e(e["file"])} of <span class="uid">{_e(e["series_uid"])}</span> to {_e(e["destination"])}',
              _e(f"{e['state']}, {e['attempts']} attempt(s)"), _e(e["error"])] for e in send_errors]  # fmt: skip
    return _table(("what", "state", "error"), rows, "No errors.")
