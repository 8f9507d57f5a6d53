#!/usr/bin/env bash
# Serve OHIF v3 for a local Orthanc (DICOMweb plugin on) at http://127.0.0.1:3000/.
# Usage: deploy/ohif/run_ohif.sh [--orthanc http://127.0.0.1:8042] [--orthanc-user USER:PASSWORD]
#                                [--host 127.0.0.1] [--port 3000]
# The first run fetches @ohif/app from the npm registry into $LIVERFAT_OHIF_DIR
# (default ~/.cache/liverfat/ohif). Needs python3 and, once, npm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="${LIVERFAT_OHIF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/liverfat/ohif}"
dist="$("$here/install_ohif.sh" "$cache")"
exec python3 "$here/serve_ohif.py" --dist "$dist" --app-config "$here/app-config.js" "$@"
