#!/usr/bin/env bash
# Fine-tunes a pretrained ViT on the beans dataset, then evaluates and saves it (see the README for the settings).
# Every variable below can be overridden from the environment: BS=16 LR=2e-4 bash run_finetuning.sh
# Extra arguments go to vit_train_demo.py as they are: bash run_finetuning.sh --grad_checkpoint
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${MODEL:-google/vit-base-patch16-224}  # hub id or local directory of a pretrained ViT, or of any image
                                             # classifier transformers loads (DeiT, BEiT, DINOv2, Swin, ConvNeXt)
IMAGE_SIZE=${IMAGE_SIZE:-}                   # fine-tune at this resolution, e.g. 384 (default: the checkpoint's)
DATASET=${DATASET:-beans}                    # hub id, or a local image folder, hub snapshot or save_to_disk folder
DATA_MODE=${DATA_MODE:-auto}                 # cache (decode once, keep on the GPU), stream (loader workers) or auto
CACHE_BUDGET_GIB=${CACHE_BUDGET_GIB:-}       # most memory the cache may take (auto: a quarter of the free memory)
NUM_WORKERS=${NUM_WORKERS:-}                 # loader workers decoding and resizing images (default: the cores but one)
SKIP_UNREADABLE=${SKIP_UNREADABLE:-0}        # 1: leave unreadable images out (named in results.json), 0: stop
OUTPUT_PATH=${OUTPUT_PATH:-./output_model}   # fine-tuned model, image processor and results.json
PLUGIN=${PLUGIN:-gemini}                     # torch_ddp, torch_ddp_fp16, low_level_zero, gemini or hybrid_parallel
TP_SIZE=${TP_SIZE:-1}                        # tensor-parallel size (hybrid_parallel only)
PP_SIZE=${PP_SIZE:-1}                        # pipeline-parallel size (hybrid_parallel only)
MICROBATCH=${MICROBATCH:-}                   # images per pipeline microbatch (PP_SIZE > 1; default BS / PP_SIZE)
GPUNUM=${GPUNUM:-1}                          # processes (GPUs) on this node
BS=${BS:-32}                                 # training batch size of each data-parallel rank
GRAD_ACCUM=${GRAD_ACCUM:-1}                  # batches a step: the global batch is BS x GRAD_ACCUM x the ranks
LR=${LR:-3e-4}                               # peak learning rate, used as given whatever GPUNUM is
EPOCH=${EPOCH:-5}
WEIGHT_DECAY=${WEIGHT_DECAY:-0.5}
WARMUP_RATIO=${WARMUP_RATIO:-0.1}            # fraction of the steps spent warming the learning rate up
SEED=${SEED:-42}
AUGMENT=${AUGMENT:-1}                        # 1: random resized crop and flip of the training images, 0: none
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}      # label smoothing of the training loss, in [0, 1)
SAVE_EVERY=${SAVE_EVERY:-0}                  # checkpoint every this many steps too (0: at epoch ends only)
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-1}      # newest checkpoints kept in OUTPUT_PATH/checkpoints (0: none)
MAX_GPU_MEMORY_GIB=${MAX_GPU_MEMORY_GIB:-}   # most GPU memory each process may take (to share a GPU; default: all)
OFFLOAD=${OFFLOAD:-none}                     # model larger than the GPU: optimizer (low_level_zero, gemini,
                                             # hybrid_parallel) or all (gemini) to host memory (docs/big-models.md)
OFFLOAD_FRACTION=${OFFLOAD_FRACTION:-1}      # gemini: the share of it on the host (lower is faster while it fits)
LORA_RANK=${LORA_RANK:-0}                    # LoRA adapters of this rank instead of full fine-tuning (0: none)
LORA_QUANTIZE=${LORA_QUANTIZE:-0}            # 1: QLoRA, the frozen weights in 4 bits (torch_ddp on a GPU)
GRAD_CHECKPOINT=${GRAD_CHECKPOINT:-0}        # 1: recompute activations in the backward pass (less memory)
RESUME=${RESUME:-}                           # 'latest' or a checkpoint folder to continue from
LAUNCHER=${LAUNCHER:-auto}                   # colossalai (colossalai run), torchrun, python (one process only), or
                                             # auto: colossalai run for several processes or nodes, else python
HOSTFILE=${HOSTFILE:-}                       # several nodes: a file naming one host per line (colossalai run, ssh)
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}        # rendezvous address (with HOSTFILE: the first host, unless set)
MASTER_PORT=${MASTER_PORT:-29500}            # rendezvous port of several processes (one process takes none)
VERBOSE=${VERBOSE:-0}                        # 1: every library warning, and the launcher's own failure report

# nvidia-smi answers in a fraction of the 3 s that importing torch to ask takes; torch still decides without it, and
# where CUDA_VISIBLE_DEVICES is set (nvidia-smi lists the GPUs it hides)
if ! { [ -z "${CUDA_VISIBLE_DEVICES+set}" ] && nvidia-smi -L >/dev/null 2>&1; } &&
  ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  [ "$PLUGIN" = torch_ddp ] || echo "No CUDA GPU found: running torch_ddp on the CPU instead of $PLUGIN."
  PLUGIN=torch_ddp TP_SIZE=1 PP_SIZE=1 MICROBATCH=
