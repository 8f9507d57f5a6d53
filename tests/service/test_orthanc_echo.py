"""A real Orthanc's C-ECHO to the node is ordinary negotiation: nothing logged at WARNING (issue 18 item 11).

Orthanc proposes more presentation contexts than Verification with its C-ECHO; the node
refuses those and says so at DEBUG only. Orthanc and the node run in one private network
namespace (``tests/orthanc.py``); the echo is Orthanc's REST ``/modalities/LIVERFAT/echo``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests.service.test_orthanc_e2e import orthanc_and_node

pytestmark = pytest.mark.slow

_POST = (
    "import sys, urllib.request\n"
    "request = urllib.request.Request(sys.argv[1], data=b'{}', method='POST')\n"
    "with urllib.request.urlopen(request, timeout=30) as answer:\n"
    "    sys.stdout.write(answer.read().decode())\n"
)
LEVEL = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.MULTILINE)


def test_orthanc_echoes_log_nothing_at_warning(tmp_path: Path) -> None:
    with orthanc_and_node(tmp_path, log={"level": "DEBUG"}) as (orthanc, node):
        node.start()
        for _ in range(3):
            answer = orthanc.run(sys.executable, "-c", _POST,
                                 f"http://127.0.0.1:{orthanc.http_port}/modalities/LIVERFAT/echo")  # fmt: skip
            assert answer.stdout.strip() == "{}", answer.stdout
        log = node.run_log()
    assert log.count("C-ECHO from ORTHANC") == 3
    loud = [line for line in log.splitlines() if (m := LEVEL.match(line)) and m.group(1) in ("WARNING", "ERROR")]
    assert loud == [], "\n".join(loud)
    refusals = [line for line in log.splitlines() if "refused" in line and "from ORTHANC" in line]
    assert refusals and all(" DEBUG " in line for line in refusals), "Orthanc's extra contexts are refused quietly"
