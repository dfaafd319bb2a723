"""Training-step throughput of a ViT under each Colossal-AI plugin, against plain PyTorch measured in the same run.

Times whole training steps (forward, backward, optimizer) of ViTs of random weights on synthetic batches already on
the device, after warm-up, with the example's own plugin, offload and optimizer settings (plugins.py, as the
training script builds them): a configuration is a plugin, optionally with what it offloads,
`plugin:offload[:fraction]` (gemini:optimizer:0.5), hybrid_parallel with the model split over tensor- and
pipeline-parallel GPUs, `hybrid_parallel/tp2/pp2` (a batch is then each data-parallel group's, of tp x pp GPUs), or
training LoRA adapters over its frozen weights held in 16 or 4 bits, `plugin+lora` or `plugin+qlora`. The
references are a plain PyTorch model with bf16 autocast, SDPA attention and fused AdamW, eager and compiled
(torch_compile_max_autotune also autotunes the matrix multiplications: about 4.5 minutes of warm-up for ViT-B/16,
so it runs only when asked for); they run in single-process invocations only, as does DeepSpeed ZeRO-2 or ZeRO-3
with offload (deepspeed_zero2_offload, deepspeed_zero3_offload), the peer a user would pick instead to train a model
larger than the GPU, if installed.

--largest is the memory mode: for each configuration, the sizes of --model_sizes from the largest down, each in a
process of its own (so that each has its own peak host memory, and running out spoils nothing), until one trains
under --max_gpu_memory_gib; a size that cannot fit the host's or the GPU's memory whatever the batch is not tried.
--fastest is the speed mode under the same cap: each configuration at each size at the batch sizes of --batch_sizes
from the smallest up, each in a process of its own, until one does not fit; the summary names the fastest batch of
each (a model that is offloaded each step trains faster at larger batches, which share the transfers and the CPU
optimizer's step), and compares the fastest Colossal-AI configuration with the fastest DeepSpeed at each size.
--profile writes where each configuration's step spends its GPU and CPU time. Launch through
benchmarks/run_step_benchmark.sh, or from the example's folder as
`torchrun --standalone --nproc_per_node N -m benchmarks.step_benchmark ...` to time the plugins data-parallel over N
GPUs.
"""
import argparse
import collections
import datetime
import functools
import gc
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
import colossalai
from colossalai.testing import free_port
from transformers import ViTConfig, ViTForImageClassification

from args import layout_error
from devices import init_distributed
from evaluation import cross_entropy
from models import pad_classifier, with_lora
from plugins import (OFFLOADS, PLUGINS, Boosted, PluginSettings, Topology, autocast_dtype, build_booster,
                     build_optimizer, default_precision, forward_backward, precision_error, settings_error)

REFERENCES = ("torch", "torch_compile", "torch_compile_max_autotune")
PEERS = ("deepspeed_zero2_offload", "deepspeed_zero3_offload")
DEFAULT_CONFIGURATIONS = ("torch", "torch_compile", *PLUGINS)  # max-autotune only on request: minutes of tuning
CPU_CONFIGURATIONS = ("torch", "torch_ddp", "torch_ddp+lora")
# hidden size, layers, MLP size, attention heads, patch size: ViT-B/L/H (Dosovitskiy et al.), g/G (Zhai et al.),
# e (PaLI), and larger ones: InternViT-6B's shape (5.5B parameters at 224 pixels), 6.5B, 8B, 12B and ViT-22B's (Dehghani
# et al.); tiny, a 32-pixel ViT for a quick run on the CPU
SIZES = {"tiny": (64, 2, 128, 2, 8), "B/16": (768, 12, 3072, 12, 16), "L/16": (1024, 24, 4096, 16, 16),
         "H/14": (1280, 32, 5120, 16, 14), "g/14": (1408, 40, 6144, 16, 14), "G/14": (1664, 48, 8192, 16, 14),
         "e/14": (1792, 56, 15360, 16, 14), "5.5B/14": (3200, 45, 12800, 25, 14), "6.5B/14": (3584, 42, 14336, 28, 14),
         "8B/14": (4096, 40, 16384, 32, 14), "12B/14": (5120, 40, 20480, 40, 14), "22B/14": (6144, 48, 24576, 48, 14)}


