"""Fine-tunes a pretrained ViT through a Colossal-AI Booster, evaluates it on every image, and saves it.

Launch with `colossalai run --nproc_per_node N vit_train_demo.py ...` or `torchrun --nproc_per_node N ...`.
"""
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm
from transformers import AutoImageProcessor, ViTForImageClassification

import colossalai
from colossalai.accelerator import get_accelerator
from colossalai.booster import Booster
from colossalai.booster.plugin import GeminiPlugin, HybridParallelPlugin, LowLevelZeroPlugin, TorchDDPPlugin
from colossalai.nn.lr_scheduler import CosineAnnealingWarmupLR
from colossalai.nn.optimizer import HybridAdam

from args import parse_demo_args
from data import InputError, label_names, load_splits, to_tensors

SINGLE_PROCESS_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": "29500"}


def build_plugin(args):
    if args.plugin in ("torch_ddp", "torch_ddp_fp16"):
        return TorchDDPPlugin()
    if args.plugin == "low_level_zero":
        return LowLevelZeroPlugin(initial_scale=2**5)
    if args.plugin == "gemini":
        return GeminiPlugin(offload_optim_frac=1.0, pin_memory=True, initial_scale=2**5)
    return HybridParallelPlugin(tp_size=args.tp_size, pp_size=args.pp_size, microbatch_size=1,
                                enable_all_optimization=True, precision="fp16", initial_scale=1)


def load_model(model_name_or_path, names):
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path, use_fast=False)
        model = ViTForImageClassification.from_pretrained(
            model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True)
    except OSError as error:
        first_line = str(error).splitlines()[0]
        raise InputError(f"cannot load model '{model_name_or_path}' ({first_line}); "
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


def loss_of_outputs(outputs, inputs):
    return outputs.loss


def forward_backward(model, batch, booster, topology, optimizer=None):
    """Runs one batch forward (and backward when given an optimizer); returns loss and logits, or None, None on a
    pipeline stage that does not hold the outputs."""
    if topology.pipeline:
        result = booster.execute_pipeline(iter([batch]), model, loss_of_outputs, optimizer,
                                          return_loss=True, return_outputs=True)
        if not topology.holds_output:
            return None, None
        return result["loss"], result["outputs"]["logits"]
    outputs = model(**batch)
    if optimizer is not None:
        booster.backward(outputs.loss, optimizer)
    return outputs.loss, outputs.logits


def sum_over_ranks(values, device):
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def train_epoch(epoch, model, optimizer, lr_scheduler, dataloader, booster, topology, device):
    model.train()
    loss_sum, images, start = 0.0, 0, time.perf_counter()
    with tqdm(dataloader, desc=f"epoch {epoch + 1}", disable=not topology.reports, dynamic_ncols=True) as bar:
        for pixel_values, labels in bar:
            batch = {"pixel_values": pixel_values.to(device), "labels": labels.to(device)}
            loss, _ = forward_backward(model, batch, booster, topology, optimizer)
            optimizer.step()
            optimizer.zero_grad()
            lr_scheduler.step()
            images += len(labels) * topology.dp_size
            if topology.holds_output:
                loss_sum += loss.item()
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}",
                                img_per_s=f"{images / (time.perf_counter() - start):.1f}")
    seconds = time.perf_counter() - start
    loss_total, loss_count = sum_over_ranks([loss_sum, len(dataloader) * topology.holds_output], device)
    return loss_total / loss_count, images, seconds


@torch.no_grad()
def evaluate(model, dataset, booster, topology, device, batch_size):
    """Loss and accuracy over every image of `dataset`, each counted exactly once across the data-parallel ranks.

    Every rank gets the same number of batches of the same sizes (the last rank pads its shard with copies that
    are not counted), because ZeRO and Gemini gather parameters collectively inside each forward pass.
    """
    model.eval()
    pixel_values, labels = dataset.tensors
    per_rank = math.ceil(len(labels) / topology.dp_size)
    index = torch.arange(topology.dp_rank, per_rank * topology.dp_size, topology.dp_size)
    counted = index < len(labels)
    index = index.clamp(max=len(labels) - 1)
    shard = TensorDataset(pixel_values[index], labels[index], counted)
    loss_sum = correct = count = 0.0
    for shard_pixels, shard_labels, shard_counted in DataLoader(shard, batch_size=batch_size):
        batch = {"pixel_values": shard_pixels.to(device), "labels": shard_labels.to(device)}
        _, logits = forward_backward(model, batch, booster, topology)
        if topology.holds_output:
            keep = shard_counted.to(device)
            losses = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
            loss_sum += losses[keep].sum().item()
            correct += (logits.argmax(dim=-1) == batch["labels"])[keep].sum().item()
            count += keep.sum().item()
    loss_sum, correct, count = sum_over_ranks([loss_sum, correct, count], device)
    return {"loss": loss_sum / count, "accuracy": correct / count, "num_examples": int(count)}


