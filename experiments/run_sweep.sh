#!/usr/bin/env bash
# Fills the upstream example's results table: one run_finetuning.sh run for each batch size in BS_LIST and learning
# rate in LR_LIST, with its published settings (gemini, 5 epochs, weight decay 0.5, warm-up 0.3, no augmentation
# or label smoothing), then a markdown table of the final epoch's average training loss, and the loss and accuracy
# on all validation and test images. Every run_finetuning.sh variable works here too:
#   BS_LIST="8 16 32" LR_LIST="1e-4 2e-4 5e-4" DATASET=/path/to/beans MODEL=/path/to/model bash experiments/run_sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."  # the example's folder, where relative paths given here are read
BS_LIST=${BS_LIST:-8 16 32}
LR_LIST=${LR_LIST:-1e-4 2e-4 5e-4}
OUTPUT_ROOT=${OUTPUT_PATH:-./output_sweep}  # each run goes to OUTPUT_ROOT/bs<batch>_lr<rate>, its log beside it
export PLUGIN=${PLUGIN:-gemini} EPOCH=${EPOCH:-5} WEIGHT_DECAY=${WEIGHT_DECAY:-0.5} WARMUP_RATIO=${WARMUP_RATIO:-0.3}
export AUGMENT=${AUGMENT:-0} LABEL_SMOOTHING=${LABEL_SMOOTHING:-0} KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-0}

mkdir -p "$OUTPUT_ROOT"
results=()
for batch_size in $BS_LIST; do
  for learning_rate in $LR_LIST; do
    run=$OUTPUT_ROOT/bs${batch_size}_lr$learning_rate
    if ! BS=$batch_size LR=$learning_rate OUTPUT_PATH="$run" bash run_finetuning.sh "$@" >"$run.log" 2>&1; then
      echo "error: the run with batch size $batch_size and learning rate $learning_rate failed; see $run.log" >&2
      exit 1
    fi
    echo "batch size $batch_size, learning rate $learning_rate: done"
    results+=("$run/results.json")
  done
done

python3 - "$OUTPUT_ROOT/sweep.json" "${results[@]}" <<'PY'
import json
import sys

summary_path, runs = sys.argv[1], [json.load(open(path)) for path in sys.argv[2:]]
print("| batch size | learning rate | average training loss | validation loss | validation accuracy | test loss | "
      "test accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- |")
rows = []
for run in runs:
    final = run["epochs"][-1]
    test = final.get("test") or {"loss": float("nan"), "accuracy": float("nan")}
    row = {"batch_size": run["config"]["batch_size"], "learning_rate": run["config"]["learning_rate"],
           "train_loss": final["train_loss"], "validation": final["validation"], "test": final.get("test")}
    rows.append(row)
    print(f"| {row['batch_size']} | {row['learning_rate']:g} | {row['train_loss']:.4f} | "
          f"{final['validation']['loss']:.4f} | {final['validation']['accuracy']:.4f} | {test['loss']:.4f} | "
          f"{test['accuracy']:.4f} |")
with open(summary_path, "w") as file:
    json.dump(rows, file, indent=2)
PY
