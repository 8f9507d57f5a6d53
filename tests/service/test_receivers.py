"""``[node] receivers``: associations served by receiver processes behind the node's one listening socket.

Real receiver processes (spawned as the node spawns them), dcmtk's storescu and echoscu, pynetdicom
SCUs and raw sockets on localhost; the spool is the real one.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, build_context

from liverfat.service.config import NodeConfig, SeriesSection
from liverfat.service.diskspace import DiskSpace
from liverfat.service.receivers import ReceiverPool, make_listener, receiver_count
from liverfat.service.scp import StorageSCP
from liverfat.service.spool import InstanceInfo, JobState, Spool, StoreOutcome
from tests.service.conftest import DCMTK_ENV, ECHOSCU, STORESCU, dcmtk, node_config, small_series, storescu
from tests.service.node_process import NodeProcess, pid_alive, wait_for

pytestmark = pytest.mark.usefixtures("require_dcmtk")


class Pool:
    """A started ``ReceiverPool`` with its own spool connection and the series releases it reported."""

    def __init__(self, config: NodeConfig) -> None:
        self.spool = Spool(config.spool.dir)
        DiskSpace(config.spool.dir).restore()  # the node writes its disk reserve before it listens
        self.released: list[str] = []
        listener = make_listener(config, Spool(config.spool.dir), self._on_release)
        assert isinstance(listener, ReceiverPool)
        self.listener = listener
        self.complete_on_release = config.series.complete_on_release
        listener.start()

    def _on_release(self, series: list[str]) -> None:
        self.released += series
        if self.complete_on_release:
            self.spool.complete_series(series)

    @property
    def port(self) -> int:
        return self.listener.port

    def open_connections(self) -> int:
        return sum(receiver.open for receiver in self.listener.receivers)

    def pids(self) -> list[int]:
        return [r.process.pid for r in self.listener.receivers if r.process is not None and r.process.pid]

    def stop(self) -> None:
        self.listener.stop()
        self.listener.spool.close()
        self.spool.close()


@pytest.fixture
def pools() -> Iterator[list[Pool]]:
    started: list[Pool] = []
    yield started
    for pool in started:
        pool.stop()


def start(pools: list[Pool], config: NodeConfig) -> Pool:
    pool = Pool(config)
    pools.append(pool)
    return pool


def sop_uids(files: list[Path]) -> set[str]:
    return {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in files}


def echo(port: int) -> subprocess.CompletedProcess[str]:
    return dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", port)


def test_receivers_auto_is_the_usable_cores_up_to_four_and_one_keeps_the_listener_in_the_node(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    assert receiver_count(node_config(tmp_path)) == min(cores, 4)
    assert receiver_count(node_config(tmp_path, receivers=3)) == 3
    assert isinstance(make_listener(node_config(tmp_path, receivers=1), Spool(tmp_path / "spool"), print), StorageSCP)


def test_four_storescu_at_once_are_spread_over_two_receivers_and_every_instance_is_held_once(
    pools: list[Pool], tmp_path: Path
) -> None:
    pool = start(pools, node_config(tmp_path, receivers=2))
    folders = [tmp_path / f"series-{n}" for n in range(4)]
    sent = {pydicom.dcmread(files[0]).SeriesInstanceUID: files for files in
            (small_series(folder, slices=12) for folder in folders)}  # fmt: skip
    senders = [subprocess.Popen([str(STORESCU), "+sd", "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1",
                                 str(pool.port), str(folder)], env=DCMTK_ENV, stderr=subprocess.PIPE, text=True)
               for folder in folders]  # fmt: skip
    errors = [sender.communicate(timeout=120)[1] for sender in senders]
    assert [sender.returncode for sender in senders] == [0] * 4, errors
    jobs = pool.spool.jobs()
    assert sorted(job.n_instances for job in jobs) == [12] * 4
    for job in jobs:
        held = pool.spool.job_files(job)
        assert sop_uids(held) == sop_uids(sent[job.series_uid])
        assert all(pydicom.dcmread(path).pixel_array.shape == (48, 48) for path in held)
    assert not any(pool.spool.tmp_dir.iterdir())
    assert [receiver.handed for receiver in pool.listener.receivers] == [2, 2]
    wait_for(lambda: sorted(pool.released) == sorted(sent), 5, "the releases reported by the receivers")
    wait_for(lambda: pool.open_connections() == 0, 5, "the closed connections reported")


def test_a_release_completes_the_series_through_the_node_with_complete_on_release(
    pools: list[Pool], tmp_path: Path
) -> None:
    config = replace(node_config(tmp_path, receivers=2), series=SeriesSection(complete_on_release=True))
    pool = start(pools, config)
    small_series(tmp_path / "series", slices=3)
    result = storescu(pool.port, tmp_path / "series", "+sd")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: pool.spool.jobs()[0].state is JobState.COMPLETE, 5, "the released series to complete")


def test_max_associations_holds_for_the_node_not_for_each_receiver(pools: list[Pool], tmp_path: Path) -> None:
    """Two silent connections fill two slots spread over two receivers: a third association is refused."""
    pool = start(pools, node_config(tmp_path, receivers=2, max_associations=2))
    silent = [socket.create_connection(("127.0.0.1", pool.port)) for _ in range(2)]
    try:
        wait_for(lambda: pool.open_connections() == 2, 5, "both connections handed over")
        assert [receiver.open for receiver in pool.listener.receivers] == [1, 1]
        refused = echo(pool.port)
        assert refused.returncode != 0 and "Local Limit Exceeded" in refused.stdout + refused.stderr
        silent.pop().close()
        closed_at = time.monotonic()
        while echo(pool.port).returncode != 0:
            assert time.monotonic() - closed_at < 2.0, "no C-ECHO within 2 s of a silent connection closing"
    finally:
        for connection in silent:
            connection.close()


def test_a_receiver_killed_mid_transfer_is_restarted_and_the_series_sent_again_is_held_whole(
    pools: list[Pool], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pool = start(pools, node_config(tmp_path, receivers=2))
    files = small_series(tmp_path / "series", slices=20, size=256)
    ae = AE(ae_title="TESTSCU")  # the test's own sender: it stops between instances, where the kill comes
    assoc = ae.associate("127.0.0.1", pool.port, contexts=[build_context(CTImageStorage, ExplicitVRLittleEndian)],
                         ae_title="LIVERFAT")  # fmt: skip
    assert assoc.is_established
    try:
        assert all(assoc.send_c_store(path).Status == 0x0000 for path in files[:5])
        [serving] = [r for r in pool.listener.receivers if r.open]
        assert serving.process is not None and serving.process.pid is not None
        killed = serving.process.pid
        with caplog.at_level(logging.INFO, logger="liverfat.service.receivers"):
            os.kill(killed, signal.SIGKILL)
            assert "Status" not in assoc.send_c_store(files[5]), "the association was cut off: no Success"
            wait_for(lambda: serving.channel is not None and serving.process is not None
                     and serving.process.pid != killed, 10, "the receiver restarted")  # fmt: skip
    finally:
        assoc.abort()
    [death] = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "liverfat.service.receivers"]
    assert f"receiver process {killed} ({serving.name}) was killed by SIGKILL" in death.getMessage()
    assert not pid_alive(killed)
    held_before = pool.spool.jobs()[0].n_instances
    assert held_before < len(files)
    result = storescu(pool.port, tmp_path / "series", "+sd")  # the sender's retry: the whole series again
    assert result.returncode == 0, result.stderr
    [job] = pool.spool.jobs()
    assert job.n_instances == len(files)
    held = pool.spool.job_files(job)
    assert sop_uids(held) == sop_uids(files)
    assert all(pydicom.dcmread(path).pixel_array.shape == (256, 256) for path in held)


def test_stop_closes_the_port_and_ends_every_receiver_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pool = Pool(node_config(tmp_path, receivers=2))
    pids, port = pool.pids(), pool.port
    assert pool.listener.running  # /healthz's listener_up
    small_series(tmp_path / "series", slices=2)
    assert storescu(pool.port, tmp_path / "series", "+sd").returncode == 0
    with socket.create_connection(("127.0.0.1", pool.port)):  # an open connection while the node stops
        wait_for(lambda: pool.open_connections() == 1, 5, "the connection handed over")
        with caplog.at_level(logging.INFO):
            pool.stop()
    assert not pool.listener.running
    assert not any(pid_alive(pid) for pid in pids)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("stopped" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port))


def test_a_copy_sent_again_waits_for_the_held_copys_fsyncs_stored_by_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two spool connections stand for two receivers: the second's duplicate syncs the first's file and folder."""
    [path] = small_series(tmp_path / "series", slices=1)
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    info = InstanceInfo(dataset.SOPInstanceUID, dataset.SOPClassUID, dataset.SeriesInstanceUID,
                        dataset.StudyInstanceUID, "TESTSCU")  # fmt: skip
    first, second = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    try:
        assert first.store_instance(path.read_bytes(), info) is StoreOutcome.STORED
        [held] = first.job_files(first.jobs()[0])
        synced: list[str] = []
        real_fsync = os.fsync

        def recorded(fd: int) -> None:
            real_fsync(fd)
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))

        monkeypatch.setattr(os, "fsync", recorded)
        assert second.store_instance(path.read_bytes(), info) is StoreOutcome.DUPLICATE
        assert synced == [str(held), str(held.parent)]
    finally:
        first.close()
        second.close()


