#!/usr/bin/env bash
# Real-size BLIP-2 against transformers on one GPU, the stage-1 training step against the
# LAVIS-style step (benchmarks/stage1_step.py), and `blip2lab train finetune` at OPT-2.7B's
# size in the paper's mode, LoRA and 8-bit (benchmarks/finetune_step.py), every figure into one
# JSON (benchmarks/gpu.py says what is measured and how).
#
#   bash benchmarks/gpu.sh [OUT.json]          # CUDA, real sizes (default benchmarks/results/gpu.json)
#   bash benchmarks/gpu.sh --parts finetune [OUT.json]   # the fine-tuning part alone (~4 min)
#   bash benchmarks/gpu.sh --tiny [OUT.json]   # CPU dry run of the same code at tiny sizes (~1 min)
#
# Needs torch, transformers, accelerate, timm, numpy, safetensors and this repository, which
# is not installed but put on PYTHONPATH; the fine-tuning part also peft, tensorboard, pillow
# and, for its 8-bit figure, bitsandbytes (without it that figure says it was skipped). PYTHON picks the interpreter (default: the
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
