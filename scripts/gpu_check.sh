#!/usr/bin/env bash
# The GPU check of the training core: bf16-mixed DPO steps of random-init ~0.5B and ~1.5B Llama-architecture
# models, ours and TRL's DPOTrainer on the same token ids: tokens/s, MFU (H200 bf16 peak), peak GPU memory
# (scripts/gpu_check.py says how each is measured).
#
#   bash scripts/gpu_check.sh            on a GPU machine (prints one JSON line per model and side)
#   bash scripts/gpu_check.sh --dry-run  the same code path on the CPU with two tiny models (tests run it)
#
# A GPU machine with torch, transformers, accelerate and peft but not hydra-core, omegaconf, trl or datasets
# installs them from wheels carried in scripts/wheels/ when that folder exists; make it beforehand with
#   pip download --only-binary=:all: -d scripts/wheels hydra-core omegaconf antlr4-python3-runtime trl datasets
# (and flash-attn's wheel for the GPU's torch and CUDA, if one exists: without it both sides run sdpa).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
if [[ -d scripts/wheels ]]; then
    "$PYTHON" -m pip install -q --no-index --find-links scripts/wheels hydra-core omegaconf trl datasets flash-attn \
        2>/dev/null || "$PYTHON" -m pip install -q --no-index --find-links scripts/wheels hydra-core omegaconf
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
