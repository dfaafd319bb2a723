#!/usr/bin/env bash
# Reproduces every GPU figure of benchmarks/results/ in one go, on a freshly installed GPU machine: the one-off build of
# Colossal-AI's Adam kernels, the start-up of each launcher, the Hugging Face recipe (hf_recipe.py, writing nothing
# and writing a checkpoint each epoch and the model, as the example does) and then
# run_finetuning.sh for each plugin with the example's defaults (gemini first, as a new user's first run), each
# timed from the shell, then the training-step benchmark with a profile of each configuration.
#   DATASET=/path/to/beans MODEL=/path/to/model LOG_DIR=./benchmark_logs bash benchmarks/reproduce_gpu_figures.sh [PART]
# PART: end_to_end, steps, both (the default: end_to_end then steps), autotune (the batch-128 references with
# inductor's autotuning as well: about 5 minutes), or streaming (about 8 minutes: a 52,000-image folder of 500x500
# JPEGs made from beans, trained on for two epochs by a random-weight ViT-B/16 at batch 128 with torch_ddp, streamed
# and cached, beside the same plugin's synthetic-batch rate and the Hugging Face recipe on the same folder, with the
# example's loader workers and image processor and at its own defaults; and the streamed run's saved model served
# through `pipeline` against the example's own input path, benchmarks/serving_agreement.py).
# modes: full fine-tuning beside IMAGE_SIZE=384, LORA_RANK=16 and GRAD_ACCUM=4 at BS=8, over 3 seeds (MODES_SEEDS):
# images/s, trained parameters and accuracy, into LOG_DIR/modes.json.
# largest (about 12 minutes): under a GPU memory cap of CAP_GIB (24), each configuration's largest ViT of g/14, e/14
# and 6.5B/14 (step_benchmark.py --largest): gemini OFFLOAD=all, DeepSpeed ZeRO-3- and ZeRO-2-Offload (if installed),
# plain PyTorch, and each plugin without offload.
# largest_vit_g (about 6 minutes): the offloading configurations at ViT-G/14 under the same cap, at batch 32.
# fastest (about 17 minutes): under the same cap, the offloading configurations at growing batches until one does not
# fit (step_benchmark.py --fastest): 6.5B/14 with gemini OFFLOAD=all and DeepSpeed ZeRO-3-Offload at 32, 128 and 192
# (128 peaked at 14.56 GiB of GPU memory, 32 at 3.93), ViT-G/14 with gemini OFFLOAD=optimizer and DeepSpeed
# ZeRO-2-Offload at 32, 128 and 256.
# lora (about 8 minutes): under the same cap, the largest ViT from G/14 to 22B/14 that LoRA of rank 16 trains over
# 16-bit and over 4-bit (QLoRA) frozen weights, at batch LORA_LARGEST_BS (16: with GRAD_ACCUM=2 a global batch of 32).
# lora_speed (about 9 minutes): LoRA beside full fine-tuning with the best offload under the cap, at batch 32: ViT-G/14
# against gemini OFFLOAD=optimizer, 6.5B/14 against OFFLOAD=all (the step benchmark); then lora_runs.
# lora_runs: LoRA through run_finetuning.sh under the cap at each of LORA_RUN_SIZES (G/14 6.5B/14), two epochs of
# DATASET (the second's rate is the steady one), each model of random weights with MODEL's image processor.
# accuracy (about 10 minutes): the recipes of the report's accuracy table, each over ACCURACY_SEEDS (0,1,2) through
# experiments/run_seeds.sh with torch_ddp, and the upstream example's grid (experiments/run_sweep.sh, gemini),
# ACCURACY_JOBS (3) of them at once on the GPU (accuracy only: no timing is taken); into LOG_DIR/accuracy.json.
# scaling (GPUNUM GPUs, 2 or more): the step benchmark data-parallel over 1, 2, 4, ... up to GPUNUM GPUs: torch_ddp,
# low_level_zero and gemini at ViT-B/16 and ViT-L/16, batch 128 a GPU; images/s and efficiency (the rate on N GPUs
# over N times the rate on 1), and a profile of each on GPUNUM GPUs; into LOG_DIR/scaling.json.
# model_parallel (GPUNUM GPUs, 2 or more): a ViT that plain data parallelism cannot hold on one GPU (MP_SIZE, 12B/14:
# 16 bytes a parameter is 192 GB) split by hybrid_parallel over the tensor- and pipeline-parallel layouts of 2 and 4
# GPUs that divide GPUNUM, beside gemini without and with its optimizer offloaded, data-parallel over the same GPUs,
# at batch 32 a data-parallel group, recomputing activations, each configuration launched alone (one that fails is
# named and the rest go on); into LOG_DIR/model_parallel.json.
# checkpoints: the seconds each checkpoint stalls training and where they go (benchmarks/checkpoint_benchmark.py,
# 25 functions of its profile): ViT-B/16 with torch_ddp and gemini, and ViT-G/14 with gemini OFFLOAD=all under the
# cap, each written into a folder of its own under CHECKPOINT_DIR (default: under RUN_ROOT).
# Writes LOG_DIR/end_to_end.json and .log, steps.json and .log, steps_profiles/; for autotune autotune.json and .log,
# profiles_autotune/; for streaming streaming.json and .log, synthetic.json and .log, serving_agreement.json; for
# largest largest.json and its .log and _logs/; for largest_vit_g vit_g.json and its; for fastest fastest_6.5b.json,
# fastest_vit_g.json and theirs; for lora lora_largest.json and its; for lora_speed lora_vit_g.json, lora_6.5b.json
# and theirs; for lora_runs lora_run_finetuning.json; for checkpoints
# checkpoint_<configuration>_<size>.json and .log; for accuracy accuracy.json and accuracy_<recipe>.log.
set -euo pipefail
cd "$(dirname "$0")/.."  # the example's folder, where relative paths given here are read
LOG_DIR=${LOG_DIR:-./benchmark_logs}
PLUGINS=${PLUGINS:-gemini torch_ddp torch_ddp_fp16 low_level_zero hybrid_parallel}
LAUNCHERS=${LAUNCHERS:-python3 torchrun colossalai}  # end_to_end: the launchers timed starting an empty script
GPUNUM=${GPUNUM:-1}
REPEATS=${REPEATS:-3}  # end_to_end: runs of the recipe and of each plugin, in turns; the tables give the median
RUN_ROOT=${RUN_ROOT:-$(mktemp -d)}  # the fine-tuned models; only their results.json are kept, in end_to_end.json
PART=${1:-both}
case "$PART" in
  end_to_end | steps | both | autotune | streaming | modes | largest | largest_vit_g | fastest | lora | lora_speed | \
    lora_runs | accuracy | scaling | model_parallel | checkpoints) ;;
  *) echo "unknown PART '$PART': choose end_to_end, steps, both, autotune, streaming, modes, largest," \
    "largest_vit_g, fastest, lora, lora_speed, lora_runs, accuracy, scaling, model_parallel or checkpoints" >&2
    exit 2 ;;
