#!/usr/bin/env bash
# Every GPU figure of BENCHMARKS.md in one go, on a freshly installed GPU machine: the one-off build of
# Colossal-AI's fused Adam kernel, end-to-end runs of run_finetuning.sh with the published settings for each plugin
# (gemini first, as a new user's first run), then the training-step benchmark with a profile of each configuration.
#   DATASET=/path/to/beans MODEL=/path/to/model LOG_DIR=./benchmark_logs bash run_device_benchmarks.sh [PART]
# PART: end_to_end, steps, both (the default: end_to_end then steps), or autotune (the batch-128 references with
# inductor's autotuning as well: about 5 minutes). Writes LOG_DIR/end_to_end.json and .log, benchmark.json and .log,
# profiles/, and for autotune autotune.json and .log, profiles_autotune/.
set -euo pipefail
cd "$(dirname "$0")"
LOG_DIR=${LOG_DIR:-./benchmark_logs}
PLUGINS=${PLUGINS:-gemini torch_ddp torch_ddp_fp16 low_level_zero hybrid_parallel}
GPUNUM=${GPUNUM:-1}
RUN_ROOT=${RUN_ROOT:-$(mktemp -d)}  # the fine-tuned models; only their results.json are kept, in end_to_end.json
PART=${1:-both}
case "$PART" in
  end_to_end | steps | both | autotune) ;;
  *) echo "unknown PART '$PART': choose end_to_end, steps, both or autotune" >&2; exit 2 ;;
esac
mkdir -p "$LOG_DIR"

step_table() {  # NAME VARIABLE=VALUE...: run_benchmark.sh with those variables, into LOG_DIR/NAME.json and .log
  local name=$1
  shift
  env "$@" OUTPUT="$LOG_DIR/$name.json" bash run_benchmark.sh 2>&1 | tee "$LOG_DIR/$name.log" | grep -v Warning
}

seconds_of() {  # wall seconds of a command, its output appended to end_to_end.log
  local start end
  start=$(date +%s.%N)
  "$@" >>"$LOG_DIR/end_to_end.log" 2>&1
  end=$(date +%s.%N)
  python3 -c "print(round($end - $start, 1))"
}

if [ "$PART" = end_to_end ] || [ "$PART" = both ]; then
  echo "kernel build: $(seconds_of python3 -c \
    'from colossalai.kernel.kernel_loader import FusedOptimizerLoader; FusedOptimizerLoader().load()') s"
  for plugin in $PLUGINS; do
    wall=$(seconds_of env PLUGIN="$plugin" GPUNUM="$GPUNUM" OUTPUT_PATH="$RUN_ROOT/$plugin" bash run_finetuning.sh)
    echo "$plugin: $wall s"
    echo "$plugin $wall" >>"$RUN_ROOT/walls"
  done
python3 - "$RUN_ROOT" "$LOG_DIR/end_to_end.json" <<'PY'
import json
import sys

run_root, summary_path = sys.argv[1:]
summary = {}
print("| plugin | GPUs | wall s | setup s | train s | data wait s | evaluation s | validation accuracy | test accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for line in open(f"{run_root}/walls"):
    plugin, wall = line.split()
    results = json.load(open(f"{run_root}/{plugin}/results.json"))
    summary[plugin] = {"wall_seconds": float(wall), **results}
    seconds = results["seconds"]
    print(f"| {plugin} | {results['config']['world_size']} | {wall} | {seconds['setup']:.1f} | {seconds['train']:.1f} | "
          f"{seconds['data_wait']:.2f} | {seconds['evaluation']:.1f} | "
          f"{results['epochs'][-1]['validation']['accuracy']:.4f} | {results['test']['accuracy']:.4f} |")
json.dump(summary, open(summary_path, "w"), indent=2)
PY
fi
if [ "$PART" = both ] || [ "$PART" = steps ]; then
  # with GPUNUM > 1 the benchmark times the plugins alone (its plain-PyTorch references run in one process)
  step_table benchmark GPUNUM="$GPUNUM" PROFILE_DIR="$LOG_DIR/profiles"
fi
if [ "$PART" = autotune ]; then
  step_table autotune CONFIGURATIONS=torch,torch_compile,torch_compile_max_autotune BATCH_SIZES=128 \
    PROFILE_DIR="$LOG_DIR/profiles_autotune"
fi
