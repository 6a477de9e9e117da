#!/usr/bin/env bash
# Install the Debian packages medlb's tests and benchmarks use, only when missing.
# Real peers, never mocks: HAProxy is the balancer to beat, iperf3/wrk/nginx load
# and serve the benchmarks, Chromium runs the dashboard test. Later modes add their peers
# here. Orthanc with its DICOMweb plugin is the real DICOMweb server behind medlb; DCMTK's
# echoscu/storescu/findscu/storescp are the real DICOM peers of mode: dicom.
set -euo pipefail

# binary -> Debian package
declare -A NEED=(
  [haproxy]=haproxy
  [iperf3]=iperf3
  [wrk]=wrk
  [nginx]=nginx
  [ps]=procps
  [ss]=iproute2
  [chromium]="chromium fonts-dejavu-core"
  [curl]=curl
  [openssl]=openssl
  [Orthanc]="orthanc orthanc-dicomweb"
  [storescp]=dcmtk
  [/usr/share/orthanc/plugins/libOrthancPostgreSQLIndex.so]="orthanc-postgresql postgresql"
)

missing=()
for bin in "${!NEED[@]}"; do
  # A key is a command name, or the absolute path of a file a package installs (plugins).
  if [[ "$bin" == /* ]]; then
    present=false; [ -e "$bin" ] && present=true
  else
    present=false; { command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ]; } && present=true
  fi
  if [ "$present" = false ]; then
    read -r -a pkgs <<< "${NEED[$bin]}"
    missing+=("${pkgs[@]}")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all Debian packages present"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages (${missing[*]}); run as root or install them: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian starts nginx and haproxy as services on install; the tests run their own.
for svc in nginx haproxy orthanc postgresql; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  if command -v service >/dev/null 2>&1; then service "$svc" stop >/dev/null 2>&1 || true; fi
done
echo "install-deps: done"
