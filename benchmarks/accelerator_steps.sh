#!/usr/bin/env bash
# The accelerator figures of docs/performance.md: the bf16 MoBY and EsViT Swin-T train steps at the papers'
# per-device batches (MoBY 64, EsViT 32), each against the same step in PyTorch (timm's Swin-T, torch.autocast)
# on the same GPU, alternating rounds; throughput, peak memory, XLA's FLOP count and MFU.
#   bash benchmarks/accelerator_steps.sh [log folder]
# PYTHON: the interpreter for both sides (needs jax with a GPU/TPU backend; torch + timm for the comparison).
set -u
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
LOGS=${1:-/tmp/swin_ssl_accelerator}
mkdir -p "$LOGS"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the PyTorch side shares the device
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
TORCH=$(command -v "$PYTHON")
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())" 2>&1 | tee "$LOGS/devices.txt"
timeout "${ESVIT_TIMEOUT:-300}" "$PYTHON" esvit_step.py --dtype bfloat16 --batch "${ESVIT_BATCH:-32}" --rounds 5 \
  --steps 5 --skip_region --torch-python "$TORCH" 2>&1 | tee "$LOGS/esvit.txt"
timeout "${MOBY_TIMEOUT:-240}" "$PYTHON" moby_step.py --dtype bfloat16 --batch "${MOBY_BATCH:-64}" --rounds 5 \
  --steps 10 --torch-python "$TORCH" 2>&1 | tee "$LOGS/moby.txt"
