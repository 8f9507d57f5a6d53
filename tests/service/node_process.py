"""The node as a real subprocess (``python -m tests.service.node_main``), for tests and benchmarks.

Optionally inside a network namespace (``ip netns exec NS``), where ``ip netns exec`` execs the
command, so the PID we hold is the node's own and SIGKILL reaches it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from liverfat.service.config import NodeConfig, load_config
from liverfat.service.spool import Job, JobState, Spool

REPO = Path(__file__).resolve().parents[2]
READY_S = 90.0  # python start, imports, and the worker's first model load on a busy 2-core machine


def toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A small TOML writer for test configurations (strings, numbers, booleans, lists of those)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return repr(item)
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(v) for v in item) + "]"
        return '"' + str(item).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join(f"[{name}]\n" + "".join(f"{key} = {value(v)}\n" for key, v in keys.items()) + "\n"
                   for name, keys in sections.items())  # fmt: skip


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; return its value or fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(interval)


class NodeProcess:
    """One node configuration, started and stopped as often as a test needs; its log accumulates."""

    def __init__(self, folder: Path, sections: Mapping[str, Mapping[str, Any]], netns: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "liverfat.toml"
        self.config_path.write_text(toml(sections))
        self.config: NodeConfig = load_config(self.config_path, environ={})
        self.log_path = folder / "node.log"
        self.netns = netns
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self, delay_s: float = 0.0, wait_model: bool = True, real_model: bool = False) -> None:
        """Start the node; ``real_model`` runs the configured model instead of the phantom backend."""
        command = [sys.executable, "-m", "tests.service.node_main", str(self.config_path), "--delay-s", str(delay_s)]
        command += ["--real-model"] if real_model else []
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
        wait_for(lambda: self._exited_early() or "ready:" in self.run_log(), READY_S, "the node to start")
        if wait_model:
            wait_for(lambda: self._exited_early() or "model loaded" in self.run_log(), READY_S, "the worker's model")

    def _exited_early(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the node exited with {self.process.returncode}:\n{self.run_log()[-3000:]}")
        return False

    def run_log(self) -> str:
        """The log of the current run only."""
        with self.log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def worker_pid(self) -> int:
        pids = re.findall(r"worker process (\d+) started", self.run_log())
        return int(pids[-1])

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)
        self.process = None

    def close(self) -> None:
        """Kill the node if it still runs (test teardown after a failure)."""
        if self.process is not None and self.process.poll() is None:
            self.kill()
        self.process = None

    def spool(self) -> Spool:
        return Spool(self.config.spool.dir)

    def jobs(self) -> list[Job]:
        """The spool's jobs, newest first (read through a connection of our own)."""
        spool = self.spool()
        try:
            return spool.jobs()
        finally:
            spool.close()

    def state(self) -> JobState | None:
        """The newest job's state, or ``None`` before anything arrived."""
        jobs = self.jobs()
        return jobs[0].state if jobs else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def sending_node(folder: Path, receiver_port: int, **extra: Mapping[str, Any]) -> NodeProcess:
    """A node on free localhost ports, its spool in ``folder``, sending to ``PACS`` at ``receiver_port``.

    Series complete after 1 s; sends retry fast. ``extra`` sections are merged over these.
    """
    from tests.service.conftest import free_port

    sections: dict[str, dict[str, Any]] = {
        "node": {"host": "127.0.0.1", "port": free_port()},
        "spool": {"dir": str(folder / "spool"), "min_free_disk_mb": 0, "nearly_full_margin_mb": 0},
        "series": {"stable_seconds": 1.0},
        "send": {"destinations": [f"PACS@127.0.0.1:{receiver_port}"], "first_delay_s": 0.2, "max_delay_s": 1.0},
        "http": {"host": "127.0.0.1", "port": free_port()},
    }
    for name, keys in extra.items():
        sections.setdefault(name, {}).update(keys)
    return NodeProcess(folder / "node", sections)
