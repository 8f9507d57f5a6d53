"""A real RabbitMQ (Debian package ``rabbitmq-server``) for tests: its own node, folder and loopback ports.

The node runs as the current user from ``/usr/lib/rabbitmq/bin`` (not ``/usr/sbin``'s wrappers,
which switch to the ``rabbitmq`` user), with every file under ``folder``: Erlang cookie (``HOME``),
database, logs. Its AMQP listener, its Erlang distribution port and its own ``epmd`` are bound to
127.0.0.1 on free ports, so nothing is reachable from outside and several test brokers coexist.
It loads the production ``deploy/rabbitmq/rabbitmq.conf`` (with the listener and the
definitions' path replaced) and ``deploy/rabbitmq/definitions.json``: the queues and the
delivery-limit / dead-letter policy the tests see are the ones an installation gets.

``netns`` runs the broker inside an existing network namespace (``tests/orthanc.py`` makes one),
where the node, the workers and Orthanc under test share one loopback.

Usage::

    with rabbitmq_server(tmp_path) as broker:
        config = QueueSection(broker=broker.url)
        broker.stop()   # the broker is down; its data stays
        broker.start()  # up again with the same queues and messages
        broker.queue_depth("liverfat.dead")

``rabbitmq_server`` skips the test with a message when ``rabbitmq-server`` is not installed.
Starting takes about 6 s: share one broker per module where the tests' state allows
(``tests/service/fleet/conftest.py``).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from liverfat.service.config import TlsSection

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "rabbitmq"
DEFINITIONS = DEPLOY / "definitions.json"
CONFIG = DEPLOY / "rabbitmq.conf"
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
SERVER = RABBITMQ_BIN / "rabbitmq-server"
CTL = RABBITMQ_BIN / "rabbitmqctl"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
#: Lines of the production rabbitmq.conf that the test broker sets itself.
USER = "liverfat"
MANAGED_KEYS = ("listeners.tcp.", "listeners.ssl.", "ssl_options.", "load_definitions")

_FREE_PORTS = (
    "import socket, sys\n"
    "socks = [socket.socket() for _ in range(int(sys.argv[1]))]\n"
    "for s in socks: s.bind(('127.0.0.1', 0))\n"
    "print(' '.join(str(s.getsockname()[1]) for s in socks))\n"
)
_PORT_OPEN = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=1).close()\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


@dataclass
class RabbitMQ:
    """A RabbitMQ node under ``folder``; ``stop`` and ``start`` keep its queues and messages."""

    folder: Path
    node: str  # Erlang node name, "name@localhost"
    amqp_port: int
    dist_port: int
    epmd_port: int
    password: str = field(default_factory=lambda: secrets.token_hex(12), repr=False)
    netns: str | None = None
    tls_port: int | None = None  # the amqps:// listener, when started with ``tls``
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The AMQP URL for ``[queue] broker``: user ``liverfat`` with a random password (tests check it stays secret)."""
        return f"amqp://{USER}:{self.password}@127.0.0.1:{self.amqp_port}//"

    @property
    def tls_url(self) -> str:
        """The ``amqps://`` URL of the TLS listener (the broker's certificate names 127.0.0.1)."""
        if self.tls_port is None:
            raise RuntimeError("this broker was started without tls")
        return f"amqps://{USER}:{self.password}@127.0.0.1:{self.tls_port}//"

    @property
    def log(self) -> Path:
        return self.folder / "log" / f"{self.node}.log"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the server and of ``rabbitmqctl``: every file under ``folder``, every port loopback."""
        return {
            "HOME": str(self.folder / "home"),  # the Erlang cookie, shared by the server and rabbitmqctl
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq"),  # rabbitmq.conf, named without .conf
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
        }

    def start(self) -> None:
        """Start the node (again) and wait until it accepts AMQP connections."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("RabbitMQ is already running")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with (self.folder / "server.out").open("ab") as out:
            self.process = subprocess.Popen(self._in_netns(str(SERVER)), stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.env}, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._port_open(self.amqp_port):
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}: {self._tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ did not listen within {START_TIMEOUT_S:.0f} s: {self._tail()}")
            time.sleep(0.2)
        self.ctl("await_startup", "--timeout", str(int(START_TIMEOUT_S)))
        logger.info("RabbitMQ %s ready on 127.0.0.1:%d", self.node, self.amqp_port)

    def stop(self) -> None:
        """Stop the node gracefully (SIGTERM: the script runs a clean shutdown) and wait for it to exit."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=STOP_TIMEOUT_S)
        _wait(lambda: not self._port_open(self.amqp_port), STOP_TIMEOUT_S, "the AMQP port to close")

    def close(self) -> None:
        """Stop the node, then its epmd (which outlives it), and wait until both are gone."""
        self.stop()
        epmd = _epmd()
        if epmd is not None and self._port_open(self.epmd_port):
            subprocess.run(self._in_netns(epmd, "-kill"), env={**os.environ, **self.env}, capture_output=True,
                           timeout=STOP_TIMEOUT_S, check=False)  # fmt: skip
            _wait(lambda: not self._port_open(self.epmd_port), STOP_TIMEOUT_S, "epmd to exit")

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl`` against this node; its standard output."""
        completed = subprocess.run(self._in_netns(str(CTL), "-n", self.node, *args), env={**os.environ, **self.env},
                                   capture_output=True, text=True, timeout=START_TIMEOUT_S + 10, check=False)  # fmt: skip
        if completed.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited with {completed.returncode}: "
                               f"{completed.stderr[-2000:]}{completed.stdout[-2000:]}")  # fmt: skip
        return completed.stdout

    def queues(self) -> Mapping[str, tuple[int, int]]:
        """Every queue's ``(ready, unacknowledged)`` message counts, by name (``rabbitmqctl list_queues``).

        The broker updates these statistics every few seconds: poll, or ask a client's passive declare.
        """
        rows = self.ctl("list_queues", "--quiet", "--no-table-headers", "name", "messages_ready",
                        "messages_unacknowledged")  # fmt: skip
        found = (re.split(r"\s+", line.strip()) for line in rows.splitlines() if line.strip())
        return {name: (int(ready), int(unacked)) for name, ready, unacked in found}

    def _in_netns(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *command] if self.netns else list(command)

    def _port_open(self, port: int) -> bool:
        if self.netns is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True
        probe = subprocess.run(self._in_netns(sys.executable, "-c", _PORT_OPEN, str(port)), check=False,
                               capture_output=True)  # fmt: skip
        return probe.returncode == 0

    def _tail(self) -> str:
        texts = [path.read_text(errors="replace")[-2000:] for path in (self.folder / "server.out", self.log)
                 if path.exists()]  # fmt: skip
        return "\n".join(texts)


