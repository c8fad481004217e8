#!/usr/bin/env bash
# The whole default test suite (real registry, real mounts; needs root). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest "$@"
