"""The listener against real clients: pynetdicom SCUs and dcmtk's echoscu/storescu on localhost."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from liverfat.errors import LiverfatError, Reason
from liverfat.service.config import Caller, NodeConfig, SeriesSection, TlsSection
from liverfat.service.scp import StorageSCP, StoreStatus, index_uids, part10_header, refuse_caller
from liverfat.service.spool import JobState, Spool
from liverfat.service.spool_instances import Arrival, Indexed
from liverfat.service.upper_layer import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from tests.service.conftest import DCMTK_ENV, ECHOSCU, STORESCU, dcmtk, node_config, small_series, storescu

pytestmark = pytest.mark.usefixtures("require_dcmtk")


def start(config: NodeConfig, spool: Spool | None = None) -> tuple[StorageSCP, Spool]:
    spool = spool or Spool(config.spool.dir)
    on_release = spool.complete_series if config.series.complete_on_release else None
    scp = StorageSCP(config, spool, on_release=on_release)
    scp.start()
    return scp, spool


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[StorageSCP, Spool]]:
    scp, spool = start(node_config(tmp_path))
    yield scp, spool
    scp.stop()
    spool.close()


def associate(scp: StorageSCP, calling: str = "TESTSCU", contexts: tuple[str, ...] = (CTImageStorage,),
              tls: ssl.SSLContext | None = None, transfer_syntax: str | None = None) -> Association:  # fmt: skip
    """An association from a pynetdicom SCU; ``transfer_syntax`` proposes only that one (default: pynetdicom's)."""
    ae = AE(ae_title=calling)
    assoc = ae.associate("127.0.0.1", scp.port, contexts=[build_context(c, transfer_syntax) for c in contexts],
                         ae_title=scp.config.node.ae_title, tls_args=(tls, "localhost") if tls else None)  # fmt: skip
    return assoc


def test_a_port_already_in_use_is_a_clear_configuration_error(node: tuple[StorageSCP, Spool], tmp_path: Path) -> None:
    scp, _ = node
    second = StorageSCP(scp.config, Spool(tmp_path / "other"))
    with pytest.raises(LiverfatError, match="cannot listen on 127.0.0.1") as raised:
        second.start()
    assert raised.value.reason is Reason.CONFIG_INVALID


def test_echoscu_gets_success(node: tuple[StorageSCP, Spool]) -> None:
    scp, _ = node
    result = dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
    assert result.returncode == 0, result.stderr


def test_each_success_means_the_instance_is_already_on_disk_and_indexed(node: tuple[StorageSCP, Spool],
                                                                       tmp_path: Path) -> None:  # fmt: skip
    scp, spool = node
    files = small_series(tmp_path / "series", slices=4)
    independent = Spool(spool.root)  # a second connection: sees only what was committed
    assoc = associate(scp)
    assert assoc.is_established
    for path in files:
        status = assoc.send_c_store(path)
        assert status.Status == StoreStatus.SUCCESS
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert independent.has_instance(sop_uid)
    assoc.release()
    [job] = independent.jobs()

    def content(path: Path) -> tuple[str, bytes]:
        ds = pydicom.dcmread(path)
        return ds.SOPInstanceUID, ds.PixelData

    assert {content(p) for p in independent.job_files(job)} == {content(p) for p in files}


def test_a_success_follows_the_fsync_of_file_and_folder_and_the_commit(node: tuple[StorageSCP, Spool], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """What a Success promises: data and name on disk and the row committed; the three run at once, all before it."""
    scp, spool = node
    [path] = small_series(tmp_path / "series", slices=1)
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    events: list[tuple[str, str]] = []
    real_fsync, real_batch = os.fsync, spool._arrivals._run_batch

    def recorded_fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def recorded_batch(arrivals: list[Arrival]) -> list[Indexed]:
        indexed = real_batch(arrivals)  # returns once its transaction is committed
        events.append(("committed", dataset.SOPInstanceUID))
        return indexed

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(spool._arrivals, "_run_batch", recorded_batch)
    spool._db.set_trace_callback(lambda sql: events.append(("sql", sql.split()[0].upper())))
    assoc = associate(scp)
    status = assoc.send_c_store(path)
    events.append(("success", hex(status.Status)))
    assoc.release()
    folder = str(spool.root / "instances" / dataset.SeriesInstanceUID)
    at = {event: i for i, event in reversed(list(enumerate(events)))}  # the first time each event happened
    [file_synced] = [
        i
        for i, (what, path) in enumerate(events)
        if what == "fsync" and path.startswith(folder + "/") and dataset.SOPInstanceUID in path
    ]
    last_insert = max(i for i, event in enumerate(events) if event == ("sql", "INSERT"))  # the instance's row
    committed = at["committed", dataset.SOPInstanceUID]
    assert at["sql", "BEGIN"] < last_insert < max(i for i, event in enumerate(events[:committed])
                                                   if event == ("sql", "COMMIT"))  # fmt: skip
    assert max(file_synced, at["fsync", folder], committed) < at["success", "0x0"]


def test_four_associations_at_once_lose_no_instance(node: tuple[StorageSCP, Spool], tmp_path: Path) -> None:
    """Four series sent at once (their instances committed in shared batches): every Success is indexed and held."""
    scp, spool = node
    folders = [tmp_path / f"series-{n}" for n in range(4)]
    sent = {n: small_series(folder, slices=12) for n, folder in enumerate(folders)}
    senders = [subprocess.Popen([str(STORESCU), "+sd", "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1",
                                 str(scp.port), str(folder)], env=DCMTK_ENV, stderr=subprocess.PIPE, text=True)
               for folder in folders]  # fmt: skip
    errors = [sender.communicate(timeout=120)[1] for sender in senders]
    assert [sender.returncode for sender in senders] == [0] * 4, errors
    jobs = spool.jobs()
    assert sorted(job.n_instances for job in jobs) == [12] * 4
    for job in jobs:
        held = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in spool.job_files(job)}
        [files] = [files for files in sent.values() if job.series_uid == pydicom.dcmread(files[0]).SeriesInstanceUID]
        assert held == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    assert not any(spool.tmp_dir.iterdir())


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3", "1.2.34"])  # odd and even lengths
def test_the_file_header_is_the_one_pynetdicom_writes_with_liverfats_implementation(sop_instance_uid: str) -> None:
    meta = create_file_meta(sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance_uid,
                            transfer_syntax=ImplicitVRLittleEndian, implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
                            implementation_version=IMPLEMENTATION_VERSION_NAME)  # fmt: skip
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert part10_header(CTImageStorage, sop_instance_uid, ImplicitVRLittleEndian) == expected


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                             DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian])  # fmt: skip
def test_index_uids_are_read_in_every_uncompressed_transfer_syntax(transfer_syntax: UID) -> None:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, "9.1", "9.2", "9.3"
    ds.InstanceNumber = 1  # (0020,0013): after the UIDs, where reading stops
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    encoded = BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    raw = encoded.getvalue()
    data_set = raw[144 + int.from_bytes(raw[140:144], "little") :]  # after preamble, prefix and file meta group
    assert index_uids(data_set, transfer_syntax) == ("9.1", "9.2", "9.3")


