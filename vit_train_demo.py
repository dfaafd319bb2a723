"""Fine-tunes a pretrained ViT through a Colossal-AI Booster, evaluates it on every image, and saves it.

Launch with `colossalai run --nproc_per_node N vit_train_demo.py ...` or `torchrun --nproc_per_node N ...`.
"""
import json
import math
import os
import sys
import time
from functools import partial
from itertools import islice

PROCESS_START = time.perf_counter()  # taken before the heavy imports below, so that the setup time includes them

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.utils.data import DistributedSampler, TensorDataset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers import AutoImageProcessor, ViTForImageClassification

import colossalai
from colossalai.accelerator import get_accelerator
from colossalai.booster import Booster
from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin
from colossalai.nn.lr_scheduler import CosineAnnealingWarmupLR
from colossalai.nn.optimizer import FusedAdam

import checkpoint
import report
from args import parse_demo_args
from data import RunError, label_names, load_splits, random_resized_crop_and_flip, to_tensors

SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "29500"}


def build_plugin(args):
    """The plugin in `args.precision`. A ViT-B fits on one GPU many times over, so nothing is offloaded to the CPU."""
    if args.plugin in ("torch_ddp", "torch_ddp_fp16"):
        return TorchDDPPlugin()
    if args.plugin == "low_level_zero":  # alone on one GPU there is nothing to overlap, and trying costs 8-17%
        return LowLevelZeroPlugin(precision=args.precision, initial_scale=2**5,
                                  overlap_communication=dist.get_world_size() > 1)
    if args.plugin == "gemini":
        return GeminiPlugin(precision=args.precision, initial_scale=2**5)
    return HybridParallelPlugin(tp_size=args.tp_size, pp_size=args.pp_size, microbatch_size=1,
                                enable_all_optimization=True, precision=args.precision, initial_scale=1)


def build_booster(model, args, device):
    """The plugin and booster that train `model` in args.precision."""
    if args.plugin == "torch_ddp" and args.precision == "bf16":  # the other plugins cast the model themselves
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    plugin = build_plugin(args)
    torch_amp = args.plugin.startswith("torch_ddp") and args.precision == "fp16"
    return plugin, Booster(plugin=plugin, mixed_precision="fp16" if torch_amp else None)


def build_optimizer(model, args):
    """AdamW in one fused kernel on the GPU: Colossal-AI's FusedAdam on gemini (which takes only its own Adam
    kernels), PyTorch's elsewhere."""
    if args.plugin == "gemini":
        return FusedAdam(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                             fused=torch.cuda.is_available())


