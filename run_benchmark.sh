#!/usr/bin/env bash
# Times training steps of ViT-B/16 for each plugin and for plain PyTorch (eager and compiled) in one run, and
# prints the table (also written to OUTPUT). Variables can be overridden: BATCH_SIZES=128 bash run_benchmark.sh
# CONFIGURATIONS may also name torch_compile_max_autotune (about 4.5 minutes of autotuning for ViT-B/16).
# Without a GPU it times a tiny ViT on the CPU (torch and torch_ddp only), which checks the script, not the speed.
set -euo pipefail
cd "$(dirname "$0")"

CONFIGURATIONS=${CONFIGURATIONS:-torch,torch_compile,torch_ddp,torch_ddp_fp16,low_level_zero,gemini,hybrid_parallel}
BATCH_SIZES=${BATCH_SIZES:-32,128}  # batch size of each GPU
GPUNUM=${GPUNUM:-1}                 # >1 times the plugins data-parallel over GPUNUM GPUs (references need 1)
STEPS=${STEPS:-30}                  # timed steps of each configuration, after WARMUP_STEPS
WARMUP_STEPS=${WARMUP_STEPS:-10}
OUTPUT=${OUTPUT:-benchmark.json}
PROFILE_DIR=${PROFILE_DIR:-}        # set: also writes a profile of each configuration's steps there

extra=()
if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "No CUDA GPU found: timing a tiny ViT on the CPU."
  CONFIGURATIONS=torch,torch_ddp extra=(--tiny)
fi

torchrun --standalone --nproc_per_node "$GPUNUM" vit_benchmark.py \
  --configurations "$CONFIGURATIONS" \
  --batch_sizes "$BATCH_SIZES" \
  --steps "$STEPS" \
  --warmup_steps "$WARMUP_STEPS" \
  --json "$OUTPUT" \
  ${PROFILE_DIR:+--profile "$PROFILE_DIR"} \
  "${extra[@]}"