def test_a_deflated_instance_is_stored_as_sent(node: tuple[StorageSCP, Spool], tmp_path: Path) -> None:
    scp, spool = node
    [path] = small_series(tmp_path / "series", slices=1)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assoc = associate(scp, transfer_syntax=DeflatedExplicitVRLittleEndian)
    status = assoc.send_c_store(tmp_path / "deflated.dcm")
    assoc.release()
    assert status.Status == StoreStatus.SUCCESS
    [stored] = spool.job_files(spool.jobs()[0])
    received = pydicom.dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert received.SeriesInstanceUID == ds.SeriesInstanceUID and received.PixelData == ds.PixelData


def test_storescu_series_lands_as_one_received_series(node: tuple[StorageSCP, Spool], tmp_path: Path) -> None:
    scp, spool = node
    small_series(tmp_path / "series", slices=5)
    result = storescu(scp.port, tmp_path / "series", "+sd", "+r")
    assert result.returncode == 0, result.stderr
    [job] = spool.jobs()
    assert (job.n_instances, job.state) == (5, JobState.RECEIVED)


def test_a_resent_series_is_accepted_and_held_once(node: tuple[StorageSCP, Spool], tmp_path: Path) -> None:
    scp, spool = node
    small_series(tmp_path / "series", slices=3)
    for _ in range(2):
        result = storescu(scp.port, tmp_path / "series", "+sd")
        assert result.returncode == 0, result.stderr
    [job] = spool.jobs()
    assert job.n_instances == 3 and len(spool.job_files(job)) == 3


