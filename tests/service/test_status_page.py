"""The status page at ``/``: rendered safely, and read by a real headless Chromium from a running node.

The node is the real one (a subprocess, the phantom backend as its model) with a real
destination; Chromium is Debian's ``/usr/bin/chromium`` (deploy/install-system-packages.sh), run
with ``--dump-dom`` for the content and ``--screenshot`` for the picture.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liverfat import __version__
from liverfat.service.spool import ENDED_STATES, JobState
from liverfat.service.status_page import render_status_page
from tests.phantom import SeriesHeader
from tests.service.conftest import phantom_series, storescu
from tests.service.node_process import NodeProcess, sending_node, wait_for
from tests.service.test_health import REPORT
from tests.service.test_sender import Receiver

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "page-token-42"
WINDOW = (1280, 1400)
VERDICT_GREEN = (227, 244, 227)  # status_page.STYLE: .verdict.ok background #e3f4e3


def test_every_value_on_the_page_is_escaped() -> None:
    job = {"series_uid": "1.2.3", "version": 1, "state": "rejected", "grade": "not graded", "parenchymal_hu": None,
           "borderline": None, "reasons": [{"code": "contrast", "message": "<script>alert(1)</script>"}],
           "processing_s": 0.5, "updated_at": 0.0}  # fmt: skip
    page = render_status_page({**REPORT, "recent": [job], "node": {**REPORT["node"], "ae_title": "A&B"}})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "liverfat node A&amp;B" in page and "No destination configured" in page and "No errors." in page


def test_the_page_lists_every_worker_and_the_broker_queue_when_there_is_one() -> None:
    gpu = {"name": "liverfat@gpu<1>-cuda0", "host": "gpu1", "device": "cuda:0", "up": False, "restarts": 0,
           "jobs_done": 12, "last_seen": "2026-12-07T10:00:00Z", "last_seen_s": 75.0,
           "model": {"loaded": False, "detail": "no weights"}}  # fmt: skip
    local = {**gpu, "name": "worker-0", "host": "ct-node", "device": "cpu", "up": True, "model": None}
    queue = {"broker": "amqp://liverfat:***@mq:5672//", "connected": False, "waiting": 7, "in_flight": 2,
             "dead_lettered": 1}  # fmt: skip
    page = render_status_page({**REPORT, "workers": [local, gpu], "queue": queue})
    assert "liverfat@gpu&lt;1&gt;-cuda0" in page and '<span class="bad">DOWN</span>' in page
    assert "NOT LOADED: no weights" in page and "not reported yet" in page and "2026-12-07T10:00:00Z" in page
    assert "amqp://liverfat:***@mq:5672// (NOT CONNECTED)" in page and "<th>dead-lettered</th><td>1</td>" in page
    assert "<h2>Workers</h2>\n<p>No worker seen yet.</p>" in render_status_page({**REPORT, "workers": []})


def chromium(home: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium (as root it needs --no-sandbox), its profile and caches under ``home``."""
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
               "--disable-background-networking", "--disable-extensions", f"--user-data-dir={home / 'profile'}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", *arguments]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, "HOME": str(home)})  # fmt: skip


@pytest.mark.slow
def test_chromium_shows_queue_series_grades_borderline_reasons_destinations_and_no_patient_data(
    tmp_path: Path, receiver: Receiver
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (Debian package chromium, deploy/install-system-packages.sh)")
    node: NodeProcess = sending_node(tmp_path, receiver.port, http={"token": TOKEN})
    node.start()
    try:
        borderline = phantom_series(tmp_path / "borderline", liver_hu=39.0)  # 1 HU under the threshold
        contrast = phantom_series(tmp_path / "contrast", SeriesHeader(contrast_agent="OMNIPAQUE 350"))
        for files in (borderline, contrast):
            assert storescu(node.config.node.port, files[0].parent, "+sd", "+r").returncode == 0
        wait_for(lambda: len(jobs := node.jobs()) == 2 and all(j.state in ENDED_STATES for j in jobs), 120,
                 "both series processed")  # fmt: skip
        by_state = {job.state: job for job in node.jobs()}
        assert set(by_state) == {JobState.DONE, JobState.REJECTED}
        wait_for(lambda: len(set(receiver.stored)) >= 4, 60, "the results at the destination")

        url = f"http://127.0.0.1:{node.config.http.port}/"
        refused = chromium(tmp_path, "--dump-dom", url).stdout
        assert "a token is needed" in refused and "Recent series" not in refused
        dom = chromium(tmp_path, "--dump-dom", f"{url}?token={TOKEN}").stdout
        shot = tmp_path / "status-page.png"
        chromium(tmp_path, f"--screenshot={shot}", f"{url}?token={TOKEN}")
    finally:
        assert node.terminate() == 0

    assert "Health: healthy" in dom and f"<td>{__version__}</td>" in dom
    assert "model</th><td>phantom-truth 1 on cpu</td>" in dom, "the worker reported its loaded model"
    assert "series</th><td>received 0, complete 0, processing 0, done 1, rejected 1, failed 0" in dom
    done, rejected = by_state[JobState.DONE], by_state[JobState.REJECTED]
    assert done.series_uid in dom and rejected.series_uid in dom
    assert f"{done.grade}</td><td>{done.parenchymal_hu:.1f} HU</td><td><span class=\"warn\">borderline</span>" in dom
    assert "contrast: " in dom  # the rejected series' reason, code and message
    assert f"PACS@127.0.0.1:{receiver.port}</td><td><span class=\"ok\">ok</span>" in dom
    assert "PHANTOM^LIVER" not in dom and "PHANTOM-001" not in dom, "no patient name or ID on the page"

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    green = np.all(image == VERDICT_GREEN, axis=-1).sum()
    assert green > 1000, "the green 'Health: healthy' box is drawn"
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, "text was rendered, not a blank page"
