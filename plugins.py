"""The Colossal-AI plugins this example trains with: what each can do, and how each is built, in one table.

`PLUGINS` is read by the flag checks (args.py), the training script, the checkpoint code and the step benchmark.
Adding a plugin is a row here (and a line in the docs). Colossal-AI is imported inside the functions that use it:
args.py reads the table before anything heavy loads, and the training script loads Colossal-AI first through
startup.import_libraries.
"""
import contextlib
import io
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from errors import RunError

# the README's install step: builds Colossal-AI's Adam kernels (HybridAdam's CPU Adam, FusedAdam's) once
BUILD_KERNELS = ("from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader; "
                 "CPUAdamLoader().load(); FusedOptimizerLoader().load()")
OFFLOADS = ("none", "optimizer", "all")
PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class PluginSettings:
    """How a run asks its plugin to train (the flags of the same names)."""
    plugin: str
    precision: str
    offload: str = "none"
    offload_fraction: float = 1.0
    tp_size: int = 1
    pp_size: int = 1
    microbatch_size: int | None = None
    gradient_accumulation_steps: int = 1
    lora_rank: int = 0
    lora_quantize: bool = False


def build_torch_ddp(settings):  # gradients kept in DDP's buckets, not copied out each step
    from colossalai.booster.plugin import TorchDDPPlugin
    return TorchDDPPlugin(gradient_as_bucket_view=True)


def build_low_level_zero(settings):  # alone on one GPU there is nothing to overlap, and trying costs 8-17%
    from colossalai.booster.plugin import LowLevelZeroPlugin
    return LowLevelZeroPlugin(precision=settings.precision, initial_scale=2**5, cpu_offload=settings.offload != "none",
                              overlap_communication=dist.get_world_size() > 1)


def build_gemini(settings):
    from colossalai.booster.plugin import GeminiPlugin
    # shares of the fp32 weights and Adam states, and of the 16-bit weights, that gemini keeps on the host
    optimizer_share, weight_share = {"none": (0.0, 0.0), "optimizer": (settings.offload_fraction, 0.0),
                                     "all": (1.0, settings.offload_fraction)}[settings.offload]
    # pinned host memory is what gemini's asynchronous gradient reduction uses anyway (it warns if not asked)
    return GeminiPlugin(precision=settings.precision, initial_scale=2**5, pin_memory=True, placement_policy="static",
                        offload_optim_frac=optimizer_share, offload_param_frac=weight_share,
                        enable_gradient_accumulation=settings.gradient_accumulation_steps > 1)


def build_hybrid_parallel(settings):
    from colossalai.booster.plugin import HybridParallelPlugin
    offload = settings.offload != "none"
    # not enable_all_optimization: its JIT-fused ViT MLP computes GELU's tanh approximation where the model (and
    # so the saved one, as served) has the exact GELU, and TorchScript fuses it only from a process's third call,
    # so a resumed run's steps round differently from the uninterrupted run's
    return HybridParallelPlugin(tp_size=settings.tp_size, pp_size=settings.pp_size,
                                microbatch_size=settings.microbatch_size, enable_flash_attention=True,
                                precision=settings.precision, initial_scale=1, zero_stage=int(offload),
                                cpu_offload=offload)


@dataclass(frozen=True)
class Plugin:
    """What a plugin can do, and how it is built."""
    build: Callable[[PluginSettings], object]
    precisions: tuple = PRECISIONS  # on a GPU the first is the default (without offload)
    offloads: tuple = ("none",)  # what it can keep in host memory: optimizer (fp32 weights, Adam states), all
    offload_precisions: tuple = PRECISIONS  # precisions it can offload in
    offload_fraction: bool = False  # can keep a share of what it offloads on the GPU (--offload_fraction)
    model_parallel: bool = False  # tensor and pipeline parallel (--tp_size, --pp_size)
    on_cpu: bool = False  # trains without a GPU
    lora: bool = False  # trains LoRA adapters (Colossal-AI's booster.enable_lora; not with tensor parallelism)
    # trains them over 4-bit weights (QLoRA), which the plugins that cast the model to their precision would unpack
    qlora: bool = False
    autocast: bool = False  # trains in 16 bits through torch.autocast (bf16) or torch AMP (fp16), not by itself
    colossalai_adam_only: bool = False  # takes only Colossal-AI's own Adam kernels
    variant_of: str | None = None  # the plugin it is, in its one precision
    # Colossal-AI 0.5.0's checkpoint IO rebuilds the fp32 master weights from the saved 16-bit model
    # (update_master_params, after load_model), losing what 16 bits round off: the example saves them itself
    master_weights_rebuilt_from_model: bool = False