esac
# the install step (README): Colossal-AI's CPU and GPU Adam kernels, built once, in one process
BUILD_KERNELS="from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader
CPUAdamLoader().load(); FusedOptimizerLoader().load()"
# largest, lora and fastest: each size (and batch) in a process of its own under a GPU memory cap, recomputing
# activations
under_cap=(MAX_GPU_MEMORY_GIB="${CAP_GIB:-24}" GRAD_CHECKPOINT=1 STEPS=2 WARMUP_STEPS=1)
capped=(LARGEST=1 "${under_cap[@]}")
mkdir -p "$LOG_DIR"

step_table() {  # NAME VARIABLE=VALUE...: run_step_benchmark.sh with those variables, into LOG_DIR/NAME.json and .log
  local name=$1
  shift
  env "$@" OUTPUT="$LOG_DIR/$name.json" bash benchmarks/run_step_benchmark.sh 2>&1 | tee "$LOG_DIR/$name.log" | grep -v Warning
}

# Wall seconds of a command, its output appended to end_to_end.log. A command that fails is named in one line and
# its exit code returned, which stops this script (set -e) at the assignment `wall=$(seconds_of ...)`: a failed
# run is never recorded as a time.
seconds_of() {
  local start end code=0
  start=$(date +%s.%N)
  "$@" >>"$LOG_DIR/end_to_end.log" 2>&1 || code=$?
  end=$(date +%s.%N)
  if [ "$code" != 0 ]; then
    echo "error: a timed run failed (exit $code): $*; its output is at the end of $LOG_DIR/end_to_end.log" >&2
    return "$code"
  fi
  awk -v start="$start" -v end="$end" 'BEGIN { printf "%.1f\n", end - start }'
}

