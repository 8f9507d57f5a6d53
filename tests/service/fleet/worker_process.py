"""A fleet worker as a real subprocess (``python -m tests.service.fleet.worker_main``), for tests and benchmarks.

Its own session (process group), so :meth:`WorkerProcess.kill` takes the Celery main process and
its prefork children down together, as a host that dies would; optionally inside a network
namespace (``ip netns exec`` execs the command, so the PID held is the worker's own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.service.node_process import REPO, toml, wait_for

READY_S = 90.0  # python start, imports, Celery's start and the children's model loads on a busy 2-core machine
STOP_S = 60.0


class WorkerProcess:
    """One ``liverfat worker`` configuration, started and stopped as often as a test needs; its log accumulates."""

    def __init__(self, folder: Path, sections: Mapping[str, Mapping[str, Any]], netns: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "worker.toml"
        self.config_path.write_text(toml(sections))
        self.log_path = folder / "worker.log"
        self.netns = netns
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, delay_s: float = 0.0, kill_series: str | None = None, wait_ready: bool = True) -> None:
        """Start the worker; ``wait_ready``: until it consumes (the broker must be up) and a child loaded its model."""
        command = [sys.executable, "-m", "tests.service.fleet.worker_main", str(self.config_path),
                   "--delay-s", str(delay_s)]  # fmt: skip
        command += ["--kill-series", kill_series] if kill_series else []
        if self.netns:
            command = ["ip", "netns", "exec", self.netns, *command]
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)  # fmt: skip
        if wait_ready:
            wait_for(lambda: self._exited() or self.ready(offset), READY_S, "the fleet worker to be ready")

    def ready(self, offset: int = 0) -> bool:
        text = self.log_text()[offset:]
        return " ready." in text and "model loaded" in text

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown: the series in hand is finished) and wait; then the group is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.kill()
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and its children at once."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=STOP_S)

    def _exited(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the fleet worker exited with {self.process.returncode}: {self.log_text()[-3000:]}")
        return False
