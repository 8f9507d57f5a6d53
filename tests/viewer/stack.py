"""A complete reading setup for browser tests: Orthanc (DICOMweb) + OHIF + headless Chromium.

Everything runs inside a private network namespace where only ``lo`` exists: Orthanc 1.10
cannot bind to loopback only, and Chromium must not reach the outside network. Orthanc and
the namespace come from ``tests/orthanc.py`` (with the DICOMweb plugin); this module adds
OHIF's server and the browser in the same namespace. The viewer
tools (OHIF's prebuilt dist from the npm package ``@ohif/app`` and ``playwright-core``) are
installed once into a cache folder outside git; Chromium is Debian's ``/usr/bin/chromium``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.orthanc import ORTHANC, OrthancServer, orthanc_server

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
OHIF_DEPLOY = REPO / "deploy" / "ohif"
DRIVER = Path(__file__).resolve().parent / "drive_ohif.mjs"
CACHE_DIR = Path(os.environ.get("LIVERFAT_VIEWER_CACHE", REPO / ".cache" / "viewer"))
PLAYWRIGHT_CORE_VERSION = "1.65.1"
CHROMIUM = Path("/usr/bin/chromium")
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
DICOMWEB_PLUGIN = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"
OHIF_PORT = 3000  # inside the private namespace every port is free
STARTUP_TIMEOUT_S = 30.0
DRIVER_TIMEOUT_S = 180.0
DEFAULT_TIMEOUT_S = 60.0


def missing_prerequisite() -> str | None:
    """Why the viewer test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root for a private network namespace (ip netns add)"
    for tool in ("npm", "node", "ip", "storescu", "curl"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (deploy/install-system-packages.sh installs it)"
    for path, package in ((CHROMIUM, "chromium"), (Path(ORTHANC), "orthanc"), (DICOMWEB_PLUGIN, "orthanc-dicomweb")):
        if not path.exists():
            return f"{path} is missing: apt-get install {package}"
    return None


@dataclass(frozen=True)
class ViewerTools:
    ohif_dist: Path  # package/dist of @ohif/app
    playwright_core: Path  # node_modules/playwright-core


def install_viewer_tools(cache: Path = CACHE_DIR) -> ViewerTools:
    """Fetch OHIF and playwright-core from the npm registry into ``cache`` (once; later calls reuse it)."""
    cache.mkdir(parents=True, exist_ok=True)
    installed = _checked([OHIF_DEPLOY / "install_ohif.sh", cache])
    dist = Path(installed.strip().splitlines()[-1])
    node_prefix = cache / f"playwright-core-{PLAYWRIGHT_CORE_VERSION}"
    package = node_prefix / "node_modules" / "playwright-core"
    if not (package / "package.json").is_file():
        _checked(["npm", "install", "--prefix", node_prefix, "--no-audit", "--no-fund", "--loglevel=error",
                  f"playwright-core@{PLAYWRIGHT_CORE_VERSION}"])  # fmt: skip
    return ViewerTools(ohif_dist=dist.resolve(), playwright_core=package.resolve())


def _checked(args: Sequence[str | Path]) -> str:
    """Run an install step; its stderr goes into the error (npm's registry errors say what went wrong)."""
    completed = subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({completed.returncode}): {completed.stderr[-3000:]}")
    return completed.stdout


class NamespaceProcesses:
    """Processes in an existing network namespace (``tests/orthanc.py`` made it); stopped on exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._processes: list[tuple[subprocess.Popen[bytes], Any]] = []

    def __enter__(self) -> NamespaceProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        for process, log in reversed(self._processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            log.close()

    def command(self, args: Sequence[str | Path]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, args)]

    def run(
        self, args: Sequence[str | Path], *, env: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(args), capture_output=True, text=True, env=env, timeout=timeout, check=False
        )

    def spawn(self, args: Sequence[str | Path], log_path: Path) -> subprocess.Popen[bytes]:
        """Start a long-running process (``ip netns exec`` execs, so the PID is the process itself)."""
        log = log_path.open("wb")
        process = subprocess.Popen(self.command(args), stdout=log, stderr=subprocess.STDOUT)
        self._processes.append((process, log))
        return process

    def wait_http(self, url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}: {log_path.read_text()[-2000:]}")
            if self.run(["curl", "-sf", "-o", "/dev/null", url], timeout=10).returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{url} did not answer within {STARTUP_TIMEOUT_S} s; log: {log_path}")


def orthanc_dicomweb_config() -> dict[str, Any]:
    """What the viewer's Orthanc adds to ``tests/orthanc.py``'s: the DICOMweb section of ``deploy/ohif/``."""
    return {
        "Name": "LIVERFAT-VIEWER-TEST",
        "HttpCompressionEnabled": False,
        "RemoteAccessAllowed": True,  # the proxy is a local client; the netns has no other interface
        **json.loads((OHIF_DEPLOY / "orthanc-dicomweb.json").read_text()),
    }


@dataclass
class ReadingSetup:
    """Orthanc + OHIF served same-origin, in Orthanc's namespace; ``url`` is OHIF's base URL."""

    orthanc: OrthancServer
    processes: NamespaceProcesses
    tools: ViewerTools
    work: Path
    url: str

    def store(self, paths: Sequence[Path]) -> None:
        """C-STORE files into Orthanc with dcmtk's storescu (-R: only the needed presentation contexts)."""
        self.orthanc.store(paths, all_sop_classes=True)

    def drive(self, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        """Run ``drive_ohif.mjs`` in headless Chromium with ``spec``; returns its JSON report."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (*out_dir.glob("*.png"), *out_dir.glob("*.json"), *out_dir.glob("*.log")):
            stale.unlink()  # a screenshot of an earlier run must not pass for this one's
        spec_path = out_dir / "spec.json"
        report_path = out_dir / "report.json"
        spec_path.write_text(json.dumps({**spec, "baseUrl": self.url, "outDir": str(out_dir)}, indent=1))
        env = {
            **os.environ,
            "PLAYWRIGHT_CORE": str(self.tools.playwright_core),
            "CHROMIUM": str(CHROMIUM),
            "HOME": str(self.work),  # Chromium's crash and font caches stay in the scratch folder
        }
        result = self.processes.run(["node", DRIVER, spec_path, report_path], env=env, timeout=DRIVER_TIMEOUT_S)
        (out_dir / "driver.log").write_text(result.stdout + result.stderr)
        if not report_path.is_file():
            raise RuntimeError(f"drive_ohif.mjs wrote no report (rc {result.returncode}): {result.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(report_path.read_text())
        return report


@contextmanager
def reading_setup(work: Path, tools: ViewerTools) -> Iterator[ReadingSetup]:
    """Start Orthanc (DICOMweb) in a fresh network namespace under ``work``, and the OHIF server next to it."""
    work.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        orthanc = stack.enter_context(
            orthanc_server(work / "orthanc", plugins=[DICOMWEB_PLUGIN], extra_config=orthanc_dicomweb_config())
        )
        processes = stack.enter_context(NamespaceProcesses(orthanc.netns))
        ohif_log = work / "serve_ohif.log"
        server = processes.spawn(
            [sys.executable, OHIF_DEPLOY / "serve_ohif.py", "--dist", tools.ohif_dist,
             "--orthanc", f"http://127.0.0.1:{orthanc.http_port}", "--port", str(OHIF_PORT)],
            ohif_log,
        )  # fmt: skip
        url = f"http://127.0.0.1:{OHIF_PORT}"
        processes.wait_http(f"{url}/app-config.js", server, ohif_log)
        yield ReadingSetup(orthanc=orthanc, processes=processes, tools=tools, work=work, url=url)
