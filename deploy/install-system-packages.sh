#!/usr/bin/env bash
# Debian packages the tests talk to: a real Orthanc PACS (with DICOMweb for the viewer), dcmtk's
# network tools, dicom3tools' dciodvfy validator, Chromium + Node.js for the OHIF viewer test, and
# systemd-analyze (package systemd) for the unit's checks.
# Needs root (apt-get).
set -euo pipefail
packages=(orthanc orthanc-dicomweb dcmtk dicom3tools curl iproute2 chromium systemd)
# Node.js may come from elsewhere (it ships npm itself); take Debian's only when there is none.
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
