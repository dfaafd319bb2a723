"""benchmarks/run_step_benchmark.sh end to end on the CPU (a tiny ViT): the table and JSON it promises, the reference
in the same run."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTForImageClassification

from benchmarks.step_benchmark import peak_flops, training_flops_per_image, vit_config
from conftest import MODEL_DIR, ROOT, example_env


def test_benchmark_times_the_reference_and_the_plugin_in_one_run(tmp_path):
    output = tmp_path / "benchmark.json"
    env = example_env(BATCH_SIZES="4,8", STEPS=2, WARMUP_STEPS=1, OUTPUT=output, PROFILE_DIR=tmp_path / "profiles")
    run = subprocess.run(["bash", "benchmarks/run_step_benchmark.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads(output.read_text())
    rows = [(row["configuration"], row["batch_size_per_gpu"]) for row in table["rows"]]
    assert rows == [(name, batch_size) for batch_size in (4, 8) for name in ("torch", "torch_ddp", "torch_ddp+lora")]
    printed = [line for line in run.stdout.splitlines() if line.startswith("| torch")]
    assert len(printed) == 6  # the table a reader sees holds what the JSON holds, row for row
    for line, row in zip(printed, table["rows"]):
        assert row["images_per_second"] > 0 and row["step_ms"] > 0
        assert line.startswith(f"| {row['configuration']} | tiny | 0.1M | 1 | {row['batch_size_per_gpu']} | trains | "
                               f"{row['images_per_second']:.1f} | {row['step_ms']:.1f} |")
        assert line.endswith(f" | {row['vs_eager_reference']:.2f} |")
    assert [row["vs_eager_reference"] for row in table["rows"][::3]] == [1, 1]  # the references, against themselves
    for row in table["rows"]:  # model FLOPs of full fine-tuning only; utilisation needs a GPU's known peak
        full = row["configuration"] != "torch_ddp+lora"
        assert (row["model_tflops_per_second"] is not None) == full and row["mfu"] is None
        if full:
            assert row["model_tflops_per_second"] == pytest.approx(
                row["images_per_second"] * training_flops_per_image("tiny") / 1e12)
    for configuration, batch_size in rows:  # the profiled steps ran the model and the optimizer
        profile = (tmp_path / "profiles" / f"{configuration.replace('+', '_')}_tiny_b{batch_size}.txt").read_text()
        assert profile.startswith("per step, under the profiler:")
        assert "aten::mm" in profile and "Optimizer.step#AdamW.step" in profile


@pytest.mark.parametrize("size", ["tiny", "B/16"])
def test_training_flops_are_three_forward_passes_as_pytorch_counts_them(size):
    """The model FLOPs behind the benchmark's utilisation: 3 forward passes, each as PyTorch's FLOP counter counts a
    ViT of that size (eager attention, whose products it sees), less the 3-label head."""
    config = vit_config(size)
    config._attn_implementation = "eager"
    model = ViTForImageClassification(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixel_values=torch.randn(1, 3, config.image_size, config.image_size))
    head = 2 * config.hidden_size * 3
    assert training_flops_per_image(size) == 3 * (counter.get_total_flops() - head)
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("cpu") is None


def test_a_model_parallel_configuration_names_its_layout_and_a_bad_one_is_refused_in_one_line():
    """hybrid_parallel/tpN/ppN: the settings the example's booster gets (a pipeline's batch in one microbatch a
    stage); a layout part that is not one, on a setup other than a plugin, is refused before anything runs."""
    from benchmarks.step_benchmark import parse_configuration, plugin_settings

    configuration = parse_configuration("hybrid_parallel/tp2/pp4@fp16")
    assert (configuration.plugin, configuration.tp_size, configuration.pp_size, configuration.precision) == (
        "hybrid_parallel", 2, 4, "fp16")
    settings = plugin_settings(configuration, batch_size=32)
    assert (settings.tp_size, settings.pp_size, settings.microbatch_size, settings.precision) == (2, 4, 8, "fp16")
    assert parse_configuration("gemini:optimizer")[4:6] == (1, 1) and parse_configuration("torch/tp2").tp_size == 2

    def refusal(name, *flags, processes=1):
        run = subprocess.run([sys.executable, "-m", "benchmarks.step_benchmark", "--configurations", name, *flags],
                             cwd=ROOT, env=example_env(WORLD_SIZE=processes), capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and "Traceback" not in run.stderr
        return run.stderr.splitlines()[-1].removeprefix("step_benchmark.py: error: ")

    for name in ("hybrid_parallel/tq2", "hybrid_parallel/tp0", "torch/tp2", "torch_ddp/pp2", "gemini:all/tp2"):
        assert refusal(name).startswith(f"unknown configuration {name}; ")
    assert refusal("hybrid_parallel/tp2/pp2") == ("configuration hybrid_parallel/tp2/pp2 splits the model over 4 GPUs, "
                                                  "which do not divide the 1 it runs on; run it on a multiple of 4 "
                                                  "(GPUNUM)")
    assert refusal("hybrid_parallel/tp4", "--model_sizes", "B/16,tiny", processes=4) == (
        "configuration hybrid_parallel/tp4: --tp_size 4 does not divide the 2 attention heads of ViT-tiny (tensor "
        "parallelism splits them); pick one of: 1, 2")


def test_memory_mode_walks_the_sizes_down_until_one_trains(tmp_path, default_port_taken):
    host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # the host memory 22B/14 needs (fp32 weights, gradients and Adam's states: 16 bytes a parameter; with LoRA the fp32
    # model built there, 4): on a host that has it, a configuration would build 22B/14 on the CPU, for minutes
    needed = {configuration: gib for configuration, gib in (("torch", 324), ("torch_ddp", 324), ("torch_ddp+lora", 81))
              if gib > host_gib}
    output = tmp_path / "largest.json"
    env = example_env(LARGEST=1, MODEL_SIZES="tiny,22B/14,B/16", BATCH_SIZES=2, STEPS=1, WARMUP_STEPS=1, OUTPUT=output,
                      CONFIGURATIONS=",".join(needed))
    env.pop("MASTER_PORT")  # the default, which another run on the machine holds
    run = subprocess.run(["bash", "benchmarks/run_step_benchmark.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads(output.read_text())
    # each size in a process of its own, from the largest down; 22B/14 is not tried, needing more than the host has
    assert {row["configuration"] for row in table["rows"]} == set(needed)
    for configuration, needed_gib in needed.items():
        rows = [row for row in table["rows"] if row["configuration"] == configuration]
        assert [row["model"] for row in rows] == ["22B/14", "B/16"]
        assert rows[0]["result"] == f"not tried: needs about {needed_gib} GiB of host memory, of {host_gib:.0f} here"
        assert rows[1]["result"] == "trains" and 85e6 < rows[1]["parameters"] < 87e6
        assert rows[1]["images_per_second"] > 0 and 0.5 < rows[1]["peak_host_gib"] < 24
        assert f"- {configuration}: largest ViT-B/16 (85.8M parameters)" in table["summary"]
        assert (tmp_path / "largest_logs" / f"{configuration.replace('+', '_')}_B_16_b2.log").exists()


def test_speed_mode_times_each_batch_from_the_smallest_up_and_names_the_fastest(tmp_path, default_port_taken):
    output = tmp_path / "fastest.json"
    env = example_env(FASTEST=1, BATCH_SIZES="8,2,4", STEPS=2, WARMUP_STEPS=1, OUTPUT=output,
                      CONFIGURATIONS="torch_ddp,torch_ddp+lora")
    env.pop("MASTER_PORT")  # the default, which another run on the machine holds
    run = subprocess.run(["bash", "benchmarks/run_step_benchmark.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads(output.read_text())
    assert [(row["configuration"], row["batch_size_per_gpu"]) for row in table["rows"]] == [
        (name, batch_size) for name in ("torch_ddp", "torch_ddp+lora") for batch_size in (2, 4, 8)]
    for name in ("torch_ddp", "torch_ddp+lora"):
        rows = [row for row in table["rows"] if row["configuration"] == name]
        assert all(row["result"] == "trains" and row["images_per_second"] > 0 for row in rows)
        fastest = max(rows, key=lambda row: row["images_per_second"])
        speedup = fastest["images_per_second"] / rows[0]["images_per_second"]
        assert (f"- {name} ViT-tiny: fastest at batch {fastest['batch_size_per_gpu']}, "
                f"{fastest['images_per_second']:.1f} images/s; {speedup:.2f}x its rate at batch 2") in table["summary"]
        assert f"- {name} ViT-tiny: fastest at batch" in run.stdout
    best = max(table["rows"], key=lambda row: row["images_per_second"])  # of both configurations
    assert table["summary"][-1] == (f"- ViT-tiny: fastest Colossal-AI setting {best['configuration']} at batch "
                                    f"{best['batch_size_per_gpu']}, {best['images_per_second']:.1f} images/s")


def test_a_run_that_fails_inside_the_timed_part_stops_the_device_benchmarks_naming_it(tmp_path):
    """reproduce_gpu_figures.sh times each run from the shell: a run that fails is never recorded as a time, the
    script stops with a non-zero exit and one line naming the run (here the streaming part's dataset generation,
    given a source folder that does not exist)."""
    env = {**os.environ, "DATASET": str(tmp_path / "no_such_beans"), "MODEL": str(MODEL_DIR),
           "LOG_DIR": str(tmp_path / "logs"), "RUN_ROOT": str(tmp_path / "runs")}
    run = subprocess.run(["bash", "benchmarks/reproduce_gpu_figures.sh", "streaming"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert "generating:" not in run.stdout, run.stdout  # no time was printed for the failed run
    assert run.stderr.strip().splitlines()[-1] == (
        "error: a timed run failed (exit 1): python3 benchmarks/synthesize_dataset.py --source "
        f"{tmp_path}/no_such_beans --output {tmp_path}/runs/large_beans --train 50000 --eval 1000; its output is at the end of "
        f"{tmp_path}/logs/end_to_end.log")
    assert "No such file or directory" in (tmp_path / "logs" / "end_to_end.log").read_text()
    assert not (tmp_path / "logs" / "streaming.json").exists()


def test_checkpoint_benchmark_times_the_examples_own_checkpoints(tmp_path):
    """benchmarks/checkpoint_benchmark.py writes the training script's checkpoints (torch_ddp, a tiny ViT on the
    CPU), beside training, and reports each one's seconds waited and writing and its size, as printed and as JSON,
    with the profile asked for."""
    output = tmp_path / "checkpoints.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.checkpoint_benchmark", "--model_size", "tiny",
                          "--repeats", "2", "--profile", "30", "--output_path", str(tmp_path / "run"),
                          "--json", str(output)], cwd=ROOT, env=example_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads(output.read_text())
    assert [checkpoint["step"] for checkpoint in table["checkpoints"]] == [1, 2]
    assert (f"steps before the first checkpoint, while each rank took the host memory for its copy: "
            f"{table['steps_before_first_checkpoint']}") in run.stdout
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert [folder.name for folder in checkpoints] == ["step_0000002"]  # the newest kept, as the example keeps it
    size = sum(path.stat().st_size for path in checkpoints[0].rglob("*") if path.is_file())
    printed = [line for line in run.stdout.splitlines() if re.match(r"\| \d", line)]
    for line, checkpoint in zip(printed, table["checkpoints"], strict=True):
        assert checkpoint["seconds"] > 0 and checkpoint["write_seconds"] > 0 and checkpoint["beside_training"]
        assert checkpoint["gib"] == size / 2**30
        beside, alone = checkpoint["step_seconds_beside_write"], checkpoint["step_seconds_alone"]
        assert (beside is None) == (alone is None) == (checkpoint["steps_beside_write"] == 0)
        assert line == (f"| {checkpoint['step']} | {checkpoint['seconds']:.2f} | {checkpoint['write_seconds']:.2f} | "
                        f"{checkpoint['gib']:.2f} | yes | {checkpoint['steps_beside_write']} | "
                        f"{'-' if beside is None else f'{beside:.3f}'} | {'-' if alone is None else f'{alone:.3f}'} |")
    peer = table["colossalai_booster_save"]  # the same state through Colossal-AI's booster, written and removed
    assert peer["seconds"] > 0 and 0.5 * size / 2**30 < peer["gib"] < 2 * size / 2**30
    assert (f"Colossal-AI's booster, the same state (save_model, save_optimizer, save_lr_scheduler), training waiting: "
            f"{peer['seconds']:.2f} s, {peer['gib']:.2f} GiB") in run.stdout
    assert not (tmp_path / "run" / "colossalai_booster").exists()
    # the profile of the checkpoint, seen in Colossal-AI's checkpoint IO (on the GPU machine's Python 3.12 the profile
    # held none of the example's own frames above it)
    assert "colossalai/checkpoint_io/" in run.stdout.split("by cumulative time:")[1]