# NVIDIA's datasheet peaks of dense bf16 matrix maths per GPU, which model FLOPs utilisation is measured against
BF16_PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}

class Configuration(collections.namedtuple("Configuration",
                                           "setup plugin offload fraction tp_size pp_size adapters precision parts")):
    @property
    def split_over(self):
        """The GPUs one copy of the model is split over, tensor- and pipeline-parallel."""
        return self.tp_size * self.pp_size


ADAPTERS = ("", "lora", "qlora")
LORA_RANK = 16  # on the attention's query and value, the training script's default targets


def parse_configuration(name):
    """The parts of a configuration's name, `setup[/tpN][/ppN][+adapters][@precision]`, the setup being a reference,
    a DeepSpeed peer or `plugin[:offload[:fraction]]`, tpN and ppN hybrid_parallel's tensor- and pipeline-parallel
    sizes (None where the name has a part that is neither), the adapters lora or qlora (LoRA of rank LORA_RANK, over
    16-bit or 4-bit frozen weights; "" for full fine-tuning), precision "" for the default (parts: how many
    `:`-separated parts the setup has)."""
    setup, _, precision = name.partition("@")
    setup, _, adapters = setup.partition("+")
    setup, *layout = setup.split("/")
    sizes = {part[:2]: int(part[2:]) for part in layout if re.fullmatch(r"(tp|pp)[1-9]\d*", part)}
    tp_size, pp_size = (sizes.get("tp", 1), sizes.get("pp", 1)) if len(sizes) == len(layout) else (None, None)
    parts = setup.split(":")
    plugin, offload, fraction = (parts + ["none", "1"][len(parts) - 1:])[:3]
    return Configuration(setup, plugin, offload, fraction, tp_size, pp_size, adapters, precision, len(parts))


