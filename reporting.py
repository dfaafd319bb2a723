"""What a run tells people: the header line, a line per epoch (and its figures in TensorBoard), where the time
went, and what it leaves beside the model: results.json, PNG plots and a model card (README.md).

matplotlib and TensorBoard load only on the reporting rank, while the images decode (load_libraries).
"""
import contextlib
import importlib
import json
import os
import time

import psutil


class Clock:
    """Where a run's time goes: each part of the set-up, from the process's start, and the seconds this process
    waited for checkpoints."""

    def __init__(self):
        self.start = time.perf_counter() - (time.time() - psutil.Process().create_time())
        self.last_lap = self.start
        self.setup_parts = {}
        self.checkpoint_seconds = 0.0

    def lap(self, part):
        """Ends set-up part `part`, begun where the last one ended."""
        now = time.perf_counter()
        self.setup_parts[part], self.last_lap = now - self.last_lap, now

    def stopwatch(self, excluding):
        """A function giving the seconds since this call, less those added meanwhile to attribute `excluding`."""
        start, excluded_before = time.perf_counter(), getattr(self, excluding)
        return lambda: time.perf_counter() - start - (getattr(self, excluding) - excluded_before)

    def summary(self, state):
        """The run's seconds, for results.json, with what `state` (checkpoint.TrainingState) measured."""
        return {"setup": sum(self.setup_parts.values()), "setup_parts": self.setup_parts,
                "train": state.train_seconds,
                "data_wait": sum(epoch["data_wait_seconds"] for epoch in state.epochs),
                "evaluation": state.evaluation_seconds, "checkpoints": self.checkpoint_seconds,
                "total": time.perf_counter() - self.start}


@contextlib.contextmanager
def timed(target, attribute):
    """Adds the seconds spent inside to `target.attribute`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(target, attribute, getattr(target, attribute) + time.perf_counter() - start)


def load_libraries():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed
    for module in ("matplotlib.pyplot", "torch.utils.tensorboard"):
        importlib.import_module(module)


def describe_run(model_name, model_class, dataset, splits, parameters, device, settings, output_path, processes):
    """The header line: what is trained, on what, how (plugins.PluginSettings), and where it goes."""
    sizes = ", ".join(f"{len(splits[name])} {name}" for name in ("train", "validation", "test") if name in splits)
    microbatches = f" in microbatches of {settings.microbatch_size}" if settings.pp_size > 1 else ""
    layout = (f" (tensor parallel {settings.tp_size}, pipeline parallel {settings.pp_size}{microbatches})"
              if settings.tp_size * settings.pp_size > 1 else "")
    offloaded = "optimizer" if settings.offload == "optimizer" else "weights and optimizer"
    offload = (f", offloading the {offloaded} to the host" +
               (f" ({settings.offload_fraction:g} of it)" if settings.offload_fraction < 1 else "")
               if settings.offload != "none" else "")
    accumulation = settings.gradient_accumulation_steps
    accumulating = f", {accumulation} batches a step" if accumulation > 1 else ""
    lora = (f", LoRA adapters of rank {settings.lora_rank}{' over 4-bit weights' * settings.lora_quantize}"
            if settings.lora_rank else "")
    return (f"fine-tuning {model_name} ({model_class}, {parameters / 1e6:.1f}M parameters) on {dataset} ({sizes} images) with "
            f"{settings.plugin} in {settings.precision}{offload}, {processes} process{'es' * (processes > 1)} on "
            f"{device.type}{layout}{accumulating}{lora}; saving to {output_path}")


def tensorboard_writer(output_path, first_step):
    from torch.utils.tensorboard import SummaryWriter
    # purge_step drops what a killed run logged after the checkpoint this run resumes from
    return SummaryWriter(os.path.join(output_path, "tensorboard"), purge_step=first_step or None)


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


def write_results(results, output_path):
    """results.json, the plots and the model card; then the run's last line."""
    with open(os.path.join(output_path, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    write_plots(results, output_path)
    write_model_card(results, output_path)
    seconds = results["seconds"]
    print(f"saved the fine-tuned model, results.json, plots and a model card to {output_path} "
          f"({seconds['total']:.1f} s: setup {seconds['setup']:.1f}, training {seconds['train']:.1f} of which "
          f"data wait {seconds['data_wait']:.2f}, evaluation {seconds['evaluation']:.1f}, checkpoints "
          f"{seconds['checkpoints']:.1f})")


def write_plots(results, output_path):
    """training_curves.png (loss and accuracy per epoch) and confusion_matrix.png (the final epoch's)."""
    import matplotlib.pyplot as plt  # loaded, for files only, by load_libraries

    epochs = results["epochs"]
    numbers = [epoch["epoch"] for epoch in epochs]
    splits = [split for split in ("validation", "test") if split in epochs[-1]]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colors = {"train": "C0", "validation": "C1", "test": "C2"}  # the same split in the same colour on both plots
    loss_axes.plot(numbers, [epoch["train_loss"] for epoch in epochs], marker="o", label="train", color=colors["train"])
    for split in splits:
        loss_axes.plot(numbers, [epoch[split]["loss"] for epoch in epochs], marker="o", label=split,
                       color=colors[split])
        accuracy_axes.plot(numbers, [epoch[split]["accuracy"] for epoch in epochs], marker="o", label=split,
                           color=colors[split])
    loss_axes.set(title="loss", xlabel="epoch", xticks=numbers)
    accuracy_axes.set(title="accuracy", xlabel="epoch", xticks=numbers)
    accuracy_axes.axvline(results["best_epoch"]["epoch"], color="grey", linestyle=":", label="best on validation")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.savefig(os.path.join(output_path, "training_curves.png"), dpi=100)
    plt.close(figure)

    names = results["config"]["label_names"]
    figure, all_axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 4.5), constrained_layout=True,
                                    squeeze=False)
    for axes, split in zip(all_axes[0], splits):
        confusion = epochs[-1][split]["confusion_matrix"]
        axes.imshow(confusion, cmap="Blues")
        for row, counts in enumerate(confusion):
            for column, count in enumerate(counts):
                axes.text(column, row, count, ha="center", va="center",
                          color="white" if count > max(map(max, confusion)) / 2 else "black")
        axes.set(title=f"{split}, epoch {epochs[-1]['epoch']}: accuracy {epochs[-1][split]['accuracy']:.4f}",
                 xlabel="predicted", ylabel="true", xticks=range(len(names)), yticks=range(len(names)))
        axes.set_xticklabels(names, rotation=30, ha="right")
        axes.set_yticklabels(names)
    figure.savefig(os.path.join(output_path, "confusion_matrix.png"), dpi=100)
    plt.close(figure)


