#!/usr/bin/env bash
# Sets up the environment, then runs the test suite in two pytest processes: everything
# but the real-widths parity, then the real-widths parity alone (its float32 engines need
# ~14 GB, which the first pass's engines would not leave free). Extra arguments go to a
# single pytest run of the tests they name, in place of the two passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,dev
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest -ra "$@"
fi
.venv/bin/python -m pytest -ra --durations=15 -m "not real_widths"
QWEN_VL_REAL_WIDTHS_TESTS=1 exec .venv/bin/python -m pytest -ra -m real_widths tests/test_tensor_parallel.py tests/test_quantized.py
