#!/usr/bin/env bash
# Installs Debian's etcd-server when no `etcd` binary is on PATH (tests and the
# demo start their own etcd on loopback; nothing here starts a system service).
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then
    exit 0
fi
echo "ensure-etcd: no etcd on PATH, installing Debian's etcd-server" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
# policy-rc.d keeps the package's postinst from starting a system etcd here.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends etcd-server
command -v etcd >/dev/null 2>&1 || { echo "ensure-etcd: etcd still not on PATH" >&2; exit 1; }
