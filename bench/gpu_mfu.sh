#!/usr/bin/env bash
# The GPU figure, in one command on a machine with NVIDIA GPUs (a bare one is fine):
#
#     bash bench/gpu_mfu.sh
#
# Installs kubetune's trainer with pip into a venv (PYTHON, VENV to override), builds a ~1.1B
# Llama-style model from its config with random weights (TinyLlama's shape), packed rows of 2048
# tokens, then runs kubetune's real `train` step under torchrun over every GPU it finds: bf16,
# FSDP, FlexAttention (flash-attention 2 when installed), activation checkpointing. Prints
# tokens/s, MFU (from the trainer's own progress report) and peak GPU memory; the MFU line last.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$HOME/.cache/kubetune/gpu-bench-venv}
WORK=${WORK:-$(mktemp -d)}
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -lt 1 ]; then echo "no NVIDIA GPU found (nvidia-smi -L)" >&2; exit 1; fi

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[trainer]"

"$VENV/bin/python" bench/gpu/mfu_run.py prepare "$WORK" --gpus "$GPUS"
"$VENV/bin/torchrun" --standalone --nproc-per-node "$GPUS" bench/gpu/mfu_run.py train "$WORK" --gpus "$GPUS"