if [ "$PART" = end_to_end ] || [ "$PART" = both ]; then
  wall=$(seconds_of python3 -c "$BUILD_KERNELS")
  echo "kernel build: $wall s"
  echo "import sys" >"$RUN_ROOT/empty.py"
  for launcher in $LAUNCHERS; do
    launcher=${launcher/torchrun/torchrun --nproc_per_node 1}
    launcher=${launcher/colossalai/colossalai run --nproc_per_node 1}
    wall=$(seconds_of $launcher "$RUN_ROOT/empty.py")
    echo "${launcher% --*} starting an empty script: $wall s"
    echo "launcher:${launcher%% *} $wall" >>"$RUN_ROOT/walls"
  done
  # the reference: Hugging Face's recipe with the same model, data and settings (bs 32, 5 epochs, lr 3e-4, ...),
  # writing nothing (recipe) and writing a checkpoint each epoch and the model, as the example does (recipe_saving)
  # On several GPUs (GPUNUM) it is launched as its guide says, by torchrun, data-parallel at the same batch per GPU.
  recipe() {  # NAME [--save]
    local launch=(python3)
    if [ "$GPUNUM" -gt 1 ]; then launch=(torchrun --standalone --nproc_per_node "$GPUNUM"); fi
    "${launch[@]}" benchmarks/hf_recipe.py --model_name_or_path "$MODEL" --dataset "$DATASET" --eval_every_epoch \
      "${@:2}" --output_path "$RUN_ROOT/hf_$1_$repeat" >"$RUN_ROOT/$1_$repeat.json"
  }
  # in turns, the recipes then each plugin, REPEATS times: a drift of the machine's speed touches them all alike
  for repeat in $(seq "$REPEATS"); do
    for variant in "recipe" "recipe_saving --save"; do
      wall=$(seconds_of recipe $variant)
      echo "Hugging Face ${variant% *}: $wall s"
      echo "${variant% *} $repeat $wall" >>"$RUN_ROOT/walls"
    done
    for plugin in $PLUGINS; do
      wall=$(seconds_of env PLUGIN="$plugin" GPUNUM="$GPUNUM" OUTPUT_PATH="$RUN_ROOT/${plugin}_$repeat" \
        bash run_finetuning.sh)
      echo "$plugin: $wall s"
      echo "$plugin $repeat $wall" >>"$RUN_ROOT/walls"
    done
  done
python3 - "$RUN_ROOT" "$LOG_DIR/end_to_end.json" <<'PY'
import json
import sys

run_root, summary_path = sys.argv[1:]
launchers, walls = {}, {}  # walls: run -> {repeat: wall seconds}
for line in open(f"{run_root}/walls"):
    name, *repeat, wall = line.split()
    if name.startswith("launcher:"):
        launchers[name.removeprefix("launcher:")] = float(wall)
    else:
        walls.setdefault(name, {})[repeat[0]] = float(wall)


