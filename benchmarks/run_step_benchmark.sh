#!/usr/bin/env bash
# Times training steps of a ViT (ViT-B/16 unless MODEL_SIZES says) for each plugin and for plain PyTorch (eager and
# compiled) in one run, and prints the table (also written to OUTPUT). Variables can be overridden:
#   BATCH_SIZES=128 bash benchmarks/run_step_benchmark.sh
# CONFIGURATIONS may also name torch_compile_max_autotune (about 4.5 minutes of autotuning for ViT-B/16), a plugin
# with what it offloads (gemini:optimizer, gemini:all:0.5, low_level_zero:optimizer) or with LoRA adapters over 16-bit
# or 4-bit frozen weights (torch_ddp+lora, torch_ddp+qlora), hybrid_parallel with the model split over GPUs
# (hybrid_parallel/tp2, hybrid_parallel/tp2/pp2: GPUNUM a multiple of tp x pp), and DeepSpeed with offload
# (deepspeed_zero2_offload, deepspeed_zero3_offload; if installed), the peer for models larger than the GPU.
# LARGEST=1 is the memory mode: each configuration's largest model of MODEL_SIZES that trains, for example
#   LARGEST=1 MAX_GPU_MEMORY_GIB=24 GRAD_CHECKPOINT=1 BATCH_SIZES=32 MODEL_SIZES=g/14,G/14,e/14,5.5B/14,6.5B/14 \
#   CONFIGURATIONS=torch,deepspeed_zero2_offload,gemini:all bash benchmarks/run_step_benchmark.sh
# FASTEST=1 is the speed mode: each configuration at each size at the BATCH_SIZES from the smallest up until one does
# not fit, and the fastest, for example under the same cap
#   FASTEST=1 MAX_GPU_MEMORY_GIB=24 GRAD_CHECKPOINT=1 BATCH_SIZES=32,64,128,256 MODEL_SIZES=G/14,6.5B/14 \
#   CONFIGURATIONS=gemini:optimizer,gemini:all,deepspeed_zero2_offload,deepspeed_zero3_offload bash benchmarks/run_step_benchmark.sh
# Without a GPU it times a tiny ViT on the CPU (torch, and torch_ddp in full and with LoRA), which checks the script,
# not the speed.
set -euo pipefail
# the benchmark imports the example's modules; paths given stay relative to where this is run from
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

CONFIGURATIONS=${CONFIGURATIONS:-}  # default: the PyTorch references and every plugin (CPU: torch, torch_ddp, +lora)
MODEL_SIZES=${MODEL_SIZES:-}       # tiny, B/16, L/16, H/14, g/14, G/14, e/14, 5.5B/14, 6.5B/14, 8B/14, 12B/14, 22B/14 (default: B/16, tiny on CPU)
BATCH_SIZES=${BATCH_SIZES:-32,128}  # batch size of each GPU
GPUNUM=${GPUNUM:-1}                 # >1 times the plugins data-parallel over GPUNUM GPUs (references need 1)
STEPS=${STEPS:-30}                  # timed steps of each configuration, after WARMUP_STEPS
WARMUP_STEPS=${WARMUP_STEPS:-10}
GRAD_CHECKPOINT=${GRAD_CHECKPOINT:-0}       # 1: recompute activations in the backward pass
MAX_GPU_MEMORY_GIB=${MAX_GPU_MEMORY_GIB:-}  # cap each process's GPU memory (rehearse a smaller GPU)
LARGEST=${LARGEST:-0}               # 1: memory mode, each configuration's largest model (one GPU, one batch size)
FASTEST=${FASTEST:-0}               # 1: speed mode, each configuration's fastest of BATCH_SIZES at each size (one GPU)
OUTPUT=${OUTPUT:-benchmark.json}
PROFILE_DIR=${PROFILE_DIR:-}        # set: also writes a profile of each configuration's steps there

if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "No CUDA GPU found: timing a tiny ViT on the CPU."
fi
benchmark=(-m benchmarks.step_benchmark
  ${CONFIGURATIONS:+--configurations "$CONFIGURATIONS"}
  ${MODEL_SIZES:+--model_sizes "$MODEL_SIZES"}
  --batch_sizes "$BATCH_SIZES"
  --steps "$STEPS"
  --warmup_steps "$WARMUP_STEPS"
  --json "$OUTPUT"
  ${PROFILE_DIR:+--profile "$PROFILE_DIR"}
  ${MAX_GPU_MEMORY_GIB:+--max_gpu_memory_gib "$MAX_GPU_MEMORY_GIB"}
  $([ "$GRAD_CHECKPOINT" = 1 ] && echo --grad_checkpoint || true))
if [ "$LARGEST" = 1 ]; then  # they start a process of their own for each configuration, size and batch
  python3 "${benchmark[@]}" --largest
elif [ "$FASTEST" = 1 ]; then
  python3 "${benchmark[@]}" --fastest
else
  torchrun --standalone --nproc_per_node "$GPUNUM" "${benchmark[@]}"
fi
