"""Patient names and IDs never reach the node's log below DEBUG, not even through library warnings.

highdicom warns with the name quoted (``The string "X" is unlikely to represent ...``) for a
Patient's Name without ``^``, and pydicom warns and logs about a name longer than PN allows.
The node runs as a real subprocess; the only fake is the phantom segmentation backend.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from liverfat.service.config import LogSection
from liverfat.service.logs import QUIET_LIBRARIES, WITHHELD, configure_logging
from liverfat.service.spool import JobState
from tests.phantom import SeriesHeader
from tests.service.conftest import phantom_series, storescu
from tests.service.node_process import sending_node, wait_for
from tests.service.test_sender import Receiver

LONG_NAME = "LONGSECRETNAME" * 715  # 10,010 characters; PN allows 64 per component group
PATIENTS = [("SECRETSINGLE", "SECRETID-1"), ("SECRETFAMILY^SECRETGIVEN", "SECRETID-2"), (LONG_NAME, "SECRETID-3")]
DONE = (JobState.DONE, JobState.REJECTED, JobState.FAILED)


@pytest.mark.slow
@pytest.mark.usefixtures("require_dcmtk")
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_node_log_holds_no_patient_name_or_id(tmp_path: Path, receiver: Receiver, log_format: str) -> None:
    node = sending_node(tmp_path, receiver.port, log={"level": "INFO", "format": log_format})
    node.start()
    try:
        for index, (name, patient_id) in enumerate(PATIENTS):
            folder = tmp_path / f"ct{index}"
            phantom_series(folder, SeriesHeader(patient_name=name, patient_id=patient_id))
            result = storescu(node.config.node.port, folder, "+sd")
            assert result.returncode == 0, result.stderr
        wait_for(lambda: len(node.jobs()) == 3 and all(job.state in DONE for job in node.jobs()), 180,
                 "the three series processed")  # fmt: skip
        states = [job.state for job in node.jobs()]
    finally:
        node.terminate()
    log = node.log()
    assert states == [JobState.DONE] * 3, log[-3000:]
    assert "UserWarning at highdicom/" in log and WITHHELD in log  # the warning came, without its text
    for name, patient_id in PATIENTS:
        for secret in (*name.split("^"), patient_id):
            assert secret[:14] not in log, f"{secret[:14]!r} is in the node's log"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """``configure_logging`` changes process-wide state: give the next test what this one found."""
    root = logging.getLogger()
    handlers, level, show = list(root.handlers), root.level, warnings.showwarning
    libraries = {name: logging.getLogger(name).level for name in QUIET_LIBRARIES}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    warnings.showwarning = show
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)


@pytest.mark.usefixtures("restore_logging")
def test_below_debug_a_warning_keeps_its_origin_and_loses_its_text(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSection(level="INFO"))
    warnings.warn('The string "SECRETSINGLE" is unlikely to represent a name', UserWarning, stacklevel=1)
    logging.getLogger("highdicom.sr").warning("Invalid value for VR PN: 'SECRETSINGLE'")
    logging.getLogger("liverfat.service.scp").warning("own message %s", "kept")
    err = capsys.readouterr().err
    assert "SECRETSINGLE" not in err
    assert "UserWarning at service/test_log_privacy.py" in err
    assert "highdicom.sr message at service/test_log_privacy.py" in err and "own message kept" in err


@pytest.mark.usefixtures("restore_logging")
def test_at_debug_warnings_are_logged_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSection(level="DEBUG"))
    warnings.warn("SECRETSINGLE at debug", UserWarning, stacklevel=1)
    assert "UserWarning: SECRETSINGLE at debug" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_logging")
def test_a_connection_error_that_pynetdicom_logs_with_a_traceback_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LogSection(level="INFO"))
    try:
        raise ConnectionResetError(104, "Connection reset by peer")
    except ConnectionResetError as error:
        logging.getLogger("pynetdicom.dul").exception(error)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0]
    assert lines[0].endswith("pynetdicom.dul: ConnectionResetError: [Errno 104] Connection reset by peer")
