"""Fine-tunes a pretrained ViT through a Colossal-AI Booster, evaluates it on every image, and saves it.

Launch with `colossalai run --nproc_per_node N vit_train_demo.py ...` or `torchrun --nproc_per_node N ...`.
"""
import argparse
import collections
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import resource
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

PROCESS_START = time.perf_counter()  # taken before the heavy imports below, so that the setup time includes them
if importlib.util.find_spec("colossalai") is None:  # said in one line, not in an ImportError's traceback below
    sys.exit("error: colossalai is not installed: run 'pip install -r requirements.txt' first")
VERBOSE = "--verbose" in sys.argv  # read before the imports below, whose warnings it decides on
# warnings of the libraries below about optional extras this example does not use (async checkpoint saving with
# TensorNVMe, apex's fused RMSNorm) or about their own use of deprecated PyTorch APIs
LIBRARY_NOISE = ("Please install the latest tensornvme", "Please install apex from source",
                 ".*but apex is not installed", "TypedStorage is deprecated",
                 r".*torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated")
if not VERBOSE:
    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message)

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from tqdm import tqdm

# transformers imports scikit-learn, where it is installed, for assisted text generation, which a classifier never
# does: 1.7 s of every start on the GPU machine (BENCHMARKS.md, end to end)
transformers.utils.import_utils._sklearn_available = False
from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

# bitsandbytes, which Colossal-AI imports for quantised training that this example does not do, wraps some of its
# kernels in torch.compile as it loads, which imports PyTorch's inductor: seconds of every start. With dynamo off
# while Colossal-AI loads, those wrappers stay plain functions; the setting is restored before anything runs.
DYNAMO_SETTING = os.environ.get("TORCHDYNAMO_DISABLE")
os.environ["TORCHDYNAMO_DISABLE"] = "1"
from colossalai.accelerator import get_accelerator
from colossalai.booster import Booster
from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin
from colossalai.logging import get_dist_logger
from colossalai.nn.lr_scheduler import CosineAnnealingWarmupLR
from colossalai.kernel.extensions.base_extension import _Extension
from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader
from colossalai.nn.optimizer import FusedAdam, HybridAdam
from colossalai.utils import set_seed
if DYNAMO_SETTING is None:
    del os.environ["TORCHDYNAMO_DISABLE"]
else:
    os.environ["TORCHDYNAMO_DISABLE"] = DYNAMO_SETTING

import checkpoint
from args import layout_error, parse_demo_args
from data import (RunError, device_images, epoch_batches, evaluation_batches, label_names, limit_samples,
                  load_splits, random_resized_crop_and_flip)

# the README's install step: builds Colossal-AI's Adam kernels (HybridAdam's CPU Adam, FusedAdam's) once
BUILD_KERNELS = ("from colossalai.kernel.kernel_loader import CPUAdamLoader, FusedOptimizerLoader; "
                 "CPUAdamLoader().load(); FusedOptimizerLoader().load()")
LOSS_READ_LAG = 2  # steps the host may queue ahead of the GPU before it waits for a step's loss
SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "29500"}


def build_plugin(args):
    """The plugin in `args.precision`, offloading what `args.offload` names to the host through its own mechanism."""
    offload = args.offload != "none"
    if args.plugin in ("torch_ddp", "torch_ddp_fp16"):  # gradients kept in DDP's buckets, not copied out each step
        return TorchDDPPlugin(gradient_as_bucket_view=True)
    if args.plugin == "low_level_zero":  # alone on one GPU there is nothing to overlap, and trying costs 8-17%
        return LowLevelZeroPlugin(precision=args.precision, initial_scale=2**5, cpu_offload=offload,
                                  overlap_communication=dist.get_world_size() > 1)
    if args.plugin == "gemini":
        # shares of the fp32 weights and Adam states, and of the 16-bit weights, that gemini keeps on the host
        optimizer_share, weight_share = {"none": (0.0, 0.0), "optimizer": (args.offload_fraction, 0.0),
                                         "all": (1.0, args.offload_fraction)}[args.offload]
        # pinned host memory is what gemini's asynchronous gradient reduction uses anyway (it warns if not asked)
        return GeminiPlugin(precision=args.precision, initial_scale=2**5, pin_memory=True, placement_policy="static",
                            offload_optim_frac=optimizer_share, offload_param_frac=weight_share)
    return HybridParallelPlugin(tp_size=args.tp_size, pp_size=args.pp_size, microbatch_size=args.microbatch_size,
                                enable_all_optimization=True, precision=args.precision, initial_scale=1,
                                zero_stage=int(offload), cpu_offload=offload)