def plugin_settings(configuration, batch_size=None):
    """The plugin settings a Colossal-AI configuration names, its precision the training script's default if none; a
    pipeline splits `batch_size` into one microbatch a stage."""
    precision = configuration.precision or default_precision(configuration.plugin, configuration.offload,
                                                             torch.cuda.is_available())
    pipeline = configuration.pp_size > 1 and batch_size
    return PluginSettings(configuration.plugin, precision, configuration.offload, float(configuration.fraction),
                          configuration.tp_size, configuration.pp_size,
                          microbatch_size=batch_size // configuration.pp_size if pipeline else None,
                          lora_rank=LORA_RANK if configuration.adapters else 0,
                          lora_quantize=configuration.adapters == "qlora")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configurations",
                        help=f"comma-separated (default: {','.join(DEFAULT_CONFIGURATIONS)} on a GPU, "
                        f"{','.join(CPU_CONFIGURATIONS)} on the CPU), from "
                        f"{', '.join((*REFERENCES, *PLUGINS, *PEERS))}; a plugin may "
                        "name what it offloads (gemini:optimizer, gemini:all:0.5, low_level_zero:optimizer) or train LoRA "
                        f"adapters of rank {LORA_RANK} over 16-bit or 4-bit weights (torch_ddp+lora, torch_ddp+qlora), "
                        "and a plugin or DeepSpeed a precision other than its default (gemini:optimizer@bf16)")
    parser.add_argument("--model_sizes", help=f"comma-separated (default: B/16 on a GPU, tiny on the CPU), from "
                        f"{', '.join(SIZES)}")
    parser.add_argument("--batch_sizes", default="32,128", help="comma-separated batch sizes of each GPU")
    parser.add_argument("--warmup_steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each configuration")
    parser.add_argument("--grad_checkpoint", action="store_true", help="recompute activations in the backward pass")
    parser.add_argument("--max_gpu_memory_gib", type=float, default=None,
                        help="cap each process's GPU memory at this (to rehearse a smaller GPU)")
    parser.add_argument("--largest", action="store_true",
                        help="memory mode: each configuration's largest model of --model_sizes that trains")
    parser.add_argument("--fastest", action="store_true",
                        help="speed mode: each configuration and size at each of --batch_sizes up to the first that "
                        "does not fit, and the fastest")
    parser.add_argument("--timeout_per_size", type=float, default=900,
                        help="--largest, --fastest: seconds each configuration may take at one size and batch "
                        "before it is stopped")
    parser.add_argument("--json", default="benchmark.json", help="where the table is also written")
    parser.add_argument("--profile", metavar="DIR",
                        help="also profile 3 steps of each configuration: DIR/<configuration>_<size>_b<batch>.txt")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    args.configurations = (args.configurations or ",".join(DEFAULT_CONFIGURATIONS if on_gpu
                                                           else CPU_CONFIGURATIONS)).split(",")
    args.model_sizes = (args.model_sizes or ("B/16" if on_gpu else "tiny")).split(",")
    args.batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    unknown_sizes = set(args.model_sizes) - set(SIZES)
    if unknown_sizes:
        parser.error(f"unknown --model_sizes {', '.join(sorted(unknown_sizes))}; choose from {', '.join(SIZES)}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for name in args.configurations:
        configuration = parse_configuration(name)
        plugin = configuration.setup not in REFERENCES + PEERS
        if (plugin and (configuration.plugin not in PLUGINS or configuration.offload not in OFFLOADS
                        or configuration.parts > 3) or configuration.precision not in ("", "bf16", "fp16")
                or configuration.tp_size is None or configuration.split_over > 1
                and not (plugin and configuration.plugin in PLUGINS and PLUGINS[configuration.plugin].model_parallel)
                or configuration.adapters not in ADAPTERS or configuration.adapters and not plugin):
            parser.error(f"unknown configuration {name}; choose from {', '.join((*REFERENCES, *PLUGINS, *PEERS))}; a "
                         f"plugin may add what it offloads, plugin:offload[:fraction] with offload one of "
                         f"{', '.join(OFFLOADS)}, hybrid_parallel its tensor- and pipeline-parallel sizes as /tpN "
                         "and /ppN, LoRA adapters as +lora or +qlora, and a plugin or DeepSpeed its precision, @bf16 "
                         "or @fp16")
        if world_size % configuration.split_over:
            parser.error(f"configuration {name} splits the model over {configuration.split_over} GPUs, which do not "
                         f"divide the {world_size} it runs on; run it on a multiple of {configuration.split_over} "
                         "(GPUNUM)")
        for size in args.model_sizes:
            if error := layout_error(vit_config(size), configuration.tp_size, configuration.pp_size, f"ViT-{size}"):
                parser.error(f"configuration {name}: {error}")
        if is_colossalai(name):
            settings = plugin_settings(configuration)
            if error := settings_error(settings, on_gpu) or precision_error(settings, on_gpu):
                parser.error(f"configuration {name}: {error}")
    if not on_gpu and set(args.configurations) - set(CPU_CONFIGURATIONS):
        parser.error(f"on the CPU only --configurations {','.join(CPU_CONFIGURATIONS)} run (with --model_sizes tiny)")
    return args


def vit_config(size):
    hidden, layers, mlp, heads, patch = SIZES[size]
    return ViTConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp, num_attention_heads=heads,
                     patch_size=patch, image_size=32 if size == "tiny" else 224, num_labels=3,
                     attn_implementation="sdpa")


def training_flops_per_image(size):
    """The model FLOPs of one image's training step: 3 times the forward pass's matrix products (patch embedding,
    attention, MLP), as model FLOPs utilisation counts them (activations recomputed in the backward pass are not)."""
    hidden, layers, mlp, heads, patch = SIZES[size]
    patches = (vit_config(size).image_size // patch) ** 2
    tokens = patches + 1  # and the class token
    embedding = 2 * patches * 3 * patch**2 * hidden
    layer = 2 * tokens * (4 * hidden**2 + 2 * hidden * mlp) + 2 * 2 * tokens**2 * hidden  # projections, MLP; QK^T, AV
    return 3 * (embedding + layers * layer)


def peak_flops(device_name):
    """The GPU's bf16 peak FLOPs per second (BF16_PEAK_FLOPS), or None for a device not listed."""
    return next((flops for name, flops in BF16_PEAK_FLOPS.items() if name in device_name), None)


def parameter_count(size):
    """Parameters of a ViT of this size, counted on a model built without storage."""
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in ViTForImageClassification(vit_config(size)).parameters())


