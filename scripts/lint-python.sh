#!/usr/bin/env bash
# Lints the Python with ruff (pyflakes, pycodestyle, import order; settings in
# pyproject.toml). Installs it into .venv when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
[ -x .venv/bin/ruff ] || .venv/bin/pip install --quiet "ruff>=0.8" 2>&1 | { grep -v "^WARNING: Location" || true; }
.venv/bin/ruff check qwen_vl tests
echo "ruff: Python clean"