def build_booster(model, args, device):
    """The plugin and booster that train `model` in args.precision."""
    if args.plugin == "torch_ddp" and args.precision == "bf16":  # the other plugins cast the model themselves
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    plugin = build_plugin(args)
    torch_amp = args.plugin.startswith("torch_ddp") and args.precision == "fp16"
    return plugin, Booster(plugin=plugin, mixed_precision="fp16" if torch_amp else None)


def build_optimizer(model, args):
    """AdamW: Colossal-AI's HybridAdam where weights live on the host (Adam on the CPU for those, fused on the GPU
    for the rest), its FusedAdam on gemini (which takes only its own Adam kernels), PyTorch's fused one elsewhere."""
    if args.plugin != "gemini" and args.offload == "none":
        return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                 fused=torch.cuda.is_available())
    kernels = [FusedOptimizerLoader] + [CPUAdamLoader] * (args.offload != "none")
    unbuilt = [name for loader in kernels for name in unbuilt_kernels(loader)]
    if unbuilt:
        raise RunError(f"Colossal-AI's {' and '.join(unbuilt)} kernel{'s are' if len(unbuilt) > 1 else ' is'} not "
                       f"built; build {'them' if len(unbuilt) > 1 else 'it'} once before training (a minute or two): "
                       f"python3 -c \"{BUILD_KERNELS}\"")
    optimizer_class = FusedAdam if args.offload == "none" else HybridAdam
    # Colossal-AI prints two lines whenever it loads a kernel
    with contextlib.redirect_stdout(io.StringIO()) as kernel_log:
        optimizer = optimizer_class(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                    adamw_mode=True)
    if args.verbose:
        print(kernel_log.getvalue(), end="")
    return optimizer


def unbuilt_kernels(loader):
    """The kernels of a Colossal-AI kernel loader that are neither installed pre-built nor built (just in time)
    before: loading them would compile them, in every process, for a minute or two."""
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


def load_model(args, names):
    """The image processor, and the model with a new classification head for `names`. A --tp_size or --pp_size the
    model cannot be split into is refused from its config, before the weights are read."""
    try:
        config = ViTConfig.from_pretrained(args.model_name_or_path, num_labels=len(names),
                                           id2label=dict(enumerate(names)),
                                           label2id={name: i for i, name in enumerate(names)})
        if error := layout_error(args, config):
            raise RunError(error)
        image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, use_fast=True)
        model = ViTForImageClassification.from_pretrained(args.model_name_or_path, config=config,
                                                          ignore_mismatched_sizes=True, attn_implementation="sdpa")
    except OSError as error:
        first_line = str(error).splitlines()[0]
        raise RunError(f"cannot load model '{args.model_name_or_path}' ({first_line}); "
                        "offline, pass a local copy: --model_name_or_path /path/to/model") from None
    return image_processor, model


class Topology:
    """Where this rank sits: its data-parallel rank, and whether it holds the model's outputs."""

    def __init__(self, plugin):
        self.pipeline = isinstance(plugin, HybridParallelPlugin) and plugin.pp_size > 1
        if isinstance(plugin, HybridParallelPlugin):
            self.dp_rank, self.dp_size = dist.get_rank(plugin.dp_group), plugin.dp_size
            last_stage = not self.pipeline or plugin.stage_manager.is_last_stage()
            self.holds_output = dist.get_rank(plugin.tp_group) == 0 and last_stage
        else:
            self.dp_rank, self.dp_size = dist.get_rank(), dist.get_world_size()
            self.holds_output = True
        self.reports = self.holds_output and self.dp_rank == 0


