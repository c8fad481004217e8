#!/usr/bin/env bash
# The driver's main job on this machine: a local registry, a demo module, the driver, three pods.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/csi-wasm demo "$@"
