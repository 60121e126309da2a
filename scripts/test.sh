#!/usr/bin/env bash
# Sets up the environment, then runs the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev
exec .venv/bin/python -m pytest -ra "$@"
