"""``liverfat worker --config worker.toml``: this host's fleet worker (``[queue] broker`` must be set).

``add_worker_command`` is called by ``liverfat.service.cli.build_parser``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from liverfat.service.config import load_config
from liverfat.service.logs import configure_logging


def add_worker_command(subparsers: Any) -> None:
    worker = subparsers.add_parser(
        "worker", help="analyse series published by a node or 'analyze --broker' (Celery on RabbitMQ)",
        description="Consumes liverfat.series from [queue] broker with one child process per GPU ([worker] devices) "
        "or [worker] count CPU children; reads the series from and writes the results to storage shared with the "
        "publisher ([queue] path_map when it is mounted elsewhere here). SIGTERM finishes the series in hand.",
    )  # fmt: skip
    worker.add_argument("--config", type=Path, help="TOML configuration file ([queue], [model], [worker], [log]); "
                        "LIVERFAT_<SECTION>_<KEY> variables override it")  # fmt: skip
    worker.set_defaults(command=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from liverfat.service.fleet.worker import FleetWorker  # celery and the analysis: only for this command

    config = load_config(args.config)
    configure_logging(config.log)
    return FleetWorker(config).run()
