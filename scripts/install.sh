#!/usr/bin/env bash
# Install rnnlm and its test tools into the current Python environment.
#
# PyTorch: where there is no NVIDIA GPU, take the CPU build of torch (a bare `pip install
# torch` on Linux downloads a multi-GB CUDA build). A CPU wheel already reachable by pip
# (a local wheel directory / find-links) is used first; otherwise PyTorch's CPU index.
# Set RNNLM_TORCH_INDEX to force another index, or install torch yourself beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the default (CUDA) build of torch"
    "$PY" -m pip install "torch>=2.4"
elif [ -n "${RNNLM_TORCH_INDEX:-}" ]; then
    "$PY" -m pip install "torch>=2.4" --index-url "$RNNLM_TORCH_INDEX"
else
    echo "no GPU: installing the CPU build of torch"
    # 1) a CPU wheel pip can already see offline (e.g. a wheel directory in pip's find-links),
    #    without its dependencies, which the normal install below brings in;
    # 2) else PyTorch's own CPU-only index.
    if ! "$PY" -m pip install --no-index --no-deps "torch>=2.4" 2>/dev/null; then
        "$PY" -m pip install "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
    fi
fi
"$PY" -m pip install -e ".[dev]"
"$PY" -m rnnlm --version
