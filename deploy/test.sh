#!/usr/bin/env bash
# Set up everything (system packages, .venv, model weights) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-system-packages.sh
deploy/setup.sh --test
exec .venv/bin/python -m pytest -q -rs "$@"