def median_run(repeats):
    """The repeat whose wall time is the median (the lower middle one of an even count), and that time."""
    ordered = sorted(repeats.items(), key=lambda item: item[1])
    return ordered[(len(ordered) - 1) // 2]


def spread(repeats):
    return f"{min(repeats.values()):.1f}-{max(repeats.values()):.1f}" if len(repeats) > 1 else ""


summary = {"launchers": launchers, "plugins": {}}
for name in ("recipe", "recipe_saving"):
    repeats = walls.pop(name)
    repeat, wall = median_run(repeats)
    summary[name] = {"wall_seconds": wall, "all_wall_seconds": repeats,
                     **json.loads(open(f"{run_root}/{name}_{repeat}.json").read().splitlines()[-1])}
recipe_wall, saving_wall = summary["recipe"]["wall_seconds"], summary["recipe_saving"]["wall_seconds"]
print("| launcher | seconds to start an empty script |")
print("| --- | --- |")
for launcher, wall in launchers.items():
    print(f"| {launcher} | {wall:.2f} |")
print()
print(f"Median of {len(summary['recipe']['all_wall_seconds'])} runs each; the other figures are the median run's.")
print()
print("| run | processes | wall s | wall s, all runs | vs recipe | vs recipe, saving | "
      "setup s: imports, distributed, dataset, model, booster, images, resume | train s | data wait s | "
      "evaluation s | checkpoints s | rest s (launch, plots, exit) | validation accuracy | test accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name, title, included in (("recipe", "Hugging Face recipe, writing nothing", "evaluation"),
                              ("recipe_saving", "Hugging Face recipe, saving as the example does",
                               "evaluation and checkpoints")):
    recipe = summary[name]
    print(f"| {title} | 1 | {recipe['wall_seconds']:.1f} | {spread(recipe['all_wall_seconds'])} | "
          f"{recipe['wall_seconds'] / recipe_wall:.2f}x | {recipe['wall_seconds'] / saving_wall:.2f}x | "
          f"{recipe['setup_seconds']:.1f} | {recipe['train_seconds']:.1f} ({included} included) | "
          f"| | | | {recipe['validation_accuracy']:.4f} | {recipe['test_accuracy']:.4f} |")
for plugin, repeats in walls.items():
    repeat, wall = median_run(repeats)
    results = json.load(open(f"{run_root}/{plugin}_{repeat}/results.json"))
    summary["plugins"][plugin] = {"wall_seconds": wall, "all_wall_seconds": repeats, **results}
    seconds = results["seconds"]
    parts = ", ".join(f"{part:.1f}" for part in seconds["setup_parts"].values())
    print(f"| {plugin} | {results['config']['world_size']} | {wall:.1f} | {spread(repeats)} | "
          f"{wall / recipe_wall:.2f}x | {wall / saving_wall:.2f}x | "
          f"{seconds['setup']:.1f}: {parts} | {seconds['train']:.1f} | {seconds['data_wait']:.2f} | "
          f"{seconds['evaluation']:.1f} | {seconds['checkpoints']:.1f} | {wall - seconds['total']:.1f} | "
          f"{results['epochs'][-1]['validation']['accuracy']:.4f} | "
          f"{results['test']['accuracy']:.4f} |")
json.dump(summary, open(summary_path, "w"), indent=2)
PY
fi
if [ "$PART" = both ] || [ "$PART" = steps ]; then
  # with GPUNUM > 1 the benchmark times the plugins alone (its plain-PyTorch references run in one process)
  step_table steps GPUNUM="$GPUNUM" PROFILE_DIR="$LOG_DIR/steps_profiles"
fi
if [ "$PART" = autotune ]; then
  step_table autotune CONFIGURATIONS=torch,torch_compile,torch_compile_max_autotune BATCH_SIZES=128 \
    PROFILE_DIR="$LOG_DIR/profiles_autotune"
fi
if [ "$PART" = streaming ]; then
  LARGE_DATASET=${LARGE_DATASET:-$RUN_ROOT/large_beans}
  STREAM_TRAIN_IMAGES=${STREAM_TRAIN_IMAGES:-50000}
  STREAM_EVAL_IMAGES=${STREAM_EVAL_IMAGES:-1000}  # in validation and in test each
  STREAM_BS=${STREAM_BS:-128}
  STREAM_WORKERS=${STREAM_WORKERS:-default}  # loader worker counts of the streamed runs (default: the example's)
  STREAM_EPOCHS=${STREAM_EPOCHS:-2}  # the last epoch's rate is the steady one, as the synthetic rate is
  vit_b=$RUN_ROOT/vit-base-patch16-224-random  # ViT-B/16 with random weights, MODEL's image processor
  python3 -c "import sys; from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification as V
V(ViTConfig(num_labels=3)).save_pretrained(sys.argv[1]); AutoImageProcessor.from_pretrained(sys.argv[2]).save_pretrained(sys.argv[1])" \
    "$vit_b" "$MODEL"
  wall=$(seconds_of python3 benchmarks/synthesize_dataset.py --source "$DATASET" --output "$LARGE_DATASET" \
    --train "$STREAM_TRAIN_IMAGES" --eval "$STREAM_EVAL_IMAGES")
  echo "generating: $wall s"
  same=(PLUGIN=torch_ddp GPUNUM=1 BS="$STREAM_BS" EPOCH="$STREAM_EPOCHS" MODEL="$vit_b" KEEP_CHECKPOINTS=0)
  runs=("cache large_beans default" "stream beans default")
  for workers in $STREAM_WORKERS; do runs=("stream large_beans $workers" "${runs[@]}"); done
  for run in "${runs[@]}"; do
    read -r mode data workers <<<"$run"
    dataset=$([ "$data" = beans ] && echo "$DATASET" || echo "$LARGE_DATASET")
    name=${mode}_${data}_$workers
    wall=$(seconds_of env "${same[@]}" DATA_MODE="$mode" DATASET="$dataset" OUTPUT_PATH="$RUN_ROOT/$name" \
      NUM_WORKERS="$([ "$workers" = default ] || echo "$workers")" bash run_finetuning.sh)
    echo "example, $mode, $data, $workers workers: $wall s"
    echo "$name $mode $data $wall" >>"$RUN_ROOT/streaming_walls"
  done
  # is the saved model served as training measured it? (the 500x500 validation images, through predict.py's path)
  python3 -m benchmarks.serving_agreement --model "$RUN_ROOT/stream_large_beans_default" --dataset "$LARGE_DATASET" \
    | tee "$LOG_DIR/serving_agreement.json"
  # the recipe with the example's loader workers and image processor, then at its own defaults
  workers=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['data']['num_workers'])" \
    "$RUN_ROOT/stream_large_beans_default/results.json")
  for recipe in "same --num_workers $workers --fast_image_processor" "defaults"; do
    read -r name options <<<"$recipe"
    wall=$(seconds_of sh -c "python3 benchmarks/hf_recipe.py --model_name_or_path $vit_b --dataset $LARGE_DATASET \
      --batch_size $STREAM_BS --num_epoch 1 $options --output_path $RUN_ROOT/hf_$name >$RUN_ROOT/hf_recipe_$name.json")
    echo "Hugging Face recipe, large_beans, $name: $wall s"
    echo "$name $wall ${options:-}" >>"$RUN_ROOT/recipe_walls"
  done
  step_table synthetic CONFIGURATIONS=torch_ddp BATCH_SIZES="$STREAM_BS"
