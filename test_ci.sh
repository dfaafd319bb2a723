#!/usr/bin/env bash
# The test command: argument checks, data loading and bad input, evaluation over 2 ranks, and end-to-end runs of
# run_finetuning.sh on the CPU with the real beans images and the pretrained DeiT-tiny in ../shared.
# GPU tests (tests/test_gpu.py) run where a CUDA GPU is present and are skipped elsewhere.
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false
python3 -m pytest --durations=10 "$@"