def main():
    start = time.perf_counter()
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
        raise InputError(f"cannot create --output_path {args.output_path}: {error.strerror}") from None
    if not os.access(args.output_path, os.W_OK):
        raise InputError(f"--output_path {args.output_path} is not writable; pass a directory you can write to")

    splits = load_splits(args.dataset)
    names = label_names(splits, args.dataset)
    image_processor, model = load_model(args.model_name_or_path, names)
    tensors = {name: to_tensors(split, image_processor) for name, split in splits.items()}
    if "test" not in tensors and is_master:
        print(f"dataset {args.dataset} has no test split: skipping the test evaluation")
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable()

    plugin = build_plugin(args)
    topology = Topology(plugin)
    train_dataloader = plugin.prepare_dataloader(tensors["train"], batch_size=args.batch_size, shuffle=True,
                                                 drop_last=True, seed=args.seed)
    if len(train_dataloader) == 0:
        raise InputError(f"--batch_size {args.batch_size} x {topology.dp_size} data-parallel ranks is larger than "
                        f"the {len(tensors['train'])} training images; lower --batch_size")
    optimizer_class = HybridAdam if torch.cuda.is_available() else torch.optim.AdamW
    optimizer = optimizer_class(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    total_steps = len(train_dataloader) * args.num_epoch
    lr_scheduler = CosineAnnealingWarmupLR(optimizer, total_steps=total_steps,
                                           warmup_steps=int(args.warmup_ratio * total_steps))
    booster = Booster(plugin=plugin, mixed_precision="fp16" if args.plugin == "torch_ddp_fp16" else None)
    model, optimizer, _, train_dataloader, lr_scheduler = booster.boost(
        model, optimizer, dataloader=train_dataloader, lr_scheduler=lr_scheduler)

    epochs, images_trained, train_seconds = [], 0, 0.0
    for epoch in range(args.num_epoch):
        train_dataloader.sampler.set_epoch(epoch)
        train_loss, images, seconds = train_epoch(epoch, model, optimizer, lr_scheduler, train_dataloader,
                                                  booster, topology, device)
        images_trained, train_seconds = images_trained + images, train_seconds + seconds
        validation = evaluate(model, tensors["validation"], booster, topology, device, args.batch_size)
        epochs.append({"epoch": epoch + 1, "train_loss": train_loss, "validation": validation})
        if topology.reports:
            print(f"epoch {epoch + 1}: train loss {train_loss:.4f}, validation loss {validation['loss']:.4f}, "
                  f"accuracy {validation['accuracy']:.4f} on {validation['num_examples']} images")
    test = evaluate(model, tensors["test"], booster, topology, device, args.batch_size) if "test" in tensors else None
    if test and topology.reports:
        print(f"test: loss {test['loss']:.4f}, accuracy {test['accuracy']:.4f} on {test['num_examples']} images")

    booster.save_model(model, args.output_path, shard=True, use_safetensors=True)
    if is_master:
        image_processor.save_pretrained(args.output_path)
    if topology.reports:
        results = {
            "config": {**vars(args), "world_size": dist.get_world_size(), "data_parallel_size": topology.dp_size,
                       "device": str(device), "label_names": names,
                       "num_train_examples": len(tensors["train"])},
            "epochs": epochs,
            "test": test,
            "train_images_per_second": images_trained / train_seconds,
            "wall_seconds": time.perf_counter() - start,
        }
        with open(os.path.join(args.output_path, "results.json"), "w") as file:
            json.dump(results, file, indent=2)
        print(f"saved the fine-tuned model and results.json to {args.output_path}")


if __name__ == "__main__":
    try:
        main()
    except InputError as error:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
