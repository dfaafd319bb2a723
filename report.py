"""What a finished run leaves for people to read beside results.json: PNG plots and a model card (README.md)."""
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt


def write_plots(results, output_path):
    """training_curves.png (loss and accuracy per epoch) and confusion_matrix.png (the final epoch's)."""
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
