#!/usr/bin/env bash
# Runs run_finetuning.sh once per seed and reports the accuracy over the seeds: median, mean and spread of the
# final epoch's validation and test accuracy, and of the test accuracy at the epoch chosen on validation.
# Every run_finetuning.sh variable works here too: SEEDS=0,1,2 PLUGIN=torch_ddp bash experiments/run_seeds.sh --augment
set -euo pipefail
cd "$(dirname "$0")/.."  # the example's folder, where relative paths given here are read
SEEDS=${SEEDS:-0,1,2}
OUTPUT_ROOT=${OUTPUT_PATH:-./output_seeds}   # each seed's run goes to OUTPUT_ROOT/seed_<seed>

results=()
for seed in ${SEEDS//,/ }; do
  SEED=$seed OUTPUT_PATH="$OUTPUT_ROOT/seed_$seed" bash run_finetuning.sh "$@"
  results+=("$OUTPUT_ROOT/seed_$seed/results.json")
done

python3 - "$OUTPUT_ROOT/summary.json" "${results[@]}" <<'PY'
import json
import statistics
import sys

summary_path, runs = sys.argv[1], [json.load(open(path)) for path in sys.argv[2:]]
columns = {
    "final validation": lambda run: run["epochs"][-1]["validation"]["accuracy"],
    "final test": lambda run: run["test"]["accuracy"] if run["test"] else float("nan"),
    "best-epoch test": lambda run: run["best_epoch"]["test"]["accuracy"] if run["test"] else float("nan"),
}
print(f"{'seed':>6} " + " ".join(f"{name:>17}" for name in columns) + "  best epoch")
for run in runs:
    print(f"{run['config']['seed']:>6} " + " ".join(f"{get(run):>17.4f}" for get in columns.values())
          + f"  {run['best_epoch']['epoch']:>10}")
summary = {"seeds": [run["config"]["seed"] for run in runs]}
for name, get in columns.items():
    values = [get(run) for run in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    summary[name] = {"median": statistics.median(values), "mean": statistics.mean(values), "stdev": spread,
                     "min": min(values), "max": max(values)}
for statistic in ("median", "mean", "stdev"):
    print(f"{statistic:>6} " + " ".join(f"{summary[name][statistic]:>17.4f}" for name in columns))
with open(summary_path, "w") as file:
    json.dump(summary, file, indent=2)
PY
