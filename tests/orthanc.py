"""A real Orthanc (Debian package) for tests, reachable on loopback only.

Orthanc 1.10 cannot bind to 127.0.0.1 (it listens on every interface), so it runs in a
private network namespace whose only interface is ``lo``; every client (storescu, the
REST calls, a node under test) runs inside the same namespace through ``ip netns exec``.
Needs root (for ``ip netns add``), ``/usr/sbin/Orthanc`` and DCMTK's ``storescu``;
``orthanc_server`` skips the test with a message saying which is missing.

Plugins (``plugins``) and their configuration sections (``extra_config``, merged over the
defaults) make the same server a DICOMweb back end, as the OHIF viewer test needs.

Usage::

    with orthanc_server(tmp_path) as orthanc:
        orthanc.store(ct_files)
        orthanc.store([seg, sr], all_sop_classes=True)
        studies = orthanc.get("/studies?expand")
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

logger = logging.getLogger(__name__)

ORTHANC = "/usr/sbin/Orthanc"
STORESCU = "storescu"
AET = "ORTHANC"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
#: Configuration keys ``orthanc_server`` decides itself (``OrthancServer`` reports them).
MANAGED_KEYS = frozenset({"StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort", "DicomAet"})

_FREE_PORTS = (
    "import socket, sys\n"
    "socks = [socket.socket() for _ in range(int(sys.argv[1]))]\n"
    "for s in socks: s.bind(('127.0.0.1', 0))\n"
    "print(' '.join(str(s.getsockname()[1]) for s in socks))\n"
)
_HTTP_GET = (
    "import sys, urllib.request\n"
    "with urllib.request.urlopen(sys.argv[1], timeout=10) as answer:\n"
    "    sys.stdout.write(answer.read().decode())\n"
)


@dataclass
class OrthancServer:
    """A running Orthanc inside network namespace ``netns``; ``stop`` and ``start`` keep its storage."""

    netns: str
    http_port: int
    dicom_port: int
    process: subprocess.Popen[bytes]
    storage: Path
    log: Path
    config: Path
    aet: str = AET

    def stop(self) -> None:
        """Stop Orthanc (a destination that is down); its storage and ports stay for ``start``."""
        _stop(self.process)

    def start(self) -> None:
        """Start Orthanc again with the same configuration and storage, and wait until it answers."""
        self.process = _launch(self.netns, self.config, self.log)
        _wait_ready(self)

    def run(
        self, *command: str, env: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside the namespace (``env`` adds environment variables)."""
        prefix = ["ip", "netns", "exec", self.netns]
        if env:
            prefix += ["env", *(f"{key}={value}" for key, value in env.items())]
        return subprocess.run([*prefix, *command], capture_output=True, text=True, check=check, timeout=300)

    def get(self, path: str) -> Any:
        """GET ``path`` of the REST API and decode the JSON answer."""
        answer = self.run(sys.executable, "-c", _HTTP_GET, f"http://127.0.0.1:{self.http_port}{path}")
        return json.loads(answer.stdout)

    def store(self, files: Sequence[Path], *, calling_aet: str = "LIVERFAT", all_sop_classes: bool = False) -> None:
        """C-STORE ``files`` with storescu; ``all_sop_classes`` (-R) is needed for SEG and SR."""
        options = ["-R"] if all_sop_classes else []
        completed = self.run(
            STORESCU, *options, "-aet", calling_aet, "-aec", self.aet, "127.0.0.1", str(self.dicom_port),
            *(str(path) for path in files), env={"TCP_NODELAY": "1"}, check=False,
        )
        if completed.returncode != 0:
            raise AssertionError(f"storescu exited with {completed.returncode}: {completed.stderr[-2000:]}")


def _missing_requirement() -> str | None:
    if not Path(ORTHANC).exists():
        return f"{ORTHANC} is absent (Debian package orthanc)"
    if shutil.which(STORESCU) is None:
        return "storescu is absent (Debian package dcmtk)"
    if shutil.which("ip") is None:
        return "ip is absent (Debian package iproute2)"
    if os.geteuid() != 0:
        return "a private network namespace needs root (ip netns add)"
    return None


def _config(
    storage: Path,
    http_port: int,
    dicom_port: int,
    modalities: dict[str, Any],
    lua_scripts: Sequence[Path],
    plugins: Sequence[Path],
) -> dict[str, Any]:
    return {
        "Name": "LIVERFAT-TEST",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "Plugins": [str(path) for path in plugins],
        "LuaScripts": [str(path) for path in lua_scripts],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": AET,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": modalities,
        "StableAge": 2,
        "SaveJobs": False,
    }


def _wait_ready(server: OrthancServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {server.process.returncode}: {server.log.read_text()[-2000:]}")
        probe = server.run(sys.executable, "-c", _HTTP_GET, f"http://127.0.0.1:{server.http_port}/system", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Orthanc did not answer within {START_TIMEOUT_S} s: {server.log.read_text()[-2000:]}")


def _launch(netns: str, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start Orthanc in ``netns``, appending to ``log``; ``ip netns exec`` execs it, so the pid is Orthanc's."""
    with log.open("ab") as log_file:
        return subprocess.Popen(["ip", "netns", "exec", netns, ORTHANC, str(config)], stdout=log_file,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate Orthanc and wait for it to exit (a restart before that finds its port taken)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def orthanc_server(
    folder: Path,
    *,
    modalities: dict[str, Any] | None = None,
    lua_scripts: Sequence[Path] = (),
    plugins: Sequence[Path] = (),
    extra_config: dict[str, Any] | None = None,
) -> Iterator[OrthancServer]:
    """Start Orthanc with its storage under ``folder`` in a new namespace; stop and clean up after.

    ``modalities`` becomes Orthanc's ``DicomModalities`` (for a node under test that runs in
    the same namespace, reached as ``127.0.0.1``). ``plugins`` are the shared libraries
    Orthanc loads; ``extra_config`` is merged over the default configuration last, so it
    can add a plugin's section (``DicomWeb``) or change any default (``Name``, ...) except
    the ``MANAGED_KEYS`` (ports, storage, AE title), which raise ``ValueError``.
    """
    clashing = MANAGED_KEYS & set(extra_config or {})
    if clashing:
        raise ValueError(f"extra_config must not set {sorted(clashing)}: orthanc_server chooses them")
    missing = _missing_requirement()
    if missing:
        pytest.skip(f"real Orthanc test not possible: {missing}")
    netns = f"lfortc{os.getpid()}{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    server = None
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        ports = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", _FREE_PORTS, "2"],
            check=True, capture_output=True, text=True,
        ).stdout.split()
        http_port, dicom_port = (int(port) for port in ports)
        storage = folder / "orthanc-storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = folder / "orthanc.json"
        settings = {**_config(storage, http_port, dicom_port, modalities or {}, lua_scripts, plugins),
                    **(extra_config or {})}  # fmt: skip
        config.write_text(json.dumps(settings, indent=2))
        log = folder / "orthanc.log"
        server = OrthancServer(netns, http_port, dicom_port, _launch(netns, config, log), storage, log, config)
        _wait_ready(server)
        logger.info("Orthanc ready in namespace %s, HTTP %d, DICOM %d", netns, http_port, dicom_port)
        yield server
    finally:
        if server is not None:
            _stop(server.process)
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