def test_non_ct_sop_class_is_refused_at_negotiation_with_the_reason_logged(
    node: tuple[StorageSCP, Spool], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scp, spool = node
    [path] = small_series(tmp_path / "series", slices=1)
    mr = pydicom.dcmread(path)
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    mr.save_as(tmp_path / "mr.dcm")
    with caplog.at_level(logging.WARNING, logger="liverfat.service.scp"):
        result = storescu(scp.port, tmp_path / "mr.dcm", "-R")
    assert result.returncode != 0
    assert "accepts only CT Image Storage and Verification, not MR Image Storage" in caplog.text
    assert spool.jobs() == []


def test_unknown_calling_ae_title_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    scp, spool = start(node_config(tmp_path, allowed_callers=(Caller("ORTHANC"),)))
    try:
        with caplog.at_level(logging.WARNING, logger="liverfat.service.scp"):
            stranger = dcmtk(ECHOSCU, "-aet", "STRANGER", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
        known = dcmtk(ECHOSCU, "-aet", "ORTHANC", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
    finally:
        scp.stop()
    assert stranger.returncode != 0 and "Calling AE Title Not Recognized" in stranger.stderr + stranger.stdout
    assert known.returncode == 0, known.stderr
    assert "'STRANGER' is not in [node] allowed_callers" in caplog.text


def test_allowed_caller_from_another_host_is_refused(tmp_path: Path) -> None:
    scp, _ = start(node_config(tmp_path, allowed_callers=(Caller("ORTHANC", "10.9.9.9"),)))
    try:
        result = dcmtk(ECHOSCU, "-aet", "ORTHANC", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
    finally:
        scp.stop()
    assert result.returncode != 0


def test_refuse_caller_checks_title_then_host() -> None:
    allowed = (Caller("ORTHANC", "127.0.0.1"), Caller("CT1"))
    assert refuse_caller((), "ANY", "1.2.3.4") is None
    assert refuse_caller(allowed, "ORTHANC", "127.0.0.1") is None
    assert refuse_caller(allowed, "CT1", "10.0.0.1") is None
    assert "only from 127.0.0.1" in str(refuse_caller(allowed, "ORTHANC", "10.0.0.1"))
    assert "not in [node] allowed_callers" in str(refuse_caller(allowed, "CT2", "127.0.0.1"))


def test_wrong_called_ae_title_is_refused(node: tuple[StorageSCP, Spool]) -> None:
    scp, _ = node
    result = dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "SOMEONE", "127.0.0.1", scp.port)
    assert result.returncode != 0 and "Called AE Title Not Recognized" in result.stderr + result.stdout


def test_store_answers_out_of_resources_below_the_free_space_minimum(tmp_path: Path) -> None:
    config = node_config(tmp_path)
    scp, spool = start(config, Spool(config.spool.dir, min_free_bytes=2**62))
    [path] = small_series(tmp_path / "series", slices=1)
    try:
        assoc = associate(scp)
        status = assoc.send_c_store(path)
        assoc.release()
    finally:
        scp.stop()
    assert status.Status == StoreStatus.OUT_OF_RESOURCES
    assert spool.jobs() == [] and list((spool.root / "instances").rglob("*.dcm")) == []


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs (needs root): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_answers_out_of_resources_and_never_a_false_success(tiny_tmpfs: Path, tmp_path: Path) -> None:
    config = replace(node_config(tmp_path), spool=replace(node_config(tmp_path).spool, dir=tiny_tmpfs / "spool"))
    scp, spool = start(config)
    files = small_series(tmp_path / "series", slices=40, size=128)  # 40 x 32 KiB > 1 MiB
    statuses = {}
    try:
        assoc = associate(scp)
        for path in files:
            statuses[path] = assoc.send_c_store(path).Status
        assoc.release()
    finally:
        scp.stop()
    assert StoreStatus.OUT_OF_RESOURCES in statuses.values()
    assert set(statuses.values()) <= {StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES}
    for path, status in statuses.items():
        sop_uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert spool.has_instance(sop_uid) is (status == StoreStatus.SUCCESS)
    [job] = spool.jobs()
    for stored in spool.job_files(job):
        assert pydicom.dcmread(stored).pixel_array.shape == (128, 128)
    assert list(spool.tmp_dir.iterdir()) == []


def test_garbage_bytes_on_the_port_do_not_disturb_other_associations(node: tuple[StorageSCP, Spool],
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """Two garbage connections stay open during a transfer, two more come and go.

    (The node aborts a connection whose first PDU is not an A-ASSOCIATE-RQ and frees its slot;
    tests/service/test_scp_hardening.py floods all the slots with silent and garbage connections.)
    """
    scp, spool = node
    small_series(tmp_path / "series", slices=6)
    lingering = [socket.create_connection(("127.0.0.1", scp.port), timeout=5) for _ in range(2)]
    try:
        for raw in lingering:
            raw.sendall(b"\x01\x00" + os.urandom(200))  # looks like an A-ASSOCIATE-RQ, is not one
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as raw:
                raw.sendall(os.urandom(4096))
        result = storescu(scp.port, tmp_path / "series", "+sd")
        echo = dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", scp.port)
    finally:
        for raw in lingering:
            raw.close()
    assert result.returncode == 0, result.stderr
    assert echo.returncode == 0, echo.stderr
    assert spool.jobs()[0].n_instances == 6


def test_release_completes_the_series_at_once_when_enabled(tmp_path: Path) -> None:
    config = replace(node_config(tmp_path), series=SeriesSection(complete_on_release=True))
    scp, spool = start(config)
    small_series(tmp_path / "series", slices=3)
    try:
        result = storescu(scp.port, tmp_path / "series", "+sd")
    finally:
        scp.stop()
    assert result.returncode == 0, result.stderr
    assert spool.jobs()[0].state is JobState.COMPLETE


def make_certificates(folder: Path) -> TlsSection:
    """A throw-away CA and one certificate (CN localhost) signed by it, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make test certificates")
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=liverfat test CA")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=localhost")
    (folder / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "node.crt",
        "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return TlsSection(enabled=True, certificate=folder / "node.crt", private_key=folder / "node.key",
                      ca_certificates=folder / "ca.crt")  # fmt: skip


def test_tls_listener_accepts_a_verified_client_and_refuses_plain_tcp(tmp_path: Path) -> None:
    from liverfat.service.tls import client_context

    tls = make_certificates(tmp_path / "tls")
    scp, spool = start(replace(node_config(tmp_path), tls=tls))
    [path] = small_series(tmp_path / "series", slices=1)
    try:
        assoc = associate(scp, tls=client_context(tls))
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assoc.release()
        plain = dcmtk(ECHOSCU, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", scp.port, timeout=30)
    finally:
        scp.stop()
    assert status.Status == StoreStatus.SUCCESS
    assert spool.jobs()[0].n_instances == 1
    assert plain.returncode != 0