def load_model(model_name_or_path, names):
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, use_fast=False)
        model = ViTForImageClassification.from_pretrained(
            model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True,
            attn_implementation="sdpa")
    except OSError as error:
        first_line = str(error).splitlines()[0]
        raise RunError(f"cannot load model '{model_name_or_path}' ({first_line}); "
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


def forward_backward(model, batch, booster, topology, criterion, optimizer=None):
    """Runs one batch forward (and backward when given an optimizer); returns loss and logits, or None, None on a
    pipeline stage that does not hold the outputs."""
    if topology.pipeline:
        result = booster.execute_pipeline(iter([batch]), model, criterion, optimizer,
                                          return_loss=True, return_outputs=True)
        if not topology.holds_output:
            return None, None
        return result["loss"], result["outputs"]["logits"]
    outputs = model(pixel_values=batch["pixel_values"])
    loss = criterion(outputs, batch)
    if optimizer is not None:
        booster.backward(loss, optimizer)
    return loss, outputs.logits


def sum_over_ranks(values, device):
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def train_epoch(model, optimizer, lr_scheduler, dataloader, train_data, booster, topology, criterion, args, progress,
                save_checkpoint, writer):
    """Trains from step `progress["step_in_epoch"]` to the end of the epoch, updating `progress` as it goes.

    The loader yields indices into `train_data`, which already sits on the device: a batch is one gather there.
    """
    model.train()
    all_pixel_values, all_labels = train_data.tensors
    remaining = iter(islice(dataloader, progress["step_in_epoch"], None))
    with tqdm(total=len(dataloader), initial=progress["step_in_epoch"], desc=f"epoch {progress['epoch'] + 1}",
              disable=not topology.reports, dynamic_ncols=True) as bar:
        while True:
            step_start = time.perf_counter()
            indices = next(remaining, None)
            if indices is None:
                break
            indices = indices[0].to(all_labels.device)
            pixel_values, labels = all_pixel_values[indices], all_labels[indices]
            progress["epoch_data_wait"] += time.perf_counter() - step_start
            batch = {"pixel_values": random_resized_crop_and_flip(pixel_values) if args.augment else pixel_values,
                     "labels": labels}
            loss, _ = forward_backward(model, batch, booster, topology, criterion, optimizer)
            optimizer.step()
            optimizer.zero_grad()
            lr_scheduler.step()
            progress["step_in_epoch"] += 1
            progress["global_step"] += 1
            progress["images_trained"] += len(labels) * topology.dp_size
            loss_value = loss.item() if topology.holds_output else 0.0  # .item() waits for the step to finish
            progress["train_seconds"] += time.perf_counter() - step_start
            if not math.isfinite(loss_value):
                raise RunError(f"training loss is {loss_value} at step {progress['global_step']} (epoch "
                               f"{progress['epoch'] + 1}); lower --learning_rate or check the data")
            progress["epoch_loss_sum"] += loss_value
            learning_rate = lr_scheduler.get_last_lr()[0]
            images_per_second = progress["images_trained"] / progress["train_seconds"]
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", img_per_s=f"{images_per_second:.1f}")
            if writer:
                for tag, value in (("train/loss", loss_value), ("train/learning_rate", learning_rate),
                                   ("train/images_per_second", images_per_second)):
                    writer.add_scalar(tag, value, progress["global_step"])
            # the last step of an epoch is saved after the evaluation, with the epoch's results
            if (args.save_every and progress["global_step"] % args.save_every == 0
                    and progress["step_in_epoch"] < len(dataloader)):
                save_checkpoint(progress)


@torch.no_grad()
def evaluate(model, dataset, booster, topology, device, batch_size, names):
    """Loss, accuracy, per-class precision/recall/F1 and the confusion matrix over every image of `dataset`, each
    counted exactly once across the data-parallel ranks.

    Every rank gets the same number of batches of the same sizes (the last rank pads its shard with copies that
    are not counted), because ZeRO and Gemini gather parameters collectively inside each forward pass.
    """
    model.eval()
    pixel_values, labels = dataset.tensors
    per_rank = math.ceil(len(labels) / topology.dp_size)
    shard = torch.arange(topology.dp_rank, per_rank * topology.dp_size, topology.dp_size, device=device)
    num_labels = len(names)
    confusion = torch.zeros(num_labels * num_labels, dtype=torch.float64, device=device)  # row: label, column: guess
    loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
    for indices in shard.split(batch_size):
        counted = indices < len(labels)
        indices = indices.clamp(max=len(labels) - 1)
        batch = {"pixel_values": pixel_values[indices], "labels": labels[indices]}
        _, logits = forward_backward(model, batch, booster, topology, plain_cross_entropy)
        if topology.holds_output:
            kept_labels, kept_logits = batch["labels"][counted], logits[counted].float()
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


def plain_cross_entropy(outputs, inputs):
    return F.cross_entropy(outputs.logits.float(), inputs["labels"])


def main():
    start = PROCESS_START
    args = parse_demo_args()
    for name, value in SINGLE_PROCESS_ENV.items():  # so that plain `python vit_train_demo.py` runs too
        os.environ.setdefault(name, value)
    accelerator = get_accelerator()
    colossalai.launch_from_torch(backend=accelerator.communication_backend, seed=args.seed, verbose=False)
    device = accelerator.get_current_device()
    is_master = dist.get_rank() == 0
    if not is_master:
        transformers.logging.set_verbosity_error()

    try:
        os.makedirs(args.output_path, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create --output_path {args.output_path}: {error.strerror}") from None
    if not os.access(args.output_path, os.W_OK):
        raise RunError(f"--output_path {args.output_path} is not writable; pass a directory you can write to")
    resume_from = args.resume_from and checkpoint.resolve_resume(args.resume_from, args.output_path)

    splits = load_splits(args.dataset)
    names = label_names(splits, args.dataset)
    image_processor, model = load_model(args.model_name_or_path, names)
    tensors = {name: to_tensors(split, image_processor, device) for name, split in splits.items()}
    if "test" not in tensors and is_master:
        print(f"dataset {args.dataset} has no test split: skipping the test evaluation")
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable()

    plugin, booster = build_booster(model, args, device)
    topology = Topology(plugin)
    # the loader deals out indices into the training tensors; it gets a generator of its own: each new iterator
    # draws a seed from it, and drawing from the global one instead would shift the augmentation's random stream
    # between a resumed run and an uninterrupted one
    train_dataloader = plugin.prepare_dataloader(TensorDataset(torch.arange(len(tensors["train"]))),
                                                 batch_size=args.batch_size, shuffle=True, drop_last=True,
                                                 generator=torch.Generator().manual_seed(args.seed),
                                                 distributed_sampler_cls=partial(DistributedSampler, seed=args.seed))
    if len(train_dataloader) == 0:
        raise RunError(f"--batch_size {args.batch_size} x {topology.dp_size} data-parallel ranks is larger than "
                       f"the {len(tensors['train'])} training images; lower --batch_size")
    optimizer = build_optimizer(model, args)
    total_steps = len(train_dataloader) * args.num_epoch
    lr_scheduler = CosineAnnealingWarmupLR(optimizer, total_steps=total_steps,
                                           warmup_steps=int(args.warmup_ratio * total_steps))
    model, optimizer, _, train_dataloader, lr_scheduler = booster.boost(
        model, optimizer, dataloader=train_dataloader, lr_scheduler=lr_scheduler)

    def save_checkpoint(progress):
        if args.keep_checkpoints:
            checkpoint.save_checkpoint(booster, model, optimizer, lr_scheduler, progress, args.output_path,
                                       args.keep_checkpoints)

    progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "epoch_loss_sum": 0.0, "epoch_data_wait": 0.0,
                "epochs": [], "images_trained": 0, "train_seconds": 0.0, "evaluation_seconds": 0.0}
    if resume_from:
        progress = checkpoint.load_checkpoint(booster, model, optimizer, lr_scheduler, resume_from)
        if is_master:
            print(f"resuming from {resume_from}: epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']} "
                  f"of {len(train_dataloader)}")
    elif args.resume_from and is_master:
        print(f"no checkpoint under {checkpoint.checkpoint_root(args.output_path)} yet: starting from scratch")
    # purge_step drops what a killed run logged after the checkpoint this run resumes from
    writer = SummaryWriter(os.path.join(args.output_path, "tensorboard"),
                           purge_step=progress["global_step"] or None) if topology.reports else None
    setup_seconds = time.perf_counter() - start

    def criterion(outputs, inputs):
        return F.cross_entropy(outputs.logits.float(), inputs["labels"], label_smoothing=args.label_smoothing)

    for epoch in range(progress["epoch"], args.num_epoch):
        train_dataloader.sampler.set_epoch(epoch)
        train_epoch(model, optimizer, lr_scheduler, train_dataloader, tensors["train"], booster, topology, criterion,
                    args, progress, save_checkpoint, writer)
        loss_sum, loss_count = sum_over_ranks([progress["epoch_loss_sum"],
                                               len(train_dataloader) * topology.holds_output], device)
        epoch_results = {"epoch": epoch + 1, "train_loss": loss_sum / loss_count,
                         "data_wait_seconds": progress["epoch_data_wait"]}
        evaluation_start = time.perf_counter()
        for split in ("validation", "test"):
            if split in tensors:
                epoch_results[split] = evaluate(model, tensors[split], booster, topology, device, args.batch_size,
                                                names)
        progress["evaluation_seconds"] += time.perf_counter() - evaluation_start
        progress["epochs"].append(epoch_results)
        progress.update(epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_data_wait=0.0)
        if topology.reports:
            validation = epoch_results["validation"]
            print(f"epoch {epoch + 1}: train loss {epoch_results['train_loss']:.4f}, validation loss "
                  f"{validation['loss']:.4f}, accuracy {validation['accuracy']:.4f} on {validation['num_examples']} "
                  f"images; waited {epoch_results['data_wait_seconds']:.2f} s for data")
            writer.add_scalar("train/epoch_loss", epoch_results["train_loss"], progress["global_step"])
            writer.add_scalar("train/data_wait_seconds", epoch_results["data_wait_seconds"], progress["global_step"])
            for split in ("validation", "test"):
                for metric in ("loss", "accuracy"):
                    if split in epoch_results:
                        writer.add_scalar(f"{split}/{metric}", epoch_results[split][metric], progress["global_step"])
        save_checkpoint(progress)
    final = progress["epochs"][-1]
    # the best epoch is chosen on validation accuracy alone (then loss); its test figures are reported beside it
    best = max(progress["epochs"], key=lambda epoch: (epoch["validation"]["accuracy"], -epoch["validation"]["loss"]))
    if "test" in final and topology.reports:
        print(f"test: loss {final['test']['loss']:.4f}, accuracy {final['test']['accuracy']:.4f} on "
              f"{final['test']['num_examples']} images")

    with checkpoint.write_errors_named(args.output_path):
        booster.save_model(model, args.output_path, shard=True, use_safetensors=True)
        if is_master:
            image_processor.save_pretrained(args.output_path)
        if topology.reports:
            writer.close()
            results = {
                "config": {**vars(args), "world_size": dist.get_world_size(), "data_parallel_size": topology.dp_size,
                           "device": str(device), "label_names": names,
                           "num_train_examples": len(tensors["train"])},
                "epochs": progress["epochs"],
                "test": final.get("test"),
                "best_epoch": best,
                "train_images_per_second": progress["images_trained"] / progress["train_seconds"],
                "seconds": {"setup": setup_seconds, "train": progress["train_seconds"],
                            "data_wait": sum(epoch["data_wait_seconds"] for epoch in progress["epochs"]),
                            "evaluation": progress["evaluation_seconds"], "total": time.perf_counter() - start},
            }
            with open(os.path.join(args.output_path, "results.json"), "w") as file:
                json.dump(results, file, indent=2)
            report.write_plots(results, args.output_path)
            report.write_model_card(results, args.output_path)
    if topology.reports:
        seconds = results["seconds"]
        print(f"saved the fine-tuned model, results.json, plots and a model card to {args.output_path} "
              f"({seconds['total']:.1f} s: setup {seconds['setup']:.1f}, training {seconds['train']:.1f} of which "
              f"data wait {seconds['data_wait']:.2f}, evaluation {seconds['evaluation']:.1f})")


if __name__ == "__main__":
    try:
        main()
    except RunError as error:  # every rank says it: a diverged loss may show on one rank only
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
