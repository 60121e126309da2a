#!/usr/bin/env bash
# The main job: sets up the environment, then starts the OpenAI-compatible
# server on 127.0.0.1:8000, serving the built-in demo model (expanded on
# first use) unless --model says otherwise. Extra arguments go to the server
# (`bash scripts/run.sh --help` lists them all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev
exec .venv/bin/python -m qwen_vl.server "$@"
