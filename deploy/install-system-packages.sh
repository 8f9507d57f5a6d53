#!/usr/bin/env bash
# Debian packages the tests talk to: a real Orthanc PACS (with DICOMweb for the viewer), dcmtk's
# network tools, dicom3tools' dciodvfy validator, Chromium + Node.js for the OHIF viewer test,
# systemd-analyze (package systemd) for the unit's checks, and RabbitMQ for the fleet's tests.
# Needs root (apt-get).
#
# The tests start their own RabbitMQ nodes on loopback ports (tests/broker.py); the package's own
# service (a broker on every interface, with epmd on port 4369) must not run: services are not
# started while apt-get installs (policy-rc.d), and a rabbitmq-server installed here is disabled
# under systemd, with the epmd socket that came with it.
set -euo pipefail
packages=(orthanc orthanc-dicomweb dcmtk dicom3tools curl iproute2 chromium systemd rabbitmq-server)
# Node.js may come from elsewhere (it ships npm itself); take Debian's only when there is none.
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if (( ${#missing[@]} )); then
    policy=/usr/sbin/policy-rc.d
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# install-system-packages.sh: no service starts while packages are installed\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    had_epmd=$(dpkg-query -W -f='${Status}' erlang-base 2>/dev/null | grep -c "install ok installed" || true)
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" rabbitmq-server "* && -d /run/systemd/system ]]; then
        units=(rabbitmq-server.service)
        (( had_epmd )) || units+=(epmd.socket epmd.service)
        systemctl disable --now "${units[@]}" >/dev/null 2>&1 || true
    fi
fi
