"""Training-step throughput of a ViT under each Colossal-AI plugin, against plain PyTorch measured in the same run.

Times whole training steps (forward, backward, optimizer) on synthetic batches already on the device, after
warm-up, with the example's own plugin and optimizer settings (build_plugin, build_optimizer of vit_train_demo.py).
The references are a plain PyTorch model with bf16 autocast, SDPA attention and fused AdamW, eager and compiled
(torch_compile_max_autotune also autotunes the matrix multiplications: about 4.5 minutes of warm-up for ViT-B/16, so it
runs only when asked for); they run in single-process invocations only. --profile writes where each configuration's
step spends its GPU and CPU time. Launch through run_benchmark.sh, or
`torchrun --standalone --nproc_per_node N vit_benchmark.py ...` to time the plugins data-parallel over N GPUs.
"""
import argparse
import datetime
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
import colossalai
from colossalai.accelerator import get_accelerator
from transformers import ViTConfig, ViTForImageClassification

from args import PLUGINS, parse_demo_args
from vit_train_demo import (SINGLE_PROCESS_ENV, Boosted, Topology, build_booster, build_optimizer,
                            forward_backward, plain_cross_entropy)

REFERENCES = ("torch", "torch_compile", "torch_compile_max_autotune")
DEFAULT_CONFIGURATIONS = ("torch", "torch_compile") + PLUGINS  # max-autotune only on request: minutes of tuning
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
            patch_size=8)  # for a quick run on the CPU


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configurations", default=",".join(DEFAULT_CONFIGURATIONS),
                        help=f"comma-separated, from {', '.join(REFERENCES + PLUGINS)}")
    parser.add_argument("--batch_sizes", default="32,128", help="comma-separated batch sizes of each GPU")
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each configuration")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, 32-pixel ViT instead of ViT-B/16")
    parser.add_argument("--json", default="benchmark.json", help="where the table is also written")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile 3 steps of each configuration: DIR/<configuration>_b<batch>.txt")
    args = parser.parse_args()
    args.configurations = args.configurations.split(",")
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    unknown = set(args.configurations) - set(REFERENCES + PLUGINS)
    if unknown:
        parser.error(f"unknown --configurations {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(REFERENCES + PLUGINS)}")
    if not torch.cuda.is_available() and set(args.configurations) - {"torch", "torch_ddp"}:
        parser.error("on the CPU only --configurations torch,torch_ddp run (with --tiny)")
    return args


def new_model(args, device):
    torch.manual_seed(0)
    config = ViTConfig(num_labels=3, attn_implementation="sdpa", **(TINY if args.tiny else {}))
    return ViTForImageClassification(config).to(device), config.image_size


