#!/usr/bin/env bash
# Real-size BLIP-2 against transformers on one GPU, and the stage-1 training step against the
# LAVIS-style step (benchmarks/stage1_step.py), every figure into one JSON (benchmarks/gpu.py
# says what is measured and how).
#
#   bash benchmarks/gpu.sh [OUT.json]          # CUDA, real sizes (default benchmarks/results/gpu.json)
#   bash benchmarks/gpu.sh --tiny [OUT.json]   # CPU dry run of the same code at tiny sizes (< 1 min)
#
# Needs torch, transformers, accelerate, timm, numpy, safetensors and this repository, which
# is not installed but put on PYTHONPATH. PYTHON picks the interpreter (default: the
# repository's .venv/bin/python if present, else python3). Further options go to gpu.py
# (--parts caption_opt,stage1,itm,...; --deadline SECONDS).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" "$ROOT/benchmarks/gpu.py" "$@"
