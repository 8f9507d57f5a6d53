"""Run the real node with the phantom backend: ``python -m tests.service.node_main [CONFIG] [--delay-s S]``.

``--real-model`` runs the configured model instead (what ``liverfat serve`` does).

The node's tests and ``bench/bench_node.py`` start it as a subprocess this way, so they can
SIGKILL and SIGTERM it; everything but the segmentation model is the product's own code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from liverfat.service.config import load_config
from liverfat.service.logs import configure_logging
from liverfat.service.node import run
from tests.service.fake_backend import PhantomLiverBackend


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", nargs="?", type=Path, help="TOML configuration (default: embedded defaults)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="make each segmentation take this long")
    parser.add_argument("--real-model", action="store_true", help="the configured model, not the phantom backend")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    configure_logging(config.log)
    return run(config, load_model=None if args.real_model else PhantomLiverBackend.loader(args.delay_s))


if __name__ == "__main__":
    sys.exit(main())