def reference_step_function(name, args, device):
    """One training step of plain PyTorch: bf16 autocast on the GPU (fp32 on the CPU), fused AdamW."""
    model, image_size = new_model(args, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.5, fused=device.type == "cuda")
    forward = model
    if name == "torch_compile":
        forward = torch.compile(model)
    elif name == "torch_compile_max_autotune":  # CUDA graphs left out: the plugins cannot use them either
        forward = torch.compile(model, mode="max-autotune-no-cudagraphs")

    def step(pixel_values, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(pixel_values=pixel_values).logits
        F.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, image_size


def plugin_step_function(name, args, device):
    """One training step of the example with its default settings for the plugin `name`."""
    settings = parse_demo_args(["--plugin", name])
    model, image_size = new_model(args, device)
    plugin, booster = build_booster(model, settings, device)
    topology = Topology(plugin)
    model, optimizer, *_ = booster.boost(model, build_optimizer(model, settings))
    boosted = Boosted(model, optimizer, None, booster, topology)
    model.train()

    def step(pixel_values, labels):
        batch = {"pixel_values": pixel_values, "labels": labels}
        forward_backward(boosted, batch, plain_cross_entropy, train=True)
        optimizer.step()
        optimizer.zero_grad()

    return step, image_size


def measure(name, batch_size, args, device):
    """Mean seconds per step over args.steps steps after args.warmup_steps, and the peak GPU memory in GiB."""
    build = reference_step_function if name in REFERENCES else plugin_step_function
    step, image_size = build(name, args, device)
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, 3, (batch_size,), device=device)
    for _ in range(args.warmup_steps):
        step(pixel_values, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(pixel_values, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()  # the steps are queued asynchronously: wait for the last one before reading time
    seconds = (time.perf_counter() - start) / args.steps
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if args.profile:
        profile_steps(step, pixel_values, labels, device,
                      os.path.join(args.profile, f"{name}_b{batch_size}.txt") if dist.get_rank() == 0 else None)
    return seconds, peak_gib


def profile_steps(step, pixel_values, labels, device, path, steps=3):
    """Profiles `steps` more steps and writes (when `path` is given) the operators that take the most GPU time and
    the most CPU time: a step bound by the CPU shows far less GPU time than wall time."""
    on_gpu = device.type == "cuda"
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_gpu) as profiler:
        for _ in range(steps):
            step(pixel_values, labels)
        if on_gpu:
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1000 / steps
    if path is None:
        return
    operators = profiler.key_averages()
    lines = [f"per step, under the profiler: {wall_ms:.1f} ms wall"]
    if on_gpu:
        kernel_ms = sum(op.self_device_time_total for op in operators  # annotations span kernels counted already
                        if op.device_type == DeviceType.CUDA and not op.is_user_annotation) / 1000
        lines[0] += f", {kernel_ms / steps:.1f} ms of GPU kernels (summed over streams)"
        lines += ["", "by GPU time", operators.table(sort_by="self_device_time_total", row_limit=40)]
    lines += ["", "by CPU time", operators.table(sort_by="self_cpu_time_total", row_limit=40)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")


def main():
    args = parse_args()
    for name, value in SINGLE_PROCESS_ENV.items():
        os.environ.setdefault(name, value)
    accelerator = get_accelerator()
    colossalai.launch_from_torch(backend=accelerator.communication_backend, seed=0, verbose=False)
    device = accelerator.get_current_device()
    world_size = dist.get_world_size()
    reporting = dist.get_rank() == 0
    configurations = [name for name in args.configurations if name in PLUGINS or world_size == 1]
    rows = []
    for batch_size in args.batch_sizes:
        eager_images_per_second = None
        for name in configurations:
            seconds, peak_gib = measure(name, batch_size, args, device)
            images_per_second = batch_size * world_size / seconds
            if name == "torch":
                eager_images_per_second = images_per_second
            rows.append({"configuration": name, "gpus": world_size, "batch_size_per_gpu": batch_size,
                         "images_per_second": images_per_second, "step_ms": seconds * 1000, "peak_gib": peak_gib,
                         "vs_eager_reference": images_per_second / eager_images_per_second
                         if eager_images_per_second else None})
            if reporting:
                print(f"{name} batch {batch_size}: {images_per_second:.0f} images/s", flush=True)
            torch._dynamo.reset()  # the next compiled configuration starts without this one's graphs and guards
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not reporting:
        return
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\n{'ViT tiny' if args.tiny else 'ViT-B/16'}, {device_name} x {world_size}, torch {torch.__version__}, "
          f"colossalai {colossalai.__version__}, {args.steps} steps after {args.warmup_steps} warm-up\n")
    print("| configuration | GPUs | batch per GPU | images/s | step ms | peak GiB | vs eager reference |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ratio = f"{row['vs_eager_reference']:.2f}x" if row["vs_eager_reference"] else "-"
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        print(f"| {row['configuration']} | {row['gpus']} | {row['batch_size_per_gpu']} | "
              f"{row['images_per_second']:.0f} | {row['step_ms']:.1f} | {peak} | {ratio} |")
    with open(args.json, "w") as file:
        json.dump({"model": "tiny" if args.tiny else "vit-base-patch16-224", "device": device_name,
                   "gpus": world_size, "torch": torch.__version__, "colossalai": colossalai.__version__,
                   "date": datetime.date.today().isoformat(), "steps": args.steps,
                   "warmup_steps": args.warmup_steps, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    main()