python3 - "$RUN_ROOT" "$LOG_DIR" <<'PY'
import json
import sys

run_root, log_dir = sys.argv[1:]
synthetic = json.load(open(f"{log_dir}/synthetic.json"))
synthetic_rate = next(row["images_per_second"] for row in synthetic["rows"] if row["configuration"] == "torch_ddp")
rows = {}
for line in open(f"{run_root}/streaming_walls"):
    name, mode, data, wall = line.split()
    results = json.load(open(f"{run_root}/{name}/results.json"))
    seconds = results["seconds"]
    how = f"streamed, {results['data']['num_workers']} workers" if mode == "stream" else "cached"
    rows[f"example, {data}, {how}"] = {
        "wall_seconds": float(wall), "train_images": results["data"]["num_examples"]["train"],
        "epochs": len(results["epochs"]), "images_per_second": results["train_images_per_second"],
        "last_epoch_images_per_second": results["epochs"][-1]["images_per_second"],
        "data_wait_share": seconds["data_wait"] / seconds["train"],
        "setup_seconds": seconds["setup"], **results["memory"],
        "validation_accuracy": results["epochs"][-1]["validation"]["accuracy"]}
for line in open(f"{run_root}/recipe_walls"):
    name, wall, *options = line.split()
    recipe = json.loads(open(f"{run_root}/hf_recipe_{name}.json").read().splitlines()[-1])
    how = (f"{options[1]} workers, fast image processor, as the example" if options
           else "its defaults: 8 workers, PIL image processor")
    rows[f"Hugging Face recipe, large_beans, {how}"] = {
        "wall_seconds": float(wall), "train_images": recipe["train_images"], "epochs": 1,
        "images_per_second": recipe["train_images_per_second"], "last_epoch_images_per_second": None,
        "data_wait_share": None, "setup_seconds": recipe["setup_seconds"], "peak_host_gib": recipe["peak_host_gib"],
        "peak_gpu_gib": recipe["peak_gpu_gib"], "validation_accuracy": recipe["validation_accuracy"]}
