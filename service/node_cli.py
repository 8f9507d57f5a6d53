"""``liverfat serve``, ``status``, ``resend`` and ``retry``: argument parsing for the node's commands.

``add_node_commands`` is called by ``liverfat.service.cli.build_parser``; each command
loads the configuration and calls one library function.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import NodeConfig, load_config
from liverfat.service.diskspace import DiskSpace
from liverfat.service.health import Health, NodeStatus, assess
from liverfat.service.logs import configure_logging
from liverfat.service.report import status_report
from liverfat.service.spool import DB_NAME, Spool
from liverfat.service.workers import QueueInfo, WorkerInfo

HEALTH_TIMEOUT_S = 5.0


def add_node_commands(subparsers: Any) -> None:
    """Add ``serve``, ``status``, ``resend`` and ``retry`` to the ``liverfat`` parser's subcommands."""
    config_help = "TOML configuration file (default: embedded defaults); LIVERFAT_<SECTION>_<KEY> variables override it"
    serve = subparsers.add_parser("serve", help="run the DICOM node: receive CT, analyse it, send results back")
    serve.add_argument("--config", type=Path, help=config_help)
    serve.set_defaults(command=cmd_serve)

    status = subparsers.add_parser("status", help="the node's queue, last errors and recent series")
    status.add_argument("--config", type=Path, help=config_help)
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.set_defaults(command=cmd_status)

    resend = subparsers.add_parser("resend", help="queue the newest result of a series again for every destination")
    resend.add_argument("series_uid", metavar="SERIES_UID", help="the CT series' (0020,000E) Series Instance UID")
    resend.add_argument("--config", type=Path, help=config_help)
    resend.set_defaults(command=cmd_resend)

    retry = subparsers.add_parser("retry", help="process a series again (a new version) with every instance held")
    retry.add_argument("series_uid", metavar="SERIES_UID", help="the CT series' (0020,000E) Series Instance UID")
    retry.add_argument("--config", type=Path, help=config_help)
    retry.set_defaults(command=cmd_retry)


def cmd_serve(args: argparse.Namespace) -> int:
    from liverfat.service.node import run

    config = load_config(args.config)
    configure_logging(config.log)
    if getattr(args, "verbose", False):
        logging.getLogger().setLevel(logging.DEBUG)
    return run(config)


def cmd_status(args: argparse.Namespace) -> int:
    from liverfat.service.node import spool_in_use

    config = load_config(args.config)
    spool = _open_existing_spool(config)
    running = spool_in_use(config)
    status = NodeStatus(
        counts=spool.counts(),
        spool_free_bytes=shutil.disk_usage(config.spool.dir).free,
        min_free_bytes=config.spool.min_free_disk_mb * 2**20,
        nearly_full_bytes=config.spool.nearly_full_margin_mb * 2**20,
        destinations=len(config.send.destinations),
        spool_full=running and DiskSpace(config.spool.dir).is_full(),
        unhealthy_after_s=config.send.unhealthy_after_s,
    )
    status, health = _health(config, status, running=running)
    report = status_report(config, status, health, spool, running=running)
    spool.close()
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0


def _health(config: NodeConfig, status: NodeStatus, *, running: bool) -> tuple[NodeStatus, Health]:
    """The verdict on ``status`` completed by the running node's own state (listener, worker, model)."""
    if not running:
        local = assess(status)
        stopped = "the node is not running (no `liverfat serve` holds this spool)"
        return status, replace(local, ok=False, problems=(stopped, *local.problems))
    if not config.http.port:
        why = "the node runs without its HTTP server ([http] port = 0): worker and model state not shown"
    else:
        host = "127.0.0.1" if config.http.host in ("0.0.0.0", "::", "") else config.http.host
        url = f"http://{host}:{config.http.port}/healthz"
        try:
            status = _with_node_state(status, url)
            return status, assess(status)
        except (OSError, ValueError, KeyError, TypeError) as error:
            why = f"cannot ask the running node at {url} ({error}): worker and model state not shown"
    local = assess(status)
    return status, replace(local, warnings=(*local.warnings, why))


def _with_node_state(status: NodeStatus, url: str) -> NodeStatus:
    """``status`` with what only the running node knows, from its ``/healthz`` (a 503 answer carries it too)."""
    try:
        with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as error:
        body = json.load(error)
    workers, queue = body["workers"], body["queue"]
    return replace(status, listener_up=body["listener_up"],
                   workers=None if workers is None else tuple(WorkerInfo.from_json(w) for w in workers),
                   queue=None if queue is None else QueueInfo.from_json(queue))  # fmt: skip