PLUGINS = {
    "torch_ddp": Plugin(build_torch_ddp, on_cpu=True, lora=True, qlora=True, autocast=True),
    "torch_ddp_fp16": Plugin(build_torch_ddp, precisions=("fp16",), lora=True, autocast=True, variant_of="torch_ddp"),
    "low_level_zero": Plugin(build_low_level_zero, offloads=("none", "optimizer"), lora=True,
                             master_weights_rebuilt_from_model=True),
    "gemini": Plugin(build_gemini, precisions=("bf16", "fp16"), offloads=OFFLOADS, offload_fraction=True,
                     colossalai_adam_only=True),
    "hybrid_parallel": Plugin(build_hybrid_parallel, offloads=("none", "optimizer"), lora=True,
                              offload_precisions=("bf16", "fp16"), model_parallel=True,
                              master_weights_rebuilt_from_model=True),
}


def plugins_that(capability):
    """The names of the plugins that have `capability` (a function of a Plugin)."""
    return [name for name, plugin in PLUGINS.items() if capability(plugin)]


def able(capability):
    return " or ".join(plugins_that(capability))


def settings_error(settings, on_gpu):
    """Why `settings` cannot train here, in one line naming the fix, or None (the precision already chosen)."""
    name, plugin = settings.plugin, PLUGINS[settings.plugin]
    if not plugin.on_cpu and not on_gpu:
        return (f"--plugin {name} needs a CUDA GPU and none is available; on the CPU use --plugin "
                f"{able(lambda plugin: plugin.on_cpu)}")
    if settings.offload not in plugin.offloads:
        partial = [other for other, spec in PLUGINS.items()
                   if settings.offload not in spec.offloads and len(spec.offloads) > 1]
        return (f"--plugin {name} cannot --offload {settings.offload}; use --plugin "
                f"{able(lambda plugin: settings.offload in plugin.offloads)}" +
                (f" ({' and '.join(partial)} offload only the optimizer)" if settings.offload == "all" else ""))
    if settings.lora_rank and (not plugin.lora or settings.tp_size > 1):
        return (f"--lora_rank {settings.lora_rank} needs --plugin {able(lambda plugin: plugin.lora)} (Colossal-AI "
                f"0.5.0 trains LoRA adapters with those, without tensor parallelism); got --plugin {name}" +
                (f" --tp_size {settings.tp_size}" if settings.tp_size > 1 else ""))
    if settings.lora_quantize and not plugin.qlora:
        return (f"--lora_quantize needs --plugin {able(lambda plugin: plugin.qlora)} (the others cast the model to "
                f"their training precision, which would unpack its 4-bit weights); got --plugin {name}")
    if settings.offload_fraction != 1 and (not plugin.offload_fraction or settings.offload == "none"):
        splitting = able(lambda plugin: plugin.offload_fraction)
        return (f"--offload_fraction {settings.offload_fraction:g} splits what {splitting} offloads; it needs "
                f"--plugin {splitting} with --offload optimizer or all")
    return None


def model_parallel_error(settings):
    """Why the plugin cannot split the model as `settings` asks, or None."""
    if not PLUGINS[settings.plugin].model_parallel and settings.tp_size * settings.pp_size > 1:
        return (f"--tp_size {settings.tp_size} --pp_size {settings.pp_size} need --plugin "
                f"{able(lambda plugin: plugin.model_parallel)} (got --plugin {settings.plugin})")
    return None


def precision_error(settings, on_gpu):
    """Why the plugin cannot train in `settings.precision` here, or None."""
    name, plugin, precision = settings.plugin, PLUGINS[settings.plugin], settings.precision
    if precision not in plugin.precisions:
        return (f"--plugin {name} trains in {precision_list(plugin.precisions)}, not --precision {precision}" +
                (f"; use --plugin {plugin.variant_of} --precision {precision}" if plugin.variant_of else ""))
    if settings.offload != "none" and precision not in plugin.offload_precisions:
        return (f"--plugin {name} offloads through ZeRO, which trains in {precision_list(plugin.offload_precisions)}, "
                f"not --precision {precision}")
    if precision != "fp32" and not on_gpu:
        return f"--precision {precision} needs a CUDA GPU and none is available; on the CPU use --precision fp32"
    return None


def precision_list(precisions):
    return " or ".join(precisions)


def default_precision(plugin, offload, on_gpu):
    """fp32 on the CPU; fp16 with offload (Colossal-AI's CPU Adam kernel reads fp32 and fp16 gradients, bf16 ones
    through a far slower PyTorch fallback: benchmarks/results, largest model); else the plugin's first."""
    if not on_gpu:
        return "fp32"
    return "fp16" if offload != "none" else PLUGINS[plugin].precisions[0]


def autocast_dtype(settings):
    """The 16-bit dtype the plugin computes in through torch.autocast (bf16) or torch AMP (fp16), or None (fp32, or
    a plugin that casts the model itself)."""
    if PLUGINS[settings.plugin].autocast and settings.precision != "fp32":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[settings.precision]
    return None