def forward_backward(boosted, batch, criterion, train):
    """Runs one batch forward (and backward when training); returns loss and logits, or None, None on a pipeline
    stage that does not hold the outputs."""
    optimizer = boosted.optimizer if train else None
    if boosted.topology.pipeline:
        result = boosted.booster.execute_pipeline(iter([batch]), boosted.model, criterion, optimizer,
                                                  return_loss=True, return_outputs=True)
        if not boosted.topology.holds_output:
            return None, None
        return result["loss"], result["outputs"]["logits"]
    outputs = boosted.model(pixel_values=batch["pixel_values"])
    loss = criterion(outputs, batch)
    if train:
        boosted.booster.backward(loss, optimizer)
    return loss, outputs.logits


def sum_over_ranks(values, device):
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


@dataclass
class Boosted:
    """What the booster returned and every training or evaluation step needs."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    booster: Booster
    topology: Topology


def train_batches(run, epoch, first_step=0):
    """The device batches of `epoch`'s training steps from `first_step` on, as a pass that starts decoding now."""
    args, topology = run.args, run.boosted.topology
    batches = epoch_batches(len(run.images["train"]), args.batch_size, topology.dp_rank, topology.dp_size, args.seed,
                            epoch)
    return run.images["train"].batches(batches[first_step:])


def train_epoch(run, criterion, remaining):
    """Trains on the batches of `remaining`, from step `run.progress["step_in_epoch"]` to the end of the epoch,
    updating `run.progress` as it goes.

    A step's loss is read (which waits for the GPU to finish the step) only once LOSS_READ_LAG more steps are
    queued, so the GPU does not idle while the CPU prepares the next step, even when a step takes the CPU about as
    long to queue as the GPU to run. It is read from a copy made in its step (`loss.item()` would be queued behind
    the steps after it and wait for them all)."""
    boosted, args, progress, writer = run.boosted, run.args, run.progress, run.writer
    topology = boosted.topology
    boosted.model.train()
    # the training time leaves out the checkpoints written meanwhile
    clock = {"start": time.perf_counter(), "seconds_before": progress["train_seconds"],
             "checkpoint_seconds_before": run.checkpoint_seconds}
    unread = collections.deque()  # (loss, its copy's event, step, learning rate) of the steps not read yet

    def read(loss, copied, step, learning_rate):
        """Waits for step `step`'s loss, checks it and reports it."""
        if copied is not None:
            copied.synchronize()
        loss_value = loss.item() if topology.holds_output else 0.0
        if not math.isfinite(loss_value):
            raise RunError(f"training loss is {loss_value} at step {step} (epoch {progress['epoch'] + 1}); lower "
                           "--learning_rate or check the data")
        progress["epoch_loss_sum"] += loss_value
        progress["train_seconds"] = (clock["seconds_before"] + time.perf_counter() - clock["start"]
                                     - (run.checkpoint_seconds - clock["checkpoint_seconds_before"]))
        images_per_second = progress["images_trained"] / progress["train_seconds"]
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", img_per_s=f"{images_per_second:.1f}")
        if writer:
            for tag, value in (("train/loss", loss_value), ("train/learning_rate", learning_rate),
                               ("train/images_per_second", images_per_second)):
                writer.add_scalar(tag, value, step)

    def read_until(left):
        """Reads the queued steps' losses, oldest first, until `left` are still queued."""
        while len(unread) > left:
            read(*unread.popleft())

    with tqdm(total=run.steps_per_epoch, initial=progress["step_in_epoch"], desc=f"epoch {progress['epoch'] + 1}",
              disable=not topology.reports, dynamic_ncols=True) as bar:
        while True:
            fetch_start = time.perf_counter()
            pixel_values, labels, _ = next(remaining, (None, None, None))
            if pixel_values is None:
                break
            progress["epoch_data_wait"] += time.perf_counter() - fetch_start
            batch = {"pixel_values": random_resized_crop_and_flip(pixel_values) if args.augment else pixel_values,
                     "labels": labels}
            loss, _ = forward_backward(boosted, batch, criterion, train=True)
            boosted.optimizer.step()
            boosted.optimizer.zero_grad()
            boosted.lr_scheduler.step()
            progress["step_in_epoch"] += 1
            progress["global_step"] += 1
            progress["images_trained"] += len(labels) * topology.dp_size
            unread.append((*copied_to_host(loss), progress["global_step"], boosted.lr_scheduler.get_last_lr()[0]))
            read_until(LOSS_READ_LAG)
            # the last step of an epoch is saved after the evaluation, with the epoch's results
            if (args.save_every and progress["global_step"] % args.save_every == 0
                    and progress["step_in_epoch"] < run.steps_per_epoch):
                read_until(0)
                run.save_checkpoint()
        read_until(0)