def cmd_resend(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not config.send.destinations:
        raise LiverfatError(Reason.CONFIG_INVALID, "no destination configured: set [send] destinations first")
    spool = _open_existing_spool(config)
    job = spool.requeue_series(args.series_uid, [str(d) for d in config.send.destinations])
    spool.close()
    targets = ", ".join(str(d) for d in config.send.destinations)
    print(f"queued {len(job.outputs)} file(s) of series {job.series_uid} (version {job.version}) for {targets}; "
          "a running node sends them within seconds, a stopped one when it starts")  # fmt: skip
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    spool = _open_existing_spool(config)
    try:
        job, queued = spool.retry_series(args.series_uid)
    finally:
        spool.close()
    if not queued:
        print(f"series {job.series_uid} v{job.version} is {job.state.value}: it is processed without a retry")
        return 0
    print(f"queued series {job.series_uid} as version {job.version}: a running node processes it within seconds, "
          "a stopped one when it starts")  # fmt: skip
    return 0


def format_status(report: dict[str, Any]) -> str:
    node = report["node"]
    model = report["model"]
    lines = [
        f"node {node['ae_title']} (port {node['port']}, liverfat {report['version']}): "
        + ("running" if node["running"] else "not running"),
        f"spool {node['spool']} ({node['spool_free_mib']} MiB free)",
        "destinations: " + (", ".join(f"{d['destination']} {d['state']} ({d['waiting']} waiting)"
                                      for d in report["destinations"]) or "NONE (results are sent nowhere)"),
        "series: " + ", ".join(f"{state} {n}" for state, n in report["series"].items()),
        "outbox: " + ", ".join(f"{state} {n}" for state, n in report["outbox"].items())
        + f" (failed attempts so far: {report['send_failures']})",
        f"instances received: {report['instances_received']}",
    ]  # fmt: skip
    if model is not None:
        lines.append(f"model: {model['detail']}" if model["loaded"] else f"model: NOT LOADED: {model['detail']}")
    queue = report["queue"]
    if queue is not None:
        lines.append(f"broker {queue['broker']} ({'connected' if queue['connected'] else 'NOT CONNECTED'}): "
                     f"{queue['waiting']} waiting, {queue['in_flight']} in flight, {queue['dead_lettered']} "
                     "dead-lettered")  # fmt: skip
    if report["workers"] is not None:
        lines.append("workers:" + ("" if report["workers"] else " none seen yet"))
        lines += [_worker_line(worker) for worker in report["workers"]]
    lines += [f"PROBLEM: {p}" for p in report["health"]["problems"]]
    lines += [f"warning: {w}" for w in report["health"]["warnings"]]
    if report["recent"]:
        lines.append("recent series:")
        lines += [_recent_line(job) for job in report["recent"]]
    if report["job_errors"] or report["send_errors"]:
        lines.append("last errors:")
        lines += [f"  series {j['series_uid']} v{j['version']} ({j['state']}): {j['last_error']}"
                  for j in report["job_errors"]]  # fmt: skip
        lines += [f"  send {e['file']} of {e['series_uid']} to {e['destination']} ({e['state']}, {e['attempts']} "
                  f"attempts): {e['error']}" for e in report["send_errors"]]  # fmt: skip
    return "\n".join(lines)


def _worker_line(worker: dict[str, Any]) -> str:
    state = "up" if worker["up"] else f"DOWN (last seen {worker['last_seen'] or 'never'})"
    model = worker["model"]
    loaded = "" if model is None else f", model {'loaded' if model['loaded'] else 'NOT LOADED'}"
    return (f"  {worker['name']} on {worker['host']} ({worker['device']}): {state}, {worker['jobs_done']} series "
            f"done, {worker['restarts']} restart(s){loaded}")  # fmt: skip


def _recent_line(job: dict[str, Any]) -> str:
    grade = f"  {job['grade']}" if job["grade"] else ""
    borderline = "  BORDERLINE" if job["borderline"] else ""
    took = "" if job["processing_s"] is None else f"  {job['processing_s']:.1f} s"
    reasons = f"\n      reasons: {', '.join(r['code'] for r in job['reasons'])}" if job["reasons"] else ""
    note = f"\n      note: {job['note']}" if job["note"] else ""
    return f"  {_when(job['updated_at'])}  {job['series_uid']} v{job['version']}  {job['state']}{grade}" + (
        _hu(job["parenchymal_hu"]) + borderline + took + reasons + note
    )


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _hu(value: float | None) -> str:
    return "" if value is None else f"  {value:.1f} HU"


def _open_existing_spool(config: NodeConfig) -> Spool:
    if not (config.spool.dir / DB_NAME).is_file():
        raise LiverfatError(Reason.CONFIG_INVALID, f"no spool at {config.spool.dir}: the node has not run with this "
                            "configuration (pass the same --config as `liverfat serve`)")  # fmt: skip
    return Spool(config.spool.dir)