def test_a_node_with_two_receivers_serves_restarts_a_killed_one_and_stops_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", {
        "node": {"host": "127.0.0.1", "port": node_config(tmp_path).node.port, "receivers": 2},
        "spool": {"dir": str(tmp_path / "spool"), "min_free_disk_mb": 0, "nearly_full_margin_mb": 0},
        "series": {"stable_seconds": 600.0, "complete_on_release": True},
        "http": {"port": 0},
    })  # fmt: skip
    node.start()
    try:
        port = node.config.node.port
        small_series(tmp_path / "first", slices=4)
        assert storescu(port, tmp_path / "first", "+sd").returncode == 0
        wait_for(lambda: node.state() not in (None, JobState.RECEIVED), 10, "the released series to complete")
        pids = [int(pid) for pid in re.findall(r"receiver process (\d+) started", node.run_log())]
        assert len(pids) == 2
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(re.findall(r"receiver process \d+ started", node.run_log())) == 3, 10,
                 "the killed receiver restarted")  # fmt: skip
        small_series(tmp_path / "second", slices=4)
        for _ in range(2):  # both receivers take one association: the restarted one serves
            assert storescu(port, tmp_path / "second", "+sd").returncode == 0
        assert echo(port).returncode == 0
        pids = [int(pid) for pid in re.findall(r"receiver process (\d+) started", node.run_log())]
    finally:
        assert node.terminate() == 0
    text = node.run_log()
    receiving = [line for line in text.splitlines() if "liverfat-worker" not in line]  # a 4-slice series fails there
    assert [line for line in receiving if " ERROR " in line] == [
        line for line in receiving if f"receiver process {pids[0]} (receiver-0) was killed by SIGKILL" in line
    ]
    assert "WARNING liverfat" not in text.split("SIGTERM received")[1]
    assert not any(pid_alive(pid) for pid in pids)