def copied_to_host(loss):
    """A step's loss on its way to the host, and the CUDA event that marks the copy's place among the queued work
    (None on the CPU, or on a pipeline stage without the loss)."""
    if loss is None or loss.device.type != "cuda":
        return loss, None
    on_host = loss.detach().to("cpu", non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return on_host, copied


@torch.no_grad()
def evaluate(boosted, images, device, batch_size, names):
    """Loss, accuracy, per-class precision/recall/F1 and the confusion matrix over every readable image of
    `images`, each counted exactly once across the data-parallel ranks."""
    topology = boosted.topology
    boosted.model.eval()
    batches = evaluation_batches(len(images), batch_size, topology.dp_rank, topology.dp_size,
                                 whole_batches=topology.pipeline)
    num_labels = len(names)
    confusion = torch.zeros(num_labels * num_labels, dtype=torch.float64, device=device)  # row: label, column: guess
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    last = len(images) - 1  # the padding positions past the end read copies of the last image, never counted
    index_batches = [[min(position, last) for position in positions] for positions in batches]
    for positions, (pixel_values, labels, readable) in zip(batches, images.batches(index_batches)):
        # positions rise, so the counted ones lead the batch: a slice, which the host need not wait for
        counted = int((torch.tensor(positions)[readable] <= last).sum())
        _, logits = forward_backward(boosted, {"pixel_values": pixel_values, "labels": labels}, plain_cross_entropy,
                                     train=False)
        if topology.holds_output:
            kept_labels, kept_logits = labels[:counted], logits[:counted].float()
            loss_sum += F.cross_entropy(kept_logits, kept_labels, reduction="sum")
            confusion += torch.bincount(kept_labels * num_labels + kept_logits.argmax(dim=-1),
                                        minlength=num_labels * num_labels)
    dist.all_reduce(confusion)
    dist.all_reduce(loss_sum)
    return classification_metrics(confusion.view(num_labels, num_labels).long().cpu(), loss_sum.item(), names)


def classification_metrics(confusion, loss_sum, names):
    count = confusion.sum().item()
    true_positives = confusion.diag().double()
    precision = true_positives / confusion.sum(dim=0).clamp(min=1)
    recall = true_positives / confusion.sum(dim=1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    per_class = {name: {"precision": precision[i].item(), "recall": recall[i].item(), "f1": f1[i].item(),
                        "support": int(confusion[i].sum())} for i, name in enumerate(names)}
    return {"loss": loss_sum / count, "accuracy": true_positives.sum().item() / count, "num_examples": int(count),
            "per_class": per_class, "confusion_matrix": confusion.tolist()}


def describe_run(args, splits, parameters, device):
    """The header line: what is trained, on what, how, and where it goes."""
    sizes = ", ".join(f"{len(splits[name])} {name}" for name in ("train", "validation", "test") if name in splits)
    processes = dist.get_world_size()
    microbatches = f" in microbatches of {args.microbatch_size}" if args.pp_size > 1 else ""
    layout = (f" (tensor parallel {args.tp_size}, pipeline parallel {args.pp_size}{microbatches})"
              if args.tp_size * args.pp_size > 1 else "")
    offload = (f", offloading the {'optimizer' if args.offload == 'optimizer' else 'weights and optimizer'} to the "
               f"host" + (f" ({args.offload_fraction:g} of it)" if args.offload_fraction < 1 else "")
               if args.offload != "none" else "")
    return (f"fine-tuning {args.model_name_or_path} ({parameters / 1e6:.1f}M parameters) on {args.dataset} ({sizes} "
            f"images) with {args.plugin} in {args.precision}{offload}, {processes} process{'es' * (processes > 1)} "
            f"on {device.type}{layout}; saving to {args.output_path}")


def parameter_count(model):
    return sum(parameter.numel() for parameter in model.parameters())


@contextlib.contextmanager
def out_of_memory_named(args, parameters):
    """Running out of GPU memory stops the run with one line naming the limit, the model size and what to try."""
    try:
        yield
    except torch.OutOfMemoryError:
        limit = (f"the --max_gpu_memory_gib {args.max_gpu_memory_gib:g} cap" if args.max_gpu_memory_gib
                 else "the GPU's memory")
        offload = {"none": "--offload optimizer (low_level_zero, gemini, hybrid_parallel)",
                   "optimizer": "--offload all (gemini)", "all": None}[args.offload]
        if args.offload_fraction < 1:
            offload = f"a higher --offload_fraction than {args.offload_fraction:g}"
        remedies = ([offload] * bool(offload) + ["--grad_checkpoint"] * (not args.grad_checkpoint) +
                    ["a smaller --batch_size"] + ["a higher cap"] * bool(args.max_gpu_memory_gib))
        raise RunError(f"out of GPU memory under {limit}, training {args.model_name_or_path} ({parameters / 1e6:.1f}M "
                       f"parameters) at --batch_size {args.batch_size} with {args.plugin}"
                       f"{f' --offload {args.offload}' if args.offload != 'none' else ''}; try "
                       f"{', '.join(remedies[:-1])} or {remedies[-1]}") from None


def peak_memory(device):
    """The most memory this process has held, on the host (resident) and on the GPU (allocated tensors)."""
    gpu = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_gpu_gib": gpu}


def plain_cross_entropy(outputs, inputs):
    return F.cross_entropy(outputs.logits.float(), inputs["labels"])


def cap_gpu_memory(gib, device):
    """Makes allocating more than `gib` GiB on `device` in this process raise torch.OutOfMemoryError."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total), device)


def init_distributed(args):
    """What colossalai.launch_from_torch does, with this process's GPU named to the process group up front (NCCL
    otherwise guesses it at the first barrier, with a warning), and its memory capped if asked. Returns the
    training device."""
    for name, value in SINGLE_PROCESS_ENV.items():  # so that plain `python vit_train_demo.py` runs too
        os.environ.setdefault(name, value)
    accelerator = get_accelerator()
    if accelerator.support_set_device:
        accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    device = accelerator.get_current_device()
    dist.init_process_group(accelerator.communication_backend, device_id=device if device.type == "cuda" else None)
    set_seed(args.seed)
    if args.max_gpu_memory_gib:  # to share a GPU, or rehearse a smaller one
        cap_gpu_memory(args.max_gpu_memory_gib, device)
    if not args.verbose:  # what is left of the libraries' logging: warnings that ask the user for something
        transformers.logging.set_verbosity_error()
        get_dist_logger().set_level("WARNING")
    return device


def check_output_path(args):
    try:
        os.makedirs(args.output_path, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create --output_path {args.output_path}: {error.strerror}") from None
    if not os.access(args.output_path, os.W_OK):
        raise RunError(f"--output_path {args.output_path} is not writable; pass a directory you can write to")


def boost(model, splits, image_processor, device, args, setup_ends):
    """Sets the booster up while the images decode (in loader worker processes; a background thread collects them).
    Returns what the booster made of the model, the device images of each split and the steps of an epoch."""
    plugin, booster = build_booster(model, args, device)
    topology = Topology(plugin)
    steps_per_epoch = math.ceil(len(splits["train"]) / topology.dp_size) // args.batch_size
    if steps_per_epoch == 0:  # said before any image is decoded
        raise RunError(f"--batch_size {args.batch_size} x {topology.dp_size} data-parallel ranks is larger "
                       f"than the {len(splits['train'])} training images; lower --batch_size")
    announce = print if dist.get_rank() == 0 else lambda line: None
    images, fill_caches = device_images(splits, image_processor, device, args, announce=announce)
    with ThreadPoolExecutor(max_workers=1) as background:
        decoding = background.submit(fill_caches)
        optimizer = build_optimizer(model, args)
        total_steps = steps_per_epoch * args.num_epoch
        lr_scheduler = CosineAnnealingWarmupLR(optimizer, total_steps=total_steps,
                                               warmup_steps=int(args.warmup_ratio * total_steps))
        model, optimizer, _, _, lr_scheduler = booster.boost(model, optimizer, lr_scheduler=lr_scheduler)
        setup_ends["booster"] = time.perf_counter()
        if topology.reports:  # the plots' and TensorBoard's libraries, used later, load while the images decode
            for module in ("report", "torch.utils.tensorboard"):
                importlib.import_module(module)
        decoding.result()
        setup_ends["images"] = time.perf_counter()
    return Boosted(model, optimizer, lr_scheduler, booster, topology), images, steps_per_epoch


@dataclass
class Run:
    """What training, evaluating and saving need, set up once by set_up."""
    args: argparse.Namespace
    device: torch.device
    parameters: int
    names: list
    image_processor: object
    boosted: Boosted
    images: dict  # the SplitImages of each split (data.py)
    steps_per_epoch: int
    progress: dict  # where training stands and what it has measured: what a checkpoint holds
    writer: object  # TensorBoard's SummaryWriter, on the reporting rank only (None elsewhere)
    setup_parts: dict  # seconds of each part of the set-up
    checkpoint_seconds: float = 0.0  # spent writing checkpoints in this process

    def save_checkpoint(self):
        if self.args.keep_checkpoints:
            start, boosted = time.perf_counter(), self.boosted
            checkpoint.save_checkpoint(boosted.booster, boosted.model, boosted.optimizer, boosted.lr_scheduler,
                                       self.progress, self.args.output_path, self.args.keep_checkpoints)
            self.checkpoint_seconds += time.perf_counter() - start


def set_up(args):
    """Everything before the first step: processes, data, model, booster, and the checkpoint to resume from."""
    setup_ends = {"imports": time.perf_counter()}  # when each part of the set-up ended
    device = init_distributed(args)
    setup_ends["distributed"] = time.perf_counter()
    is_master = dist.get_rank() == 0
    check_output_path(args)
    resume_from = args.resume_from and checkpoint.resolve_resume(args.resume_from, args.output_path)

    splits = load_splits(args.dataset, args.image_column, args.label_column)
    names = label_names(splits, args.dataset)
    splits = limit_samples(splits, args.max_train_samples, args.max_eval_samples, args.seed)
    setup_ends["dataset"] = time.perf_counter()
    image_processor, model = load_model(args, names)
    parameters = parameter_count(model)
    setup_ends["model"] = time.perf_counter()
    if is_master:
        print(describe_run(args, splits, parameters, device))
    if "test" not in splits and is_master:
        print(f"dataset {args.dataset} has no test split: skipping the test evaluation")
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable()
    with out_of_memory_named(args, parameters):
        boosted, images, steps_per_epoch = boost(model, splits, image_processor, device, args, setup_ends)

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_loss_sum": 0.0, "epoch_data_wait": 0.0,
                "epochs": [], "images_trained": 0, "train_seconds": 0.0, "evaluation_seconds": 0.0,
                "unreadable": [], "epoch_start": {}}
    if resume_from:
        progress = checkpoint.load_checkpoint(boosted.booster, boosted.model, boosted.optimizer, boosted.lr_scheduler,
                                              resume_from, progress)
        if is_master:
            print(f"resuming from {resume_from}: epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']} "
                  f"of {steps_per_epoch}")
    elif args.resume_from and is_master:
        print(f"no checkpoint under {checkpoint.checkpoint_root(args.output_path)} yet: starting from scratch")
    writer = None
    if boosted.topology.reports:
        from torch.utils.tensorboard import SummaryWriter  # loaded while the images decoded (boost)
        # purge_step drops what a killed run logged after the checkpoint this run resumes from
        writer = SummaryWriter(os.path.join(args.output_path, "tensorboard"),
                               purge_step=progress["global_step"] or None)
    setup_ends["resume"] = time.perf_counter()
    starts = [PROCESS_START, *setup_ends.values()]
    setup_parts = {part: end - start for (part, end), start in zip(setup_ends.items(), starts)}
    return Run(args, device, parameters, names, image_processor, boosted, images, steps_per_epoch, progress, writer,
               setup_parts)


def train(run):
    """Trains the remaining epochs, evaluating and checkpointing at the end of each."""
    args, progress, topology = run.args, run.progress, run.boosted.topology

    def criterion(outputs, inputs):
        return F.cross_entropy(outputs.logits.float(), inputs["labels"], label_smoothing=args.label_smoothing)

    upcoming = None  # the next epoch's pass: its streamed images decode while this epoch is evaluated
    for epoch in range(progress["epoch"], args.num_epoch):
        if progress["step_in_epoch"] == 0:  # a run resumed mid-epoch keeps the start it was checkpointed with
            progress["epoch_start"] = {key: progress[key] for key in ("images_trained", "train_seconds")}
        train_epoch(run, criterion, upcoming or train_batches(run, epoch, progress["step_in_epoch"]))
        upcoming = train_batches(run, epoch + 1) if epoch + 1 < args.num_epoch else None
        loss_sum, loss_count = sum_over_ranks([progress["epoch_loss_sum"],
                                               run.steps_per_epoch * topology.holds_output], run.device)
        start = progress["epoch_start"]
        epoch_results = {"epoch": epoch + 1, "train_loss": loss_sum / loss_count,
                         "images_per_second": ((progress["images_trained"] - start["images_trained"])
                                               / (progress["train_seconds"] - start["train_seconds"])),
                         "data_wait_seconds": progress["epoch_data_wait"]}
        evaluation_start = time.perf_counter()
        for split in ("validation", "test"):
            if split in run.images:
                epoch_results[split] = evaluate(run.boosted, run.images[split], run.device, args.batch_size,
                                                run.names)
        progress["evaluation_seconds"] += time.perf_counter() - evaluation_start
        epoch_results["memory"] = peak_memory(run.device)
        progress["epochs"].append(epoch_results)
        progress["unreadable"] = sorted(set(progress["unreadable"]).union(*(split.unreadable
                                                                            for split in run.images.values())))
        progress.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_data_wait=0.0)
        if topology.reports:
            report_epoch(epoch_results, len(progress["unreadable"]), progress["global_step"], run.writer)
        run.save_checkpoint()


def report_epoch(epoch_results, unreadable, step, writer):
    """The epoch's line, and its figures in TensorBoard."""
    validation, memory = epoch_results["validation"], epoch_results["memory"]
    gpu_memory = f"GPU {memory['peak_gpu_gib']:.1f} GiB, " if memory["peak_gpu_gib"] is not None else ""
    print(f"epoch {epoch_results['epoch']}: train loss {epoch_results['train_loss']:.4f}, validation loss "
          f"{validation['loss']:.4f}, accuracy {validation['accuracy']:.4f} on {validation['num_examples']} images; "
          f"trained {epoch_results['images_per_second']:.1f} images/s, waiting "
          f"{epoch_results['data_wait_seconds']:.2f} s for data; peak memory {gpu_memory}host "
          f"{memory['peak_host_gib']:.1f} GiB" +
          (f"; left out {unreadable} unreadable image{'s' * (unreadable > 1)}" if unreadable else ""))
    writer.add_scalar("train/epoch_loss", epoch_results["train_loss"], step)
    writer.add_scalar("train/data_wait_seconds", epoch_results["data_wait_seconds"], step)
    for split in ("validation", "test"):
        for metric in ("loss", "accuracy"):
            if split in epoch_results:
                writer.add_scalar(f"{split}/{metric}", epoch_results[split][metric], step)


def save(run):
    """Reports the test figures, saves the model and image processor, then results.json, plots and a model card."""
    args, progress, boosted, topology = run.args, run.progress, run.boosted, run.boosted.topology
    final = progress["epochs"][-1]
    # the best epoch is chosen on validation accuracy alone (then loss); its test figures are reported beside it
    best = max(progress["epochs"], key=lambda epoch: (epoch["validation"]["accuracy"], -epoch["validation"]["loss"]))
    if "test" in final and topology.reports:
        print(f"test: loss {final['test']['loss']:.4f}, accuracy {final['test']['accuracy']:.4f} on "
              f"{final['test']['num_examples']} images")

    unreadable_on_ranks = [None] * dist.get_world_size()
    dist.all_gather_object(unreadable_on_ranks, progress["unreadable"])
    with checkpoint.write_errors_named(args.output_path):
        boosted.booster.save_model(boosted.model, args.output_path, shard=True, use_safetensors=True)
        if dist.get_rank() == 0:
            run.image_processor.save_pretrained(args.output_path)
        if not topology.reports:
            return
        run.writer.close()
        train_images = run.images["train"]
        results = {
            "config": {**vars(args), "world_size": dist.get_world_size(), "data_parallel_size": topology.dp_size,
                       "device": str(run.device), "label_names": run.names, "num_parameters": run.parameters,
                       "num_train_examples": len(train_images)},
            "data": {"mode": "cache" if train_images.cached else "stream", "num_workers": train_images.num_workers,
                     "num_examples": {name: len(split_images) for name, split_images in run.images.items()},
                     "unreadable": sorted(set().union(*unreadable_on_ranks))},
            "memory": peak_memory(run.device),
            "epochs": progress["epochs"],
            "test": final.get("test"),
            "best_epoch": best,
            "train_images_per_second": progress["images_trained"] / progress["train_seconds"],
            "seconds": {"setup": sum(run.setup_parts.values()), "setup_parts": run.setup_parts,
                        "train": progress["train_seconds"],
                        "data_wait": sum(epoch["data_wait_seconds"] for epoch in progress["epochs"]),
                        "evaluation": progress["evaluation_seconds"], "checkpoints": run.checkpoint_seconds,
                        "total": time.perf_counter() - PROCESS_START},
        }
        with open(os.path.join(args.output_path, "results.json"), "w") as file:
            json.dump(results, file, indent=2)
        import report  # loaded while the images decoded (boost)
        report.write_plots(results, args.output_path)
        report.write_model_card(results, args.output_path)
    seconds = results["seconds"]
    print(f"saved the fine-tuned model, results.json, plots and a model card to {args.output_path} "
          f"({seconds['total']:.1f} s: setup {seconds['setup']:.1f}, training {seconds['train']:.1f} of which "
          f"data wait {seconds['data_wait']:.2f}, evaluation {seconds['evaluation']:.1f}, checkpoints "
          f"{seconds['checkpoints']:.1f})")


def main():
    args = parse_demo_args()
    run = set_up(args)
    with out_of_memory_named(args, run.parameters):
        train(run)
        save(run)
    run.images.clear()  # stops the streaming loader's workers now, not when they find their parent gone
    # Every collective this rank queued has run on its GPU before the process ends (os._exit, below), so no rank
    # waits for data from a rank that is gone. Destroying the NCCL group would wait for the same, and take 0.2-0.8 s
    # more; a gloo group's destructor can deadlock (PyTorch 2.5, seen in CI).
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


if __name__ == "__main__":
    exit_code = 0
    try:
        main()
    except RunError as error:  # every rank says it (a diverged loss may show on one rank only), in one write
        sys.stderr.write(f"error: {error}\n")
        exit_code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Every file is written and closed. The interpreter's own teardown of PyTorch's, CUDA's and the process
    # group's state writes nothing and takes seconds (BENCHMARKS.md, end to end); after an error, other ranks may
    # wait in a collective that a clean shutdown of the process group would wait on.
    os._exit(exit_code)
