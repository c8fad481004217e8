#!/usr/bin/env bash
# Install what csi-wasm needs on a fresh Debian machine (as root): the registry the demo and tests run,
# and the package itself in .venv. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
command -v curl >/dev/null || need+=(curl)
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
# runtime dependencies at the exact versions the container image installs (deploy/constraints.txt)
.venv/bin/pip install -q --disable-pip-version-check -c deploy/constraints.txt -e ".${extras}"
