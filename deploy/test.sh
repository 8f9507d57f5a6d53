#!/usr/bin/env bash
# Set up everything (system packages, .venv, model weights) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/install-system-packages.sh
deploy/setup.sh --test
# nnU-Net v1 itself, only as the reference the v1-import tests compare against
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps nnunet==1.7.1 medpy==0.5.2
# Type-check the package first (configured in pyproject.toml [tool.mypy]); any error stops the run
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q -rs "$@"
