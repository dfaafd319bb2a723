"""The processes and the devices they train on: the process group, GPU memory caps and peaks, and running out of
GPU memory said in one line."""
import contextlib
import os
import resource

import torch
import torch.distributed as dist

from errors import RunError
from plugins import plugins_that

def init_distributed(seed, max_gpu_memory_gib=None, verbose=False):
    """What colossalai.launch_from_torch does, with this process's GPU named to the process group up front (NCCL
    otherwise guesses it at the first barrier, with a warning), and its memory capped if asked. A process started
    without a launcher (plain `python vit_train_demo.py`) is the only one: its process group keeps its store in
    memory, taking no port that another job on the machine may hold. Returns the training device."""
    import transformers
    from colossalai.accelerator import get_accelerator
    from colossalai.logging import get_dist_logger
    from colossalai.utils import set_seed

    launched = "RANK" in os.environ
    if not launched:  # the variables a launcher sets, which the libraries read
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    accelerator = get_accelerator()
    if accelerator.support_set_device:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    device = accelerator.get_current_device()
    alone = {} if launched else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    dist.init_process_group(accelerator.communication_backend, device_id=device if device.type == "cuda" else None,
                            **alone)
    set_seed(seed)
    if max_gpu_memory_gib:  # to share a GPU, or rehearse a smaller one
        cap_gpu_memory(max_gpu_memory_gib, device)
    if not verbose:  # what is left of the libraries' logging: warnings that ask the user for something
        transformers.logging.set_verbosity_error()
        get_dist_logger().set_level("WARNING")
    return device


def processes_on_node():
    """How many of the job's processes share this machine (the launcher's LOCAL_WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def available_host_bytes():
    """Host memory that new allocations can take without swapping (the kernel's MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        return 1024 * next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))


def cap_gpu_memory(gib, device):
    """Makes allocating more than `gib` GiB on `device` in this process raise torch.OutOfMemoryError."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)


def peak_memory(device):
    """The most memory this process has held, on the host (resident) and on the GPU (allocated tensors)."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_gpu_gib": gpu}


@contextlib.contextmanager
def out_of_memory_named(model_name, parameters, batch_size, settings, grad_checkpoint, max_gpu_memory_gib):
    """Running out of GPU memory stops the run with one line naming the limit, the model size and what to try for
    training as `settings` (plugins.PluginSettings) say. Yields a dict in which the run sets
    "cached_images_gib" once it has cached its images on the GPU, which streaming them would free."""
    gpu_use = {"cached_images_gib": 0.0}
    try:
        yield gpu_use
    except torch.OutOfMemoryError:
        limit = (f"the --max_gpu_memory_gib {max_gpu_memory_gib:g} cap" if max_gpu_memory_gib
                 else "the GPU's memory")
        if settings.lora_rank:  # LoRA's frozen weights have no optimizer state to offload; they can be 4-bit
            less_memory = None if settings.lora_quantize else "--lora_quantize (frozen weights in 4 bits)"
        elif settings.offload_fraction < 1:
            less_memory = f"a higher --offload_fraction than {settings.offload_fraction:g}"
        elif more_offload := {"none": "optimizer", "optimizer": "all", "all": None}[settings.offload]:
            able = ", ".join(plugins_that(lambda plugin: more_offload in plugin.offloads))
            less_memory = f"--offload {more_offload} ({able})"
        else:
            less_memory = None
        stream = f"--data_mode stream (freeing the {gpu_use['cached_images_gib']:.2f} GiB of images cached on the GPU)"
        remedies = ([less_memory] * bool(less_memory) + [stream] * bool(gpu_use["cached_images_gib"]) +
                    ["--grad_checkpoint"] * (not grad_checkpoint) + ["a smaller --batch_size"] +
                    ["a higher cap"] * bool(max_gpu_memory_gib))
        how = "".join([f" --offload {settings.offload}"] * (settings.offload != "none") +
                      [f" and LoRA of rank {settings.lora_rank}"] * bool(settings.lora_rank) +
                      [" over 4-bit weights"] * settings.lora_quantize)
        tries = f"{', '.join(remedies[:-1])} or {remedies[-1]}" if len(remedies) > 1 else remedies[0]
        raise RunError(f"out of GPU memory under {limit}, training {model_name} ({parameters / 1e6:.1f}M "
                       f"parameters) at --batch_size {batch_size} with {settings.plugin}{how}; try {tries}") from None


def sum_over_ranks(values, device):
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def copied_to_host(loss):
    """A step's loss on its way to the host, and the CUDA event that marks the copy's place among the queued work
    (None on the CPU, or on a pipeline stage without the loss)."""
    if loss is None or loss.device.type != "cuda":
        return loss, None
    on_host = loss.detach().to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return on_host, copied