def build_booster(model, settings, device):
    """The plugin `settings` names and the booster that trains `model` with it."""
    from colossalai.booster import Booster
    plugin = PLUGINS[settings.plugin]
    if autocast_dtype(settings) == torch.bfloat16:  # torch AMP (fp16) is the booster's mixed_precision below
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    built = plugin.build(settings)
    torch_amp = autocast_dtype(settings) == torch.float16
    return built, Booster(plugin=built, mixed_precision="fp16" if torch_amp else None)


def build_optimizer(model, settings, learning_rate, weight_decay, verbose=False):
    """AdamW: Colossal-AI's HybridAdam where weights live on the host (Adam on the CPU for those, fused on the GPU
    for the rest), its FusedAdam on a plugin that takes only Colossal-AI's Adam, PyTorch's fused one elsewhere."""
    offload = settings.offload != "none"
    trained = [parameter for parameter in model.parameters() if parameter.requires_grad]  # not what LoRA freezes
    if not offload and not PLUGINS[settings.plugin].colossalai_adam_only:
        return torch.optim.AdamW(trained, lr=learning_rate, weight_decay=weight_decay, fused=torch.cuda.is_available())
    from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader
    from colossalai.nn.optimizer import FusedAdam, HybridAdam
    unbuilt = [name for loader in [FusedOptimizerLoader] + [CPUAdamLoader] * offload
               for name in unbuilt_kernels(loader)]
    if unbuilt:
        raise RunError(f"Colossal-AI's {' and '.join(unbuilt)} kernel{'s are' if len(unbuilt) > 1 else ' is'} not "
                       f"built; build {'them' if len(unbuilt) > 1 else 'it'} once before training (a minute or two): "
                       f"python3 -c \"{BUILD_KERNELS}\"")
    # Colossal-AI prints two lines whenever it loads a kernel
    with contextlib.redirect_stdout(io.StringIO()) as kernel_log:
        optimizer = (HybridAdam if offload else FusedAdam)(trained, lr=learning_rate, weight_decay=weight_decay,
                                                           adamw_mode=True)
    if verbose:
        print(kernel_log.getvalue(), end="")
    return optimizer


def unbuilt_kernels(loader):
    """The kernels of a Colossal-AI kernel loader that are neither installed pre-built nor built (just in time)
    before: loading them would compile them, in every process, for a minute or two."""
    from colossalai.kernel.extensions.base_extension import _Extension
    built_folder = _Extension.get_jit_extension_folder_path()
    unbuilt = []
    for extension in (extension_class() for extension_class in loader.REGISTRY):
        if not extension.is_available() or os.path.exists(os.path.join(built_folder, f"{extension.name}.so")):
            continue
        try:
            extension.import_op()
        except ImportError:
            unbuilt.append(extension.name)
    return unbuilt


class Topology:
    """Where this rank sits: its data-parallel rank, and whether it holds the model's outputs."""

    def __init__(self, plugin):
        from colossalai.booster.plugin import HybridParallelPlugin
        self.pipeline = isinstance(plugin, HybridParallelPlugin) and plugin.pp_size > 1
        if isinstance(plugin, HybridParallelPlugin):
            self.dp_rank, self.dp_size = dist.get_rank(plugin.dp_group), plugin.dp_size
            last_stage = not self.pipeline or plugin.stage_manager.is_last_stage()
            self.holds_output = dist.get_rank(plugin.tp_group) == 0 and last_stage
        else:
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            self.holds_output = True
        self.reports = self.holds_output and self.dp_rank == 0


@dataclass
class Boosted:
    """What the booster returned and every training or evaluation step needs."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    booster: object
    topology: Topology


def gradient_sync(boosted, syncs):
    """The context of a backward pass that is not an optimizer step's last (`syncs` False): without the reduction
    of gradients across data-parallel ranks where the plugin can skip it, so that they are reduced once a step
    (gemini cannot: it reduces them with every batch and adds them up itself)."""
    if syncs or not boosted.booster.plugin.support_no_sync():
        return contextlib.nullcontext()
    return boosted.booster.no_sync(boosted.model, boosted.optimizer)


def forward_backward(boosted, batch, criterion, backward):
    """Runs one batch forward (and backward if `backward`), through the pipeline schedule where there is one;
    returns loss and logits, or None, None on a pipeline stage that does not hold the outputs."""
    optimizer = boosted.optimizer if backward else None
    if boosted.topology.pipeline:
        result = boosted.booster.execute_pipeline(iter([batch]), boosted.model, criterion, optimizer,
                                                  return_loss=True, return_outputs=True)
        if not boosted.topology.holds_output:
            return None, None
        return result["loss"], result["outputs"]["logits"]
    outputs = boosted.model(pixel_values=batch["pixel_values"])
    loss = criterion(outputs, batch)
    if backward:
        boosted.booster.backward(loss, optimizer)
    return loss, outputs.logits