print(f"torch_ddp synthetic batches (step_benchmark.py): {synthetic_rate:.0f} images/s")
print("| run | train images | epochs | images/s, whole run | images/s, last epoch | last epoch vs synthetic | "
      "data wait share | setup s | wall s | peak host GiB | peak GPU GiB | validation accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name, row in rows.items():
    wait = "" if row["data_wait_share"] is None else f"{row['data_wait_share']:.1%}"
    last = row["last_epoch_images_per_second"]
    steady = " | " if last is None else f"{last:.0f} | {last / synthetic_rate:.2f}x"  # two cells
    print(f"| {name} | {row['train_images']} | {row['epochs']} | {row['images_per_second']:.0f} | "
          f"{steady} | {wait} | {row['setup_seconds']:.1f} | {row['wall_seconds']:.1f} | "
          f"{row['peak_host_gib']:.2f} | {row['peak_gpu_gib'] or 0:.2f} | {row['validation_accuracy']:.4f} |")
json.dump({"synthetic_images_per_second": synthetic_rate, "runs": rows}, open(f"{log_dir}/streaming.json", "w"),
          indent=2)
PY
fi
if [ "$PART" = modes ]; then
  # the fine-tuning modes beside full fine-tuning at the checkpoint's resolution, each through run_finetuning.sh
  # with MODEL on DATASET (torch_ddp, 5 epochs, MODES_SEEDS seeds): another resolution, LoRA, gradient accumulation
  for seed in ${MODES_SEEDS:-42 43 44}; do
    for mode in "full" "image_size_384 IMAGE_SIZE=384" "lora_16 LORA_RANK=16 LR=1e-3" \
      "accumulated_4x8 BS=8 GRAD_ACCUM=4"; do
      read -r name settings <<<"$mode"
      wall=$(seconds_of env PLUGIN=torch_ddp GPUNUM=1 KEEP_CHECKPOINTS=0 SEED="$seed" $settings \
        OUTPUT_PATH="$RUN_ROOT/mode_${name}_$seed" bash run_finetuning.sh)
      echo "$name, seed $seed: $wall s"
      echo "$name $seed $wall ${settings:--}" >>"$RUN_ROOT/mode_walls"
    done
  done
python3 - "$RUN_ROOT" "$LOG_DIR/modes.json" <<'PY'
import json
import statistics
import sys

run_root, summary_path = sys.argv[1:]
modes = {}
for line in open(f"{run_root}/mode_walls"):
    name, seed, wall, settings = line.split(maxsplit=3)
    results = json.load(open(f"{run_root}/mode_{name}_{seed}/results.json"))
    modes.setdefault(name, {"settings": settings.strip(), "runs": []})["runs"].append({
        "seed": int(seed), "wall_seconds": float(wall), "images_per_second": results["train_images_per_second"],
        "validation_accuracy": results["epochs"][-1]["validation"]["accuracy"],
        "test_accuracy": results["test"]["accuracy"], "trained_parameters": results["config"]["num_trained_parameters"],
        "peak_gpu_gib": results["memory"]["peak_gpu_gib"] or 0.0})
print("| mode | settings | seeds | trained parameters | images/s | peak GPU GiB | validation accuracy | "
      "test accuracy |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name, mode in modes.items():
    runs = mode["runs"]
    mean = {key: statistics.mean(run[key] for run in runs)
            for key in ("images_per_second", "peak_gpu_gib", "validation_accuracy", "test_accuracy")}
    print(f"| {name} | {mode['settings']} | {len(runs)} | {runs[0]['trained_parameters']} | "
          f"{mean['images_per_second']:.0f} | {mean['peak_gpu_gib']:.2f} | {mean['validation_accuracy']:.4f} | "
          f"{mean['test_accuracy']:.4f} |")
json.dump(modes, open(summary_path, "w"), indent=2)
PY
fi
if [ "$PART" = largest ] || [ "$PART" = largest_vit_g ] || [ "$PART" = fastest ]; then
  python3 -c "$BUILD_KERNELS" >/dev/null
  if python3 -c "import deepspeed" 2>/dev/null; then  # its CPU Adam builds at first use: once, before the timing
    python3 -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null
  fi
fi
if [ "$PART" = fastest ]; then
  step_table fastest_6.5b FASTEST=1 "${under_cap[@]}" BATCH_SIZES=32,128,192 MODEL_SIZES=6.5B/14 \
    CONFIGURATIONS=gemini:all,deepspeed_zero3_offload
  step_table fastest_vit_g FASTEST=1 "${under_cap[@]}" STEPS=3 BATCH_SIZES=32,128,256 MODEL_SIZES=G/14 \
    CONFIGURATIONS=gemini:optimizer,deepspeed_zero2_offload
fi
if [ "$PART" = largest ]; then
  configurations=gemini:all,deepspeed_zero3_offload,deepspeed_zero2_offload,torch
  configurations+=,torch_ddp,low_level_zero,gemini,hybrid_parallel  # without offload
  step_table largest "${capped[@]}" BATCH_SIZES=32 MODEL_SIZES=g/14,e/14,6.5B/14 CONFIGURATIONS=$configurations
fi
if [ "$PART" = largest_vit_g ]; then
  configurations=deepspeed_zero2_offload,gemini:optimizer,gemini:optimizer:0.5,gemini:optimizer@bf16,gemini:all
  configurations+=,low_level_zero:optimizer,hybrid_parallel:optimizer
  step_table vit_g "${capped[@]}" BATCH_SIZES=32 MODEL_SIZES=G/14 CONFIGURATIONS=$configurations
fi
if [ "$PART" = lora ]; then
  step_table lora_largest "${capped[@]}" BATCH_SIZES="${LORA_LARGEST_BS:-16}" \
    MODEL_SIZES=G/14,6.5B/14,8B/14,12B/14,22B/14 CONFIGURATIONS=torch_ddp+lora,torch_ddp+qlora
fi
if [ "$PART" = lora_speed ]; then
  python3 -c "$BUILD_KERNELS" >/dev/null  # gemini's CPU Adam, for the full fine-tuning beside LoRA
  step_table lora_vit_g "${capped[@]}" BATCH_SIZES=32 MODEL_SIZES=G/14 CONFIGURATIONS=torch_ddp+lora,gemini:optimizer
  step_table lora_6.5b "${capped[@]}" BATCH_SIZES=32 MODEL_SIZES=6.5B/14 CONFIGURATIONS=torch_ddp+lora,gemini:all
fi
if [ "$PART" = lora_speed ] || [ "$PART" = lora_runs ]; then
  for size in ${LORA_RUN_SIZES:-G/14 6.5B/14}; do
    vit=$RUN_ROOT/vit_$(echo "$size" | tr '/.' '__')
    python3 -c "import sys
from transformers import AutoImageProcessor
from benchmarks.step_benchmark import new_model
new_model(sys.argv[1], False, 'cpu')[0].bfloat16().save_pretrained(sys.argv[2])  # half the disk; read back in fp32
AutoImageProcessor.from_pretrained(sys.argv[3]).save_pretrained(sys.argv[2])" "$size" "$vit" "$MODEL"
    wall=$(seconds_of env PLUGIN=torch_ddp GPUNUM=1 LORA_RANK=16 LR=1e-3 GRAD_CHECKPOINT=1 EPOCH=2 KEEP_CHECKPOINTS=0 \
      MAX_GPU_MEMORY_GIB="${CAP_GIB-24}" MODEL="$vit" OUTPUT_PATH="${vit}_lora" bash run_finetuning.sh)
    echo "run_finetuning.sh LORA_RANK=16, ViT-$size: $wall s"
    echo "$size ${vit}_lora $wall" >>"$RUN_ROOT/lora_walls"
    rm -r "$vit" "${vit}_lora"/model*.safetensors  # the next size's weights need the disk
  done
python3 - "$RUN_ROOT/lora_walls" "$LOG_DIR/lora_run_finetuning.json" <<'PY'
import json
import sys

walls_path, summary_path = sys.argv[1:]
runs = {}
print("| ViT | wall s | setup s | images/s, whole run | images/s, last epoch | peak GPU GiB | peak host GiB | "
      "trained parameters |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for line in open(walls_path):
    size, output_path, wall = line.split()
    results = json.load(open(f"{output_path}/results.json"))
    runs[size] = {"wall_seconds": float(wall), "setup_seconds": results["seconds"]["setup"],
                  "images_per_second": results["train_images_per_second"],
                  "last_epoch_images_per_second": results["epochs"][-1]["images_per_second"], **results["memory"],
                  "trained_parameters": results["config"]["num_trained_parameters"],
                  "parameters": results["config"]["num_parameters"]}
    run = runs[size]
    print(f"| {size} | {run['wall_seconds']:.1f} | {run['setup_seconds']:.1f} | {run['images_per_second']:.1f} | "
          f"{run['last_epoch_images_per_second']:.1f} | "
          f"{run['peak_gpu_gib'] or 0:.2f} | {run['peak_host_gib']:.2f} | {run['trained_parameters']} |")
json.dump(runs, open(summary_path, "w"), indent=2)
PY
fi
if [ "$PART" = accuracy ]; then
  recipes=("published_schedule LR=1e-4 WARMUP_RATIO=0.3" "lr_2e-4 LR=2e-4 WARMUP_RATIO=0.3"
    "lr_3e-4 LR=3e-4 WARMUP_RATIO=0.3" "default" "no_label_smoothing LABEL_SMOOTHING=0"
    "weight_decay_0.05 WEIGHT_DECAY=0.05" "lr_4e-4 LR=4e-4 WARMUP_RATIO=0.2" "lr_5e-4 LR=5e-4 WARMUP_RATIO=0.3"
    "lr_5e-4_no_augmentation LR=5e-4 WARMUP_RATIO=0.3 AUGMENT=0")
  # each job one line: its name, then its variables; upstream_grid runs the upstream example's grid
  printf '%s\n' "${recipes[@]}" "upstream_grid" | xargs -P "${ACCURACY_JOBS:-3}" -I{} bash -c '
    read -r name settings <<<"$1"
    command=(env PLUGIN=torch_ddp KEEP_CHECKPOINTS=0 SEEDS="$4" $settings bash experiments/run_seeds.sh)
    [ "$name" = upstream_grid ] && command=(bash experiments/run_sweep.sh)  # gemini, the published settings
    if ! OUTPUT_PATH="$2/accuracy_$name" "${command[@]}" >"$3/accuracy_$name.log" 2>&1; then
      echo "error: the accuracy runs of $name failed; see $3/accuracy_$name.log" >&2
      exit 255  # stops xargs, and this script with it
    fi
    echo "accuracy, $name: done"' _ {} "$RUN_ROOT" "$LOG_DIR" "${ACCURACY_SEEDS:-0,1,2}"
python3 - "$RUN_ROOT" "$LOG_DIR/accuracy.json" "${recipes[@]}" <<'PY'
import json
import sys

run_root, summary_path, *recipes = sys.argv[1:]
summary = {"recipes": {}, "upstream_grid": json.load(open(f"{run_root}/accuracy_upstream_grid/sweep.json"))}
print("| recipe | settings | validation, median (mean) | test, median (mean) |")
print("| --- | --- | --- | --- |")
for recipe in recipes:
    name, *settings = recipe.split()
    seeds = json.load(open(f"{run_root}/accuracy_{name}/summary.json"))
    summary["recipes"][name] = {"settings": " ".join(settings), **seeds}
    validation, test = seeds["final validation"], seeds["final test"]
    print(f"| {name} | {' '.join(settings) or '-'} | {validation['median']:.4f} ({validation['mean']:.4f}) | "
          f"{test['median']:.4f} ({test['mean']:.4f}) |")
json.dump(summary, open(summary_path, "w"), indent=2)
PY
  echo
  grep '^|' "$LOG_DIR/accuracy_upstream_grid.log"  # the grid's table, as run_sweep.sh printed it
fi
if [ "$PART" = scaling ]; then
  python3 -c "$BUILD_KERNELS" >/dev/null
  gpu_counts=()
  for ((gpus = 1; gpus <= GPUNUM; gpus *= 2)); do gpu_counts+=("$gpus"); done
  for gpus in "${gpu_counts[@]}"; do
    profile=()
    if [ "$gpus" = "${gpu_counts[-1]}" ]; then profile=(PROFILE_DIR="$LOG_DIR/scaling_profiles"); fi
    step_table "scaling_$gpus" GPUNUM="$gpus" CONFIGURATIONS=torch_ddp,low_level_zero,gemini MODEL_SIZES=B/16,L/16 \
      BATCH_SIZES=128 "${profile[@]}"
  done
python3 - "$LOG_DIR" "${gpu_counts[@]}" <<'PY'
import json
import sys

log_dir, *gpu_counts = sys.argv[1:]
tables = {gpus: json.load(open(f"{log_dir}/scaling_{gpus}.json")) for gpus in gpu_counts}
one_gpu = {(row["configuration"], row["model"]): row["images_per_second"] for row in tables["1"]["rows"]}
print("| configuration | ViT | GPUs | images/s | efficiency |")
print("| --- | --- | --- | --- | --- |")
rows = []
for key, alone in one_gpu.items():
    for gpus in gpu_counts:
        rate = next(row["images_per_second"] for row in tables[gpus]["rows"]
                    if (row["configuration"], row["model"]) == key)
        efficiency = rate / (int(gpus) * alone) if rate and alone else None
        rows.append({"configuration": key[0], "model": key[1], "gpus": int(gpus), "images_per_second": rate,
                     "efficiency": efficiency})
        print(f"| {key[0]} | {key[1]} | {gpus} | " + (f"{rate:.0f}" if rate else "-") + " | " +
              (f"{efficiency:.2f} |" if efficiency else "- |"))
json.dump({"rows": rows, "tables": tables}, open(f"{log_dir}/scaling.json", "w"), indent=2)
PY
fi
if [ "$PART" = model_parallel ]; then
  configurations=(gemini gemini:optimizer)
  for layout_and_gpus in tp2:2 tp4:4 pp2:2 pp4:4 tp2/pp2:4; do  # the layouts whose GPUs divide GPUNUM
    if [ $((GPUNUM % ${layout_and_gpus#*:})) = 0 ]; then configurations+=("hybrid_parallel/${layout_and_gpus%:*}"); fi
  done
  python3 -c "$BUILD_KERNELS" >/dev/null
  # each configuration in a launch of its own: one that runs out of host memory ends only itself
  tables=()  # configuration=its table's name, for the summary
  for configuration in "${configurations[@]}"; do
    name=model_parallel_${configuration//[:\/]/_}
    tables+=("$configuration=$name")
    step_table "$name" GPUNUM="$GPUNUM" GRAD_CHECKPOINT=1 STEPS=5 WARMUP_STEPS=2 BATCH_SIZES=32 \
      MODEL_SIZES="${MP_SIZE:-12B/14}" CONFIGURATIONS="$configuration" ||
      echo "$configuration: failed; its output is in $LOG_DIR/$name.log"
  done
python3 - "$LOG_DIR" "${tables[@]}" <<'PY'
import json
import os
import sys

log_dir, *tables = sys.argv[1:]
rows = []
for configuration, name in (table.split("=") for table in tables):
    path = os.path.join(log_dir, f"{name}.json")
    rows += json.load(open(path))["rows"] if os.path.exists(path) else [
        {"configuration": configuration, "result": f"failed (see {name}.log)"}]
print("| configuration | GPUs | batch per data-parallel group | result | images/s | MFU | peak GPU GiB | peak host GiB |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for row in rows:
    figures = [format(row[key], spec) if row.get(key) is not None else "-"
               for key, spec in (("images_per_second", ".1f"), ("mfu", ".1%"), ("peak_gib", ".2f"),
                                 ("peak_host_gib", ".2f"))]
    print(f"| {row['configuration']} | {row.get('gpus', '-')} | {row.get('batch_size_per_gpu', '-')} | "
          f"{row['result']} | " + " | ".join(figures) + " |")
json.dump({"rows": rows}, open(os.path.join(log_dir, "model_parallel.json"), "w"), indent=2)
PY
fi
if [ "$PART" = checkpoints ]; then
  python3 -c "$BUILD_KERNELS" >/dev/null
  for run in "torch_ddp B/16" "gemini B/16" "gemini:all G/14"; do
    read -r configuration size <<<"$run"
    name=checkpoint_$(echo "${configuration}_$size" | tr ':/' '__')
    python3 -m benchmarks.checkpoint_benchmark --configuration "$configuration" --model_size "$size" --profile 25 \
      --max_gpu_memory_gib "${CAP_GIB:-24}" --output_path "${CHECKPOINT_DIR:-$RUN_ROOT/checkpoints}/$name" \
      --json "$LOG_DIR/$name.json" 2>&1 | tee "$LOG_DIR/$name.log" | grep -v Warning
  done
fi
