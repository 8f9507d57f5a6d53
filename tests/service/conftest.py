"""Helpers for the node's tests: free ports, small phantom series, dcmtk tools, node configs."""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from liverfat.service.config import NodeConfig, NodeSection, SpoolSection
from tests.phantom import Grid, Phantom, SeriesHeader, write_series

if TYPE_CHECKING:
    from tests.service.test_sender import Receiver

DCMTK_BIN = Path("/usr/bin")  # by full path: the venv's pynetdicom installs its own storescu/echoscu
STORESCU = DCMTK_BIN / "storescu"
ECHOSCU = DCMTK_BIN / "echoscu"
STORESCP = DCMTK_BIN / "storescp"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


_PORTS_BELOW_EPHEMERAL = range(20000, 32768)  # Linux hands out 32768-60999 to outgoing connections


def free_port() -> int:
    """A localhost port free now, below the kernel's ephemeral range.

    A port from ``bind(("", 0))`` comes from the ephemeral range, which every outgoing connection
    (dcmtk, the sender, probes) draws from too: between this probe and the node's own bind, one of
    them could take it ("Address already in use" seen in CI). Below that range only another probe
    of this kind could, and each probe checks.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.choice(_PORTS_BELOW_EPHEMERAL)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free localhost port found below the ephemeral range")


def small_series(folder: Path, slices: int = 6, size: int = 48, header: SeriesHeader | None = None) -> list[Path]:
    """A tiny CT series (``size`` x ``size`` pixels, ``slices`` slices): enough for network tests."""
    grid = Grid(rows=size, columns=size, pixel_spacing_mm=358.0 / size,
                slice_positions_mm=tuple(np.arange(slices) * 2.5 - 5.0))  # fmt: skip
    return write_series(folder, Phantom(), grid, header)


PHANTOM_LIVER_HU = 32.0  # below the 40 HU threshold: graded moderate-to-severe


def phantom_series(folder: Path, header: SeriesHeader | None = None, liver_hu: float = PHANTOM_LIVER_HU) -> list[Path]:
    """A phantom chest CT whose liver is fully inside a small field of view (64 x 64 x 57): quick to analyse."""
    grid = Grid(rows=64, columns=64, pixel_spacing_mm=3.4, centre=(-65.0, -5.0, 0.0),
                slice_positions_mm=tuple(np.arange(-70.0, 70.1, 2.5)))  # fmt: skip
    return write_series(folder, Phantom().with_liver_hu(liver_hu), grid, header)


def node_config(tmp_path: Path, **node: object) -> NodeConfig:
    """A node on a free localhost port with its spool under ``tmp_path``."""
    return NodeConfig(node=NodeSection(host="127.0.0.1", port=free_port(), **node),  # type: ignore[arg-type]
                      spool=SpoolSection(dir=tmp_path / "spool", min_free_disk_mb=0))  # fmt: skip


def dcmtk(*args: str | Path | int, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a dcmtk tool (full path first) with TCP_NODELAY=1, capturing its output."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV,
                          check=False)  # fmt: skip


def storescu(port: int, path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu as TESTSCU to LIVERFAT on localhost (``options`` such as ``+sd``, ``-R``)."""
    return dcmtk(STORESCU, *options, "-aet", "TESTSCU", "-aec", "LIVERFAT", "127.0.0.1", port, path)


@pytest.fixture(scope="session")
def require_dcmtk() -> None:
    missing = [str(tool) for tool in (STORESCU, ECHOSCU, STORESCP) if not tool.exists()]
    if missing:
        pytest.skip(f"dcmtk is not installed ({', '.join(missing)} missing): apt-get install dcmtk")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real C-STORE SCP (pynetdicom) on a free port, the destination a node sends its results to."""
    from tests.service.test_sender import Receiver  # a test module: imported when the fixture is used

    started = Receiver(free_port()).start()
    yield started
    started.stop()
