#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install megatron_vlm with its test extras.
# torch is installed first and pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import megatron_vlm, megatron.core, nvidia.dali, pytest" 2>/dev/null \
   || [ setup.py -nt .venv/.megatron_vlm_installed ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
  touch .venv/.megatron_vlm_installed
fi
