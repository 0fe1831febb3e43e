#!/usr/bin/env bash
# README command 2 (and CI): set up, lint, run every test including the slow end-to-end ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# pytest exits 5 when it collects nothing; with `set -e` that fails the run instead of passing silently.
HF_HUB_OFFLINE=1 WANDB_MODE=offline .venv/bin/python -m pytest -q "$@"
