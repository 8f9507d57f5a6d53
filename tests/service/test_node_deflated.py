"""Deflated Explicit VR Little Endian through the whole node: received, stored as sent, read back and analysed.

Sent by dcmtk's ``storescu -xd``; the node is a real subprocess with the phantom backend.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from liverfat.service.spool import JobState
from tests.service.conftest import PHANTOM_LIVER_HU, phantom_series, storescu
from tests.service.node_process import sending_node, wait_for
from tests.service.test_sender import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("require_dcmtk")]


def test_a_deflated_series_is_stored_as_sent_and_analysed(tmp_path: Path, receiver: Receiver) -> None:
    deflated = tmp_path / "deflated"
    deflated.mkdir()
    for path in phantom_series(tmp_path / "ct"):
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(deflated / path.name, enforce_file_format=True)
    node = sending_node(tmp_path, receiver.port)
    node.start()
    try:
        result = storescu(node.config.node.port, deflated, "+sd", "-xd", "-v")
        assert result.returncode == 0, result.stderr
        job = wait_for(lambda: next((j for j in node.jobs() if j.state in (JobState.DONE, JobState.REJECTED,
                                                                              JobState.FAILED)), None),
                       120, "the deflated series processed")  # fmt: skip
        spool = node.spool()
        stored = spool.job_files(job)
        spool.close()
    finally:
        node.terminate()
    assert "Deflated" in result.stdout + result.stderr  # storescu sent it deflated, as accepted
    assert job.state is JobState.DONE, node.log()[-3000:]
    assert job.parenchymal_hu == pytest.approx(PHANTOM_LIVER_HU, abs=3.0)
    assert len(stored) == 57
    assert all(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
               == DeflatedExplicitVRLittleEndian for p in stored)  # fmt: skip
