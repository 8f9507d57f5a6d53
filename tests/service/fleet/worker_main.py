"""Run the real fleet worker with the phantom backend: ``python -m tests.service.fleet.worker_main CONFIG``.

``--delay-s`` makes each segmentation take that long; ``--kill-series UID`` SIGKILLs the worker
child that starts a task for that series (every time: a series that kills its worker).
Everything but the segmentation model is ``liverfat worker``'s own code (``FleetWorker``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from celery import signals

from liverfat.service.config import load_config
from liverfat.service.fleet.worker import FleetWorker
from liverfat.service.logs import configure_logging
from tests.service.fake_backend import PhantomLiverBackend


class KillSeries:
    """A ``task_prerun`` receiver that SIGKILLs its own process for one series."""

    def __init__(self, series_uid: str) -> None:
        self.series_uid = series_uid

    def __call__(self, args: tuple[Any, ...] = (), **_: Any) -> None:
        if args and args[0].get("series_uid") == self.series_uid:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", type=Path, help="TOML configuration with [queue] broker")
    parser.add_argument("--delay-s", type=float, default=0.0, help="make each segmentation take this long")
    parser.add_argument("--kill-series", help="SIGKILL the child that starts this series")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    configure_logging(config.log)
    if args.kill_series:
        signals.task_prerun.connect(KillSeries(args.kill_series), weak=False)
    return FleetWorker(config, load_model=PhantomLiverBackend.loader(args.delay_s)).run()


if __name__ == "__main__":
    sys.exit(main())