def new_model(size, grad_checkpoint, device):
    """A ViT of this size with random weights on `device`: drawn on the GPU when there is one, where they take a
    second (PyTorch's own initialisation of a 6B-parameter model on the host takes minutes)."""
    torch.manual_seed(0)
    config = vit_config(size)
    with torch.device("meta"):
        model = ViTForImageClassification(config)
    model.to_empty(device=device)
    draw_on = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1 or "token" in name:
                parameter.copy_(torch.randn(parameter.shape, device=draw_on) * config.initializer_range)
            else:  # biases, and the layer norms' weights
                parameter.fill_(float("layernorm" in name and name.endswith("weight")))
    if grad_checkpoint:
        model.gradient_checkpointing_enable()
    return model, config.image_size


def reference_step_function(name, size, args, device):
    """One training step of plain PyTorch: bf16 autocast on the GPU (fp32 on the CPU), fused AdamW."""
    model, image_size = new_model(size, args.grad_checkpoint, device)
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


def boosted_model(name, size, grad_checkpoint, device, schedule=None, batch_size=None):
    """The example's booster, model and optimizer (and the learning-rate scheduler `schedule` builds for the
    optimizer, if given) for the plugin configuration `name` and a ViT of `size`, and the model's image size; a
    pipeline splits `batch_size` into microbatches."""
    settings = plugin_settings(parse_configuration(name), batch_size)
    # offloading plugins place the weights themselves, and LoRA moves them once held in 16 or 4 bits: built on the
    # host, the model in fp32 never has to fit on the GPU
    on_host = settings.offload != "none" or settings.lora_rank
    model, image_size = new_model(size, grad_checkpoint, "cpu" if on_host else device)
    if settings.tp_size > 1:
        pad_classifier(model, settings.tp_size)
    plugin, booster = build_booster(model, settings, device)
    if settings.lora_rank:  # the training script's defaults: alpha the rank, dropout 0.1
        model = with_lora(model, booster, settings.lora_rank, None, 0.1, "query,value", settings.lora_quantize,
                          autocast_dtype(settings))
    optimizer = build_optimizer(model, settings, learning_rate=1e-4, weight_decay=0.5)
    model, optimizer, _, _, lr_scheduler = booster.boost(model, optimizer,
                                                         lr_scheduler=schedule(optimizer) if schedule else None)
    model.train()
    return Boosted(model, optimizer, lr_scheduler, booster, Topology(plugin)), image_size


def train_step(boosted, pixel_values, labels):
    """One training step of the example: forward, backward and the optimizer's step."""
    forward_backward(boosted, {"pixel_values": pixel_values, "labels": labels}, cross_entropy, backward=True)
    boosted.optimizer.step()
    boosted.optimizer.zero_grad()


def plugin_step_function(name, size, args, device):
    """One training step of the example with its settings for the plugin (and offload) `name`."""
    boosted, image_size = boosted_model(name, size, args.grad_checkpoint, device, batch_size=args.batch_size)
    return functools.partial(train_step, boosted), image_size


def deepspeed_step_function(name, size, args, device):
    """One training step of DeepSpeed ZeRO-2 (optimizer offloaded) or ZeRO-3 (optimizer and weights offloaded), in
    bf16 (or fp16 if `name` ends in @fp16) with its CPU Adam: a benchmark-only peer, not a requirement of the example."""
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    model, image_size = new_model(size, args.grad_checkpoint, "cpu")
    configuration = parse_configuration(name)
    setup, precision = configuration.setup, configuration.precision
    stage = 2 if setup == "deepspeed_zero2_offload" else 3
    offload = {"device": "cpu", "pin_memory": True}
    config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
              precision or "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage, "offload_optimizer": offload,
                                    **({"offload_param": offload} if stage == 3 else {})}}
    optimizer = DeepSpeedCPUAdam(model.parameters(), lr=1e-4, weight_decay=0.5, adamw_mode=True)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(pixel_values, labels):
        logits = engine(pixel_values=pixel_values.to(torch.float16 if precision == "fp16" else torch.bfloat16)).logits
        engine.backward(F.cross_entropy(logits.float(), labels))
        engine.step()

    return step, image_size


