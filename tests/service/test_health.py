"""Health verdicts (pure) and the HTTP endpoints on a real socket: /healthz, the token on / and /metrics."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from liverfat import __version__
from liverfat.service.config import HttpSection
from liverfat.service.health import NodeStatus, assess
from liverfat.service.http_server import HttpServer
from liverfat.service.spool import PROCESSING_BUCKETS_S, DestinationBacklog, JobState, OutboxState, SpoolCounts
from liverfat.service.workers import ModelState, QueueInfo, WorkerInfo

LOADED = ModelState(loaded=True, detail="phantom 1 on cpu", at=9_000.0)
NO_WEIGHTS = ModelState(loaded=False, detail="the default model's weights (pyliverlesionseg 0.3) are not in /x: run "
                        "`liverfat models fetch`", at=9_000.0)  # fmt: skip


def counts(**changes: object) -> SpoolCounts:
    base = SpoolCounts(
        jobs={state: 0 for state in JobState}, outbox={state: 0 for state in OutboxState}, instances=0,
        send_failures=0, processing_count=0, processing_sum_s=0.0,
        processing_buckets={le: 0 for le in PROCESSING_BUCKETS_S}, oldest_pending_send_at=None,
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def worker(name: str = "worker-0", **changes: object) -> WorkerInfo:
    base = WorkerInfo(name=name, host="ct-node", device="cpu", up=True, restarts=0, jobs_done=0, last_seen=10_000.0,
                      model=LOADED)  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def status(**changes: object) -> NodeStatus:
    base = NodeStatus(counts=counts(), spool_free_bytes=10 * 2**30, min_free_bytes=2**20, destinations=1,
                      nearly_full_bytes=2**30, listener_up=True, workers=(worker(),), time=10_000.0)  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


def one_worker(**changes: object) -> NodeStatus:
    """The default single-worker node with its worker changed."""
    return status(workers=(replace(worker(), **changes),))  # type: ignore[arg-type]


def test_a_running_node_with_a_loaded_model_and_a_destination_is_healthy_without_warnings() -> None:
    health = assess(status())
    assert health.ok and health.problems == () and health.warnings == ()


def test_a_dead_worker_or_listener_or_full_spool_is_a_problem() -> None:
    assert assess(one_worker(up=False)).problems == ("the worker process is not running",)
    (restarted,) = assess(one_worker(up=False, restarts=3)).problems
    assert restarted == "the worker process is not running (it died 3 time(s) since the node started; see the log)"
    assert "listener is not running" in assess(status(listener_up=False)).problems[0]
    full = assess(status(spool_free_bytes=100))
    assert not full.ok and "new instances are refused" in full.problems[0]


def test_a_model_that_cannot_load_is_a_problem_naming_why_and_one_still_loading_a_warning() -> None:
    (problem,) = assess(one_worker(model=NO_WEIGHTS)).problems
    assert problem == (f"the model cannot be loaded: {NO_WEIGHTS.detail}; every series fails until this is fixed "
                       "(last try 1970-01-01T02:30:00Z)")
    loading = assess(one_worker(model=None))
    (waiting,) = loading.warnings
    assert loading.ok and waiting == "the worker is loading the model; series wait in the queue until it is loaded"


def test_with_several_workers_each_dead_one_and_each_model_failure_is_named() -> None:
    gpu = worker("worker-1", device="cuda:1", up=False, restarts=2, model=NO_WEIGHTS)
    health = assess(status(workers=(worker(), gpu)))
    assert health.problems == (
        "the worker process worker-1 (cuda:1) is not running (it died 2 time(s) since the node started; see the log)",
        (f"the model cannot be loaded on worker-1 (cuda:1): {NO_WEIGHTS.detail}; the series they take fail until "
         "this is fixed (last try 1970-01-01T02:30:00Z)"),
    )
    loading = assess(status(workers=(worker(), worker("worker-1", model=None))))
    assert loading.ok and loading.warnings == (
        "loading the model: worker-1 (cpu); series wait in the queue until a worker has it loaded",
    )


FLEET = QueueInfo(broker="amqp://liverfat:***@mq:5672//", connected=True, waiting=0, in_flight=1, dead_lettered=0)


def test_fleet_health_is_the_broker_and_a_worker_seen_while_series_wait_and_dead_letters_warn() -> None:
    remote = worker("liverfat@gpu1-cuda0", device="cuda:0", last_seen=9_990.0, model=None)
    assert assess(status(workers=(remote,), queue=FLEET)).ok
    (down,) = assess(status(workers=(remote,), queue=replace(FLEET, connected=False))).problems
    assert down.startswith("the broker amqp://liverfat:***@mq:5672// cannot be reached")
    silent = replace(remote, up=False, last_seen=10_000.0 - 61)
    unserved = assess(status(workers=(silent,), queue=replace(FLEET, waiting=3, dead_lettered=2)))
    assert unserved.problems == (
        "3 series wait in the broker's queue and no worker seen for 1 min 1 s: start `liverfat worker` on a GPU host",
    )
    assert unserved.warnings[0] == "worker liverfat@gpu1-cuda0 on ct-node (cuda:0) is gone (last seen 1970-01-01T02:45:39Z)"
    assert unserved.warnings[1].startswith("2 series dead-lettered")
    assert assess(status(workers=(), queue=replace(FLEET, waiting=1))).problems[0].startswith(
        "1 series wait in the broker's queue and no worker has been seen")


def test_a_spool_within_the_margin_above_the_minimum_is_nearly_full_and_red() -> None:
    just_above = 2**20 + 2**30 - 1  # min_free + margin - 1 byte
    (problem,) = assess(status(spool_free_bytes=just_above)).problems
    assert problem.startswith("spool is nearly full: 1024 MiB free; new instances are refused below 1 MiB")
    assert assess(status(spool_free_bytes=2**20 + 2**30)).ok
    assert assess(status(spool_free_bytes=just_above, nearly_full_bytes=0)).ok


def test_missing_destination_failed_sends_and_stale_results_are_warnings() -> None:
    jobs = {state: 0 for state in JobState} | {JobState.FAILED: 2}
    outbox = {state: 0 for state in OutboxState} | {OutboxState.FAILED: 3}
    health = assess(status(destinations=0, counts=counts(jobs=jobs, outbox=outbox, oldest_pending_send_at=1.0)))
    assert health.ok
    text = " | ".join(health.warnings)
    assert "no destination configured" in text and "3 result file(s) could not be sent" in text
    assert "waited 2.8 h" in text and "2 series failed" in text


FAILING = DestinationBacklog("PACS@10.0.0.5:104", pending=4, failing_since=9_800.0,
                             last_error="association with PACS@10.0.0.5:104 failed: connection refused")  # fmt: skip


def test_a_failing_destination_is_a_warning_then_a_problem_after_unhealthy_after_s_with_its_name_reason_and_since() -> None:
    waiting = DestinationBacklog("BACKUP@10.0.0.6:104", pending=2, failing_since=None, last_error=None)
    early = assess(status(counts=counts(destinations=(FAILING, waiting)), unhealthy_after_s=300.0))
    assert early.ok and early.problems == ()
    (warning,) = early.warnings
    assert warning == ("destination PACS@10.0.0.5:104 failing since 1970-01-01T02:43:20Z (3 min 20 s): association "
                       "with PACS@10.0.0.5:104 failed: connection refused; 4 result file(s) wait")  # fmt: skip
    late_status = status(counts=counts(destinations=(FAILING, waiting)), unhealthy_after_s=180.0)
    late = assess(late_status)
    assert not late.ok and late.problems == (warning,) and late.warnings == ()
    assert late.to_json(late_status)["destinations_failing"] == [
        {"destination": "PACS@10.0.0.5:104", "failing_since": "1970-01-01T02:43:20Z", "failing_s": 200.0,
         "reason": "association with PACS@10.0.0.5:104 failed: connection refused", "waiting": 4}
    ]  # fmt: skip


def test_healthz_json_carries_the_version_model_and_worker_restarts() -> None:
    current = one_worker(model=NO_WEIGHTS, restarts=2)
    body = assess(current).to_json(current)
    assert body["version"] == __version__ and body["status"] == "unhealthy" and body["worker_restarts"] == 2
    assert body["model"] == {"loaded": False, "detail": NO_WEIGHTS.detail, "at": "1970-01-01T02:30:00Z"}


# -- the HTTP server on a real socket ------------------------------------------------------

TOKEN = "correct-horse-battery-staple"
REPORT: dict[str, Any] = {
    "version": __version__, "generated_at": "2026-12-07T10:00:00Z",
    "node": {"ae_title": "LIVERFAT", "port": 11112, "running": True, "spool": "/s", "spool_free_mib": 10,
             "destinations": []},
    "health": {"ok": True, "problems": [], "warnings": []}, "model": None, "workers": [], "queue": None,
    "series": {}, "outbox": {},
    "instances_received": 0, "send_failures": 0, "destinations": [], "recent": [], "job_errors": [], "send_errors": [],
}  # fmt: skip


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, NodeStatus]]]:
    current = {"status": status()}
    started = HttpServer(HttpSection(host="127.0.0.1", port=0, token=TOKEN), lambda: current["status"], lambda: REPORT)
    started.start()
    yield f"http://127.0.0.1:{started.port}", current
    started.stop()


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_healthz_answers_200_when_healthy_and_503_with_the_reason_when_not(
    server: tuple[str, dict[str, NodeStatus]],
) -> None:
    base, current = server
    code, body = get(f"{base}/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok", "/healthz needs no token"
    for unhealthy, reason in [
        (one_worker(up=False), "the worker process is not running"),
        (one_worker(model=NO_WEIGHTS), "the model cannot be loaded: the default model's weights"),
        (status(spool_free_bytes=2**29), "spool is nearly full: 512 MiB free"),
        (status(counts=counts(destinations=(FAILING,)), unhealthy_after_s=60.0),
         "destination PACS@10.0.0.5:104 failing since"),
    ]:  # fmt: skip
        current["status"] = unhealthy
        code, body = get(f"{base}/healthz")
        assert code == 503 and json.loads(body)["problems"][0].startswith(reason), body


def test_the_token_guards_the_page_and_metrics_as_bearer_header_or_query(
    server: tuple[str, dict[str, NodeStatus]],
) -> None:
    base, _ = server
    for path in ("/", "/metrics"):
        assert get(f"{base}{path}")[0] == 401
        assert get(f"{base}{path}?token=wrong")[0] == 401
        assert get(f"{base}{path}", {"Authorization": "Bearer wrong"})[0] == 401
        assert get(f"{base}{path}?token={TOKEN}")[0] == 200
        assert get(f"{base}{path}", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert get(f"{base}/nothing")[0] == 404