def write_model_card(results, output_path):
    config, epochs = results["config"], results["epochs"]
    splits = [split for split in ("validation", "test") if split in epochs[-1]]
    rows = "\n".join(f"| {epoch['epoch']} | {epoch['train_loss']:.4f} | "
                     + " | ".join(f"{epoch[split]['loss']:.4f} | {epoch[split]['accuracy']:.4f}" for split in splits)
                     + " |" for epoch in epochs)
    final_split = splits[-1]
    per_class = "\n".join(f"| {name} | {scores['precision']:.4f} | {scores['recall']:.4f} | {scores['f1']:.4f} | "
                          f"{scores['support']} |" for name, scores in epochs[-1][final_split]["per_class"].items())
    augmentation = "random resized crop + flip" if config["augment"] else "none"
    card = f"""---
library_name: transformers
pipeline_tag: image-classification
base_model: {config['model_name_or_path']}
tags: [vision, image-classification, colossalai]
---

# {os.path.basename(os.path.normpath(config['model_name_or_path']))} fine-tuned on {config['dataset']}

Fine-tuned with the Colossal-AI ViT example (`vit_train_demo.py`) to tell apart {len(config['label_names'])} classes:
{', '.join(config['label_names'])}.

## Data
{config['dataset']}: {config['num_train_examples']} training images, """ + ", ".join(
        f"{epochs[-1][split]['num_examples']} {split}" for split in splits) + f""" images, each counted once.

## Settings
| setting | value |
| --- | --- |
| plugin, precision | {config['plugin']}, {config['precision']} |
| processes (data-parallel) | {config['world_size']} ({config['data_parallel_size']}) |
| epochs, batch per data-parallel rank | {config['num_epoch']}, {config['batch_size']} |
| peak learning rate, warm-up ratio | {config['learning_rate']}, {config['warmup_ratio']} |
| weight decay, label smoothing | {config['weight_decay']}, {config['label_smoothing']} |
| augmentation | {augmentation} |
| seed, device | {config['seed']}, {config['device']} |

## Results
| epoch | train loss | """ + " | ".join(f"{split} loss | {split} accuracy" for split in splits) + """ |
| --- | --- | """ + " | ".join("--- | ---" for _ in splits) + f""" |
{rows}

The model saved here is the one after the last epoch. Best epoch on validation: {results['best_epoch']['epoch']}.
Per class, {final_split} split, last epoch:

| label | precision | recall | F1 | images |
| --- | --- | --- | --- | --- |
{per_class}

![loss and accuracy per epoch](training_curves.png)
![confusion matrix](confusion_matrix.png)

## Use
```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{os.path.abspath(output_path)}")
print(classifier("leaf.jpg"))
```
or `python predict.py --model {output_path} leaf.jpg` from the example's folder.
"""
    with open(os.path.join(output_path, "README.md"), "w") as file:
        file.write(card)
