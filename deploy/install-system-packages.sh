#!/usr/bin/env bash
# Debian packages the tests talk to: a real Orthanc PACS, dcmtk's network tools and dicom3tools'
# dciodvfy validator. Needs root (apt-get).
set -euo pipefail
packages=(orthanc orthanc-dicomweb dcmtk dicom3tools curl iproute2)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
