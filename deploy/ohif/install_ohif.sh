#!/usr/bin/env bash
# Fetch the prebuilt OHIF v3 viewer (npm package @ohif/app, its package/dist folder) into DEST.
# Usage: deploy/ohif/install_ohif.sh DEST        -> DEST/ohif-app-<version>/package/dist
# Needs npm (Node.js 18+); downloads about 50 MB once, unpacks to about 200 MB. Idempotent.
set -euo pipefail
OHIF_VERSION="${OHIF_VERSION:-3.13.2}"
dest="${1:?usage: $0 DEST}"
target="$dest/ohif-app-$OHIF_VERSION"
if [[ -f "$target/package/dist/index.html" ]]; then
    echo "$target/package/dist"
    exit 0
fi
command -v npm >/dev/null || { echo "npm is needed to fetch @ohif/app (apt-get install nodejs npm)" >&2; exit 1; }
mkdir -p "$dest"
work="$(mktemp -d "$dest/.download.XXXXXX")"
trap 'rm -rf "$work"' EXIT
tarball="$(cd "$work" && npm pack --silent "@ohif/app@$OHIF_VERSION" 2>/dev/null | tail -n 1)"
mkdir "$work/unpacked"
tar xzf "$work/$tarball" -C "$work/unpacked"
[[ -f "$work/unpacked/package/dist/index.html" ]] || { echo "@ohif/app@$OHIF_VERSION has no package/dist/index.html" >&2; exit 1; }
rm -rf "$target"
mv "$work/unpacked" "$target"
echo "$target/package/dist"