def measure(name, size, batch_size, args, device):
    """Mean seconds per step over args.steps steps after args.warmup_steps (None if the GPU ran out of memory), the
    peak GPU memory and the GPU memory held between steps (weights and optimizer states), in GiB."""
    build = (reference_step_function if name in REFERENCES else plugin_step_function if is_colossalai(name)
             else deepspeed_step_function)
    args.batch_size = batch_size  # DeepSpeed's configuration names it
    seconds = resident_gib = None
    try:
        step, image_size = build(name, size, args, device)
        pixel_values = torch.randn(batch_size, 3, image_size, image_size, device=device)
        labels = torch.randint(0, 3, (batch_size,), device=device)
        for _ in range(args.warmup_steps):
            step(pixel_values, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            resident_gib = torch.cuda.memory_allocated() / 2**30
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(pixel_values, labels)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the steps are queued asynchronously: wait for the last one before reading time
        seconds = (time.perf_counter() - start) / args.steps
    except torch.OutOfMemoryError:
        pass
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if args.profile and seconds:
        profile_steps(step, pixel_values, labels, device,
                      os.path.join(args.profile, file_name(f"{name}_{size}_b{batch_size}.txt"))
                      if dist.get_rank() == 0 else None)
    return seconds, peak_gib, resident_gib


def file_name(text):
    """`text` with what is not a letter, digit, dot or dash as _ (configurations and sizes have : @ /)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", text)


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


def is_colossalai(name):
    return name not in REFERENCES and parse_configuration(name).setup not in PEERS


def time_configurations(args):
    """Every configuration at every size and batch size, in this process (launched by torchrun)."""
    device = init_distributed(seed=0, max_gpu_memory_gib=args.max_gpu_memory_gib)
    world_size = dist.get_world_size()
    reporting = dist.get_rank() == 0
    configurations = [name for name in args.configurations if is_colossalai(name) or world_size == 1]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = peak_flops(device_name)
    rows = []
    for size in args.model_sizes:
        for batch_size in args.batch_sizes:
            eager_images_per_second = None
            for name in configurations:
                seconds, peak_gib, resident_gib = measure(name, size, batch_size, args, device)
                data_parallel_ranks = world_size // parse_configuration(name).split_over  # a batch each
                images_per_second = batch_size * data_parallel_ranks / seconds if seconds else None
                if name == "torch":
                    eager_images_per_second = images_per_second
                # LoRA's frozen weights skip their gradients' products: its model FLOPs are not these
                full = images_per_second and not parse_configuration(name).adapters
                model_flops = full and images_per_second / world_size * training_flops_per_image(size)
                rows.append({"configuration": name, "model": size, "parameters": parameter_count(size),
                             "gpus": world_size, "batch_size_per_gpu": batch_size,
                             "images_per_second": images_per_second, "step_ms": seconds and seconds * 1000,
                             "model_tflops_per_second": model_flops / 1e12 if model_flops else None,
                             "mfu": model_flops / peak if model_flops and peak else None,
                             "result": "trains" if seconds else "out of GPU memory", "peak_gib": peak_gib,
                             "resident_gib": resident_gib,
                             "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                             "vs_eager_reference": images_per_second / eager_images_per_second
                             if eager_images_per_second and images_per_second else None})
                if reporting:
                    print(f"{name} ViT-{size} batch {batch_size}: "
                          f"{f'{images_per_second:.0f} images/s' if seconds else 'out of GPU memory'}", flush=True)
                torch._dynamo.reset()  # the next compiled configuration starts without this one's graphs and guards
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if dist.get_backend() == "nccl":  # (gloo's can deadlock in its destructor: see the end of vit_train_demo.main)
        dist.destroy_process_group()
    return rows if reporting else None, device_name, world_size


def offloaded_part(name):
    """What a configuration keeps on the host: none, optimizer (fp32 weights and Adam states) or all."""
    configuration = parse_configuration(name)
    if configuration.setup in PEERS:
        return "optimizer" if configuration.setup == "deepspeed_zero2_offload" else "all"
    return configuration.offload if is_colossalai(name) else "none"


def memory_needed(name, parameters, gpu_cap_gib):
    """Why a configuration cannot train a model of `parameters` here without trying, or None: what it must hold
    whatever the batch (host: the fp32 model built there, plus the fp32 weights and Adam states it offloads; GPU:
    under LoRA the frozen weights in 16 or 4 bits, else the 16-bit weights and gradients where the optimizer is
    offloaded, fp32 weights, gradients and Adam states where nothing is)."""
    offloaded, adapters = offloaded_part(name), parse_configuration(name).adapters
    on_gpu = torch.cuda.is_available()
    host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    # training on the host itself (offloaded, or on the CPU) holds Adam's states there too, except under LoRA
    host_needed = parameters * (16 if (offloaded != "none" or not on_gpu) and not adapters else 4) / 2**30
    if host_needed > 0.9 * host_gib:
        return f"not tried: needs about {host_needed:.0f} GiB of host memory, of {host_gib:.0f} here"
    if on_gpu:
        gpu_gib = min(torch.cuda.get_device_properties(0).total_memory / 2**30, gpu_cap_gib or float("inf"))
        per_parameter = ({"lora": 2, "qlora": 0.5}[adapters] if adapters
                         else {"none": 16, "optimizer": 4, "all": 0}[offloaded])
        gpu_needed = parameters * per_parameter / 2**30
        if gpu_needed > gpu_gib:
            return (f"not tried: needs over {gpu_needed:.0f} GiB of GPU memory, of "
                    f"{f'the {gpu_cap_gib:g} GiB cap' if gpu_cap_gib else f'{gpu_gib:.0f} GiB here'}")
    return None


def installed(configurations):
    """The configurations whose libraries are installed (DeepSpeed is a benchmark peer only)."""
    for name in configurations:
        if parse_configuration(name).setup in PEERS and importlib.util.find_spec("deepspeed") is None:
            print(f"{name}: skipped, DeepSpeed is not installed (a benchmark peer only: pip install deepspeed)")
        else:
            yield name


def each_alone(name, attempts, args, stop):
    """The rows of `name` at each (size, batch size) of `attempts`, each in a process of its own (so that each has
    its own peak host memory, and running out spoils nothing), up to the first row for which `stop` is true."""
    log_dir = f"{os.path.splitext(args.json)[0]}_logs"
    os.makedirs(log_dir, exist_ok=True)
    rows = []
    for size, batch_size in attempts:
        parameters = parameter_count(size)
        row = {"configuration": name, "model": size, "parameters": parameters, "gpus": 1,
               "batch_size_per_gpu": batch_size, "images_per_second": None, "step_ms": None,
               "model_tflops_per_second": None, "mfu": None,
               "peak_gib": None, "resident_gib": None, "peak_host_gib": None, "vs_eager_reference": None}
        too_large = memory_needed(name, parameters, args.max_gpu_memory_gib)
        if too_large:
            rows.append({**row, "result": too_large})
        else:
            log_path = os.path.join(log_dir, file_name(f"{name}_{size}_b{batch_size}.log"))
            rows.append(run_alone(name, size, batch_size, args, row, log_path))
        print(f"{name} ViT-{size} batch {batch_size}: {rows[-1]['result']}"
              + (f", {rows[-1]['images_per_second']:.1f} images/s" if rows[-1]["images_per_second"] else ""),
              flush=True)
        if stop(rows[-1]):
            break
    return rows


def find_largest(args):
    """Each configuration at each size from the largest down, at the one batch size, until one trains."""
    sizes = sorted(args.model_sizes, key=parameter_count, reverse=True)
    return [row for name in installed(args.configurations)
            for row in each_alone(name, [(size, args.batch_sizes[0]) for size in sizes], args,
                                  stop=lambda row: row["images_per_second"])]


def find_fastest(args):
    """Each configuration at each size at the batch sizes from the smallest up, until one does not train."""
    return [row for name in installed(args.configurations) for size in args.model_sizes
            for row in each_alone(name, [(size, batch_size) for batch_size in sorted(args.batch_sizes)], args,
                                  stop=lambda row: not row["images_per_second"])]


def run_alone(name, size, batch_size, args, row, log_path):
    """One configuration at one size and batch size in a child process; its row, or `row` with why it did not
    train."""
    with tempfile.NamedTemporaryFile(suffix=".json") as table, open(log_path, "w") as log:
        command = [sys.executable, "-m", "benchmarks.step_benchmark", "--configurations", name, "--model_sizes", size,
                   "--batch_sizes", str(batch_size), "--steps", str(args.steps),
                   "--warmup_steps", str(args.warmup_steps), "--json", table.name]
        command += ["--grad_checkpoint"] * args.grad_checkpoint
        command += ["--max_gpu_memory_gib", str(args.max_gpu_memory_gib)] * bool(args.max_gpu_memory_gib)
        command += ["--profile", args.profile] * bool(args.profile)
        try:
            # a rendezvous port of its own: another run on this machine may hold the default one
            child = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_per_size,
                                   env={**os.environ, "MASTER_PORT": str(free_port())})
        except subprocess.TimeoutExpired:
            return {**row, "result": f"stopped: still running after {args.timeout_per_size:g} s"}
        if child.returncode == 0:
            return json.load(table)["rows"][0]
    if child.returncode < 0:
        return {**row, "result": f"killed by signal {-child.returncode}"
                                 + " (host out of memory)" * (child.returncode == -9)}
    with open(log_path) as log:
        lines = log.read().strip().splitlines() or [""]
    reason = next((line for line in reversed(lines) if re.search(r"(\w+Error|^error): ", line)), lines[-1])
    return {**row, "result": f"failed: {reason[:200]}"}


def in_millions_or_billions(count):
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def summary(rows):
    """The largest model each configuration trains, and how the fastest Colossal-AI configuration compares with
    DeepSpeed ZeRO-2-Offload at each size both train."""
    lines = []
    largest = {}
    for row in rows:
        if row["images_per_second"] and row["parameters"] > largest.get(row["configuration"], (0,))[0]:
            largest[row["configuration"]] = (row["parameters"], row["model"])
    for name, (parameters, size) in largest.items():
        lines.append(f"- {name}: largest ViT-{size} ({in_millions_or_billions(parameters)} parameters)")
    colossalai_largest = max((largest[name] for name in largest if is_colossalai(name)), default=None)
    for reference in ("torch",) + PEERS:
        if colossalai_largest and reference in largest:
            lines.append(f"- largest Colossal-AI model against {reference}'s: "
                         f"{colossalai_largest[0] / largest[reference][0]:.2f}x")
    peer_rates = {row["model"]: row["images_per_second"] for row in rows
                  if row["configuration"] == "deepspeed_zero2_offload" and row["images_per_second"]}  # bf16
    for size, peer_rate in peer_rates.items():
        fastest = max((row for row in rows if row["model"] == size and is_colossalai(row["configuration"])
                       and row["images_per_second"]), key=lambda row: row["images_per_second"], default=None)
        if fastest:
            lines.append(f"- ViT-{size}: fastest Colossal-AI configuration {fastest['configuration']} "
                         f"{fastest['images_per_second']:.1f} images/s, {fastest['images_per_second'] / peer_rate:.2f}x "
                         f"deepspeed_zero2_offload's {peer_rate:.1f}")
    return lines


def fastest_summary(rows):
    """Each configuration's fastest batch at each size (against its smallest batch), and at each size the fastest
    Colossal-AI setting (configuration and batch), against the fastest DeepSpeed one at its own best batch where
    one ran."""
    fastest = {}  # (configuration, size): the fastest row
    smallest = {}  # (configuration, size): the row of the smallest batch that trained
    for row in rows:
        if row["images_per_second"]:
            key = (row["configuration"], row["model"])
            if row["images_per_second"] > fastest.get(key, {"images_per_second": 0})["images_per_second"]:
                fastest[key] = row
            smallest.setdefault(key, row)
    lines = []
    for (name, size), row in fastest.items():
        mfu = f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        first = smallest[name, size]
        speedup = row["images_per_second"] / first["images_per_second"]
        lines.append(f"- {name} ViT-{size}: fastest at batch {row['batch_size_per_gpu']}, "
                     f"{row['images_per_second']:.1f} images/s{mfu}; {speedup:.2f}x its rate at batch "
                     f"{first['batch_size_per_gpu']}")
    for size in dict.fromkeys(size for _, size in fastest):
        ours, theirs = (max((row for (name, model), row in fastest.items() if model == size and kind(name)),
                            key=lambda row: row["images_per_second"], default=None)
                        for kind in (is_colossalai, lambda name: parse_configuration(name).setup in PEERS))
        if ours:
            peer = (f", {ours['images_per_second'] / theirs['images_per_second']:.2f}x the fastest DeepSpeed, "
                    f"{theirs['configuration']} at batch {theirs['batch_size_per_gpu']} "
                    f"({theirs['images_per_second']:.1f} images/s)" if theirs else "")
            lines.append(f"- ViT-{size}: fastest Colossal-AI setting {ours['configuration']} at batch "
                         f"{ours['batch_size_per_gpu']}, {ours['images_per_second']:.1f} images/s{peer}")
    return lines


def main():
    args = parse_args()
    if args.largest or args.fastest:
        if args.largest and args.fastest:
            sys.exit("error: choose --largest (the largest model) or --fastest (each one's fastest batch), not both")
        if args.largest and len(args.batch_sizes) > 1:
            sys.exit("error: --largest times one batch size; pass one to --batch_sizes")
        rows, device_name, world_size = (find_largest if args.largest else find_fastest)(args), None, 1
        if torch.cuda.is_available():
            device_name = torch.cuda.get_device_name()
    else:
        rows, device_name, world_size = time_configurations(args)
        if rows is None:
            return
    device_name = device_name or "cpu"
    cap = f", GPU memory capped at {args.max_gpu_memory_gib:g} GiB" if args.max_gpu_memory_gib else ""
    print(f"\n{device_name} x {world_size}{cap}, torch {torch.__version__}, colossalai {colossalai.__version__}, "
          f"{args.steps} steps after {args.warmup_steps} warm-up"
          f"{', gradient checkpointing' if args.grad_checkpoint else ''}\n")
    print("| configuration | ViT | parameters | GPUs | batch per GPU | result | images/s | step ms | model TFLOP/s per "
          "GPU | MFU | peak GPU GiB | GPU GiB between steps | peak host GiB | vs eager reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['configuration']} | {row['model']} | {in_millions_or_billions(row['parameters'])} | {row['gpus']} | "
              f"{row['batch_size_per_gpu']} | {row['result']} | " +
              " | ".join(f"{row[key]:{form}}" if row[key] is not None else "-" for key, form in
                         (("images_per_second", ".1f"), ("step_ms", ".1f"), ("model_tflops_per_second", ".1f"),
                          ("mfu", ".1%"), ("peak_gib", ".2f"), ("resident_gib", ".2f"), ("peak_host_gib", ".2f"),
                          ("vs_eager_reference", ".2f"))) + " |")
    lines = fastest_summary(rows) if args.fastest else summary(rows)
    if args.largest or args.fastest:
        print("\n" + "\n".join(lines))
    with open(args.json, "w") as file:
        json.dump({"model_sizes": args.model_sizes, "device": device_name, "gpus": world_size,
                   "max_gpu_memory_gib": args.max_gpu_memory_gib, "grad_checkpoint": args.grad_checkpoint,
                   "torch": torch.__version__, "colossalai": colossalai.__version__,
                   "date": datetime.date.today().isoformat(), "steps": args.steps,
                   "warmup_steps": args.warmup_steps, "rows": rows, "summary": lines}, file, indent=2)


if __name__ == "__main__":
    main()
