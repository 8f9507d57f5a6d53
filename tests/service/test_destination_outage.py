"""A destination outage with a real Orthanc: the node's health names the destination, and its return is noticed fast.

Orthanc routes a phantom CT to the node and is stopped while the node processes it, so the
results find their destination down. ``/healthz`` must answer 503 naming Orthanc, the reason and
since when once ``[send] unhealthy_after_s`` has passed, ``liverfat status`` must show it, and
after Orthanc starts again the results must be in it within 30 s, although the retry backoff
alone would wait 120 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from liverfat.service.spool import JobState
from tests.orthanc import OrthancServer
from tests.service.conftest import phantom_series
from tests.service.node_process import NodeProcess, wait_for
from tests.service.test_orthanc_e2e import all_results_arrived, orthanc_and_node

pytestmark = pytest.mark.slow

UNHEALTHY_AFTER_S = 5.0
FIRST_RETRY_S = 120.0  # the backoff's first delay: only the C-ECHO probe can bring the results back in time
OUTAGE_S = 25.0  # Orthanc stays down at least this long (two probe intervals and more)
RETURN_LIMIT_S = 30.0
LIVERFAT = Path(sys.executable).with_name("liverfat")
_HEALTH = (
    "import json, sys, urllib.error, urllib.request\n"
    "try:\n"
    "    answer = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
    "except urllib.error.HTTPError as error:\n"
    "    answer = error\n"
    "print(json.dumps({'code': answer.code, 'body': json.load(answer)}))\n"
)


def healthz(orthanc: OrthancServer, node: NodeProcess) -> dict[str, Any]:
    """``GET /healthz`` from inside the namespace: ``{"code": 200 or 503, "body": {...}}``."""
    url = f"http://127.0.0.1:{node.config.http.port}/healthz"
    return dict(json.loads(orthanc.run(sys.executable, "-c", _HEALTH, url).stdout))


def send_failures(node: NodeProcess) -> int:
    spool = node.spool()
    try:
        return int(spool.query("SELECT COALESCE(SUM(failures), 0) AS n FROM outbox")[0]["n"])
    finally:
        spool.close()


def test_orthanc_down_turns_health_503_naming_it_and_its_return_gets_the_results_within_30_s(tmp_path: Path) -> None:
    files = phantom_series(tmp_path / "ct")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    send = {"unhealthy_after_s": UNHEALTHY_AFTER_S, "first_delay_s": FIRST_RETRY_S, "max_delay_s": 600.0}
    with orthanc_and_node(tmp_path, send=send) as (orthanc, node):
        destination = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        node.start(delay_s=5.0)
        orthanc.store(files, calling_aet="MODALITY")
        wait_for(lambda: node.state() is JobState.PROCESSING, 60, "the node to start processing")
        orthanc.stop()
        down = time.monotonic()
        wait_for(lambda: send_failures(node), 60, "the results to fail at the stopped Orthanc")
        early = healthz(orthanc, node)
        assert early["code"] == 200, "a failure younger than unhealthy_after_s is only a warning"
        assert any(w.startswith(f"destination {destination} failing since") for w in early["body"]["warnings"])

        unhealthy = wait_for(lambda: (h := healthz(orthanc, node))["code"] == 503 and h, 30, "/healthz to answer 503")
        (problem,) = unhealthy["body"]["problems"]
        assert problem.startswith(f"destination {destination} failing since ")
        assert "connection refused" in problem and "4 result file(s) wait" in problem
        (failing,) = unhealthy["body"]["destinations_failing"]
        assert failing["destination"] == destination and failing["failing_s"] >= UNHEALTHY_AFTER_S

        status = subprocess.run([str(LIVERFAT), "status", "--config", str(node.config_path)], capture_output=True,
                                text=True, check=True, timeout=60).stdout  # fmt: skip
        assert f"destination {destination} failing since" in status and "connection refused" in status

        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down)))
        spool = node.spool()
        attempts = [row["attempts"] for row in spool.query("SELECT attempts FROM outbox")]
        spool.close()
        assert attempts == [1] * 4, "while Orthanc is down it is probed; no result uses up an attempt"

        orthanc.start()
        back = time.monotonic()
        wait_for(lambda: all_results_arrived(orthanc, study_uid), RETURN_LIMIT_S, "the results after Orthanc's return")
        delay_s = time.monotonic() - back
        print(f"results in Orthanc {delay_s:.1f} s after it answered again (outage {back - down:.0f} s)")
        assert wait_for(lambda: healthz(orthanc, node)["code"] == 200, 10, "/healthz to answer 200 again")
    assert delay_s < RETURN_LIMIT_S