fi

demo=(vit_train_demo.py
  --model_name_or_path "$MODEL"
  ${IMAGE_SIZE:+--image_size "$IMAGE_SIZE"}
  --dataset "$DATASET"
  --data_mode "$DATA_MODE"
  ${CACHE_BUDGET_GIB:+--cache_budget_gib "$CACHE_BUDGET_GIB"}
  ${NUM_WORKERS:+--num_workers "$NUM_WORKERS"}
  --output_path "$OUTPUT_PATH"
  --plugin "$PLUGIN"
  --tp_size "$TP_SIZE"
  --pp_size "$PP_SIZE"
  ${MICROBATCH:+--microbatch_size "$MICROBATCH"}
  --batch_size "$BS"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --learning_rate "$LR"
  --num_epoch "$EPOCH"
  --weight_decay "$WEIGHT_DECAY"
  --warmup_ratio "$WARMUP_RATIO"
  --seed "$SEED"
  --label_smoothing "$LABEL_SMOOTHING"
  $([ "$AUGMENT" = 1 ] && echo --augment || echo --no-augment)
  $([ "$SKIP_UNREADABLE" = 1 ] && echo --skip_unreadable || echo --no-skip_unreadable)
  --save_every "$SAVE_EVERY"
  --keep_checkpoints "$KEEP_CHECKPOINTS"
  ${RESUME:+--resume_from "$RESUME"}
  ${MAX_GPU_MEMORY_GIB:+--max_gpu_memory_gib "$MAX_GPU_MEMORY_GIB"}
  --offload "$OFFLOAD"
  --offload_fraction "$OFFLOAD_FRACTION"
  --lora_rank "$LORA_RANK"
  $([ "$LORA_QUANTIZE" = 1 ] && echo --lora_quantize || echo --no-lora_quantize)
  $([ "$GRAD_CHECKPOINT" = 1 ] && echo --grad_checkpoint || echo --no-grad_checkpoint)
  $([ "$VERBOSE" = 1 ] && echo --verbose || echo --no-verbose)
  "$@")

# each process's share of the cores for PyTorch's CPU threads (torchrun would give each process one, and say so)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / GPUNUM > 1 ? $(nproc) / GPUNUM : 1 ))}
if [ "$LAUNCHER" = auto ]; then  # a launcher takes seconds to start (benchmarks/results), and one process needs none
  LAUNCHER=$([ "$GPUNUM" = 1 ] && [ -z "$HOSTFILE" ] && echo python || echo colossalai)
fi
case "$LAUNCHER" in
  colossalai)  # it joins its arguments into one shell command line, run on every host: each is quoted for that
    for argument in "${!demo[@]}"; do printf -v "demo[$argument]" %q "${demo[$argument]}"; done
    launch=(colossalai run --nproc_per_node "$GPUNUM" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
      ${HOSTFILE:+--hostfile "$HOSTFILE"}) ;;
  torchrun)
    launch=(torchrun --nproc_per_node "$GPUNUM" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
  python)
    launch=(python3) ;;
  *)
    echo "error: LAUNCHER=$LAUNCHER is not a launcher; choose auto, colossalai, torchrun or python" >&2
    exit 2 ;;
esac
# the colossalai package installs the colossalai command: asking PATH for it takes no Python start (0.4 s)
command=$([ "$LAUNCHER" = torchrun ] && echo torchrun || echo colossalai)
if ! command -v "$command" >/dev/null; then
  echo "error: $command is not installed: run 'pip install -r requirements.txt' first" >&2
  exit 1
fi
if [ -n "$HOSTFILE" ] && [ "$LAUNCHER" != colossalai ]; then
  echo "error: HOSTFILE needs LAUNCHER=colossalai (torchrun starts one node per call: run it on each node)" >&2
  exit 2
fi
if [ "$LAUNCHER" = python ] && [ "$GPUNUM" != 1 ]; then
  echo "error: LAUNCHER=python starts one process, not GPUNUM=$GPUNUM; use LAUNCHER=colossalai or torchrun" >&2
  exit 2
fi
# another job's rendezvous port would stop every process with a launcher's traceback: say it in one line first
if [ "$LAUNCHER" != python ] && timeout 2 bash -c "exec 3<>/dev/tcp/$MASTER_ADDR/$MASTER_PORT" 2>/dev/null; then
  echo "error: port $MASTER_PORT on $MASTER_ADDR is taken, by another job perhaps; set MASTER_PORT to a free one" >&2
  exit 1
fi
if [ "$VERBOSE" = 1 ] || [ "$LAUNCHER" = python ]; then
  "${launch[@]}" "${demo[@]}"
else
  python3 tools/tidy_launch.py "${launch[@]}" "${demo[@]}"
fi
