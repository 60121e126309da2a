#!/usr/bin/env bash
# The main job: sets up the environment, then generates an answer about an
# image from the built-in demo checkpoint (written on first use).
# Extra arguments go to `python -m qwen_vl.server.demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev
exec .venv/bin/python -m qwen_vl.server.demo "$@"
