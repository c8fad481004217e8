#!/usr/bin/env bash
# Install what csi-wasm needs on a fresh Debian machine (as root): the registry the demo and tests run,
# Python's venv support, and the package itself in .venv. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

# Fresh cloud machines run unattended upgrades at boot: wait for their apt lock instead of failing.
APT_LOCK_WAIT_SECONDS=300
apt_install() {
  echo "setup: installing Debian packages: $* (waiting up to ${APT_LOCK_WAIT_SECONDS}s for another apt to finish)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_SECONDS" update -qq
  apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_SECONDS" install -y -qq --no-install-recommends "$@" >/dev/null
}

need=()
command -v python3 >/dev/null || need+=(python3)
# A minimal Debian has python3 without ensurepip, so `python3 -m venv` fails until python3-venv is in.
{ command -v python3 >/dev/null && python3 -c 'import ensurepip, venv' 2>/dev/null; } || need+=(python3-venv)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  apt_install "${need[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $(python3 --version)"
  python3 -m venv .venv
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
echo "setup: installing csi-wasm${extras} and its dependencies into .venv (about a minute on a fresh machine)"
# runtime dependencies at the exact versions the container image installs (deploy/constraints.txt)
.venv/bin/pip install -q --disable-pip-version-check -c deploy/constraints.txt -e ".${extras}"
echo "setup: done (.venv/bin/csi-wasm)"