def _epmd() -> str | None:
    found = sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))
    return str(found[-1]) if found else None


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.1)


def _free_ports(count: int, netns: str | None) -> list[int]:
    command = [sys.executable, "-c", _FREE_PORTS, str(count)]
    if netns:
        command = ["ip", "netns", "exec", netns, *command]
    return [int(port) for port in subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()]


def broker_config(amqp_port: int, tls_port: int | None = None, tls: TlsSection | None = None) -> str:
    """The production rabbitmq.conf with this broker's listeners and the repository's definitions file.

    With ``tls``, an amqps:// listener on ``tls_port`` presents ``tls.certificate`` and requires a
    client certificate signed by ``tls.ca_certificates``.
    """
    kept = [line for line in CONFIG.read_text().splitlines() if not line.strip().startswith(MANAGED_KEYS)]
    lines = [*kept, f"listeners.tcp.default = 127.0.0.1:{amqp_port}", f"load_definitions = {DEFINITIONS}"]
    if tls is not None and tls_port is not None:
        lines += [f"listeners.ssl.default = 127.0.0.1:{tls_port}", f"ssl_options.cacertfile = {tls.ca_certificates}",
                  f"ssl_options.certfile = {tls.certificate}", f"ssl_options.keyfile = {tls.private_key}",
                  "ssl_options.verify = verify_peer", "ssl_options.fail_if_no_peer_cert = true"]  # fmt: skip
    return "\n".join([*lines, ""])


@contextmanager
def rabbitmq_server(folder: Path, *, netns: str | None = None, tls: TlsSection | None = None) -> Iterator[RabbitMQ]:
    """Start a RabbitMQ node with its files under ``folder`` (inside ``netns`` if given); stop it after.

    ``tls`` (certificate, key and CA files) adds an amqps:// listener (``RabbitMQ.tls_url``).
    """
    if not SERVER.exists():
        pytest.skip(f"real RabbitMQ test not possible: {SERVER} is absent (Debian package rabbitmq-server)")
    if _epmd() is None:
        pytest.skip("real RabbitMQ test not possible: no epmd under /usr/lib/erlang (Debian package erlang-base)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "home").mkdir(exist_ok=True)
    amqp_port, dist_port, epmd_port, tls_port = _free_ports(4, netns)
    (folder / "enabled_plugins").write_text("[].\n")
    (folder / "rabbitmq.conf").write_text(broker_config(amqp_port, tls_port, tls))
    broker = RabbitMQ(folder, f"liverfat-{secrets.token_hex(4)}@localhost", amqp_port, dist_port, epmd_port,
                      netns=netns, tls_port=tls_port if tls else None)  # fmt: skip
    try:
        broker.start()
        broker.ctl("add_user", USER, broker.password)  # definitions loaded at boot leave the node without users
        broker.ctl("set_permissions", "-p", "/", USER, ".*", ".*", ".*")
        yield broker
    finally:
        broker.close()
