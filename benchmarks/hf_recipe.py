"""The Hugging Face recipe a user would pick instead of this example, kept as the benchmarks' reference.

Hugging Face's fine-tune-ViT recipe as its image-classification guide writes it: `Trainer`, images decoded and
preprocessed on the fly by the image processor (`with_transform`) in `dataloader_num_workers` loader processes, bf16
on a GPU, AdamW with warm-up. With --save it writes what the guide's recipe writes (`save_strategy="epoch"`, and
the model at the end, which the guide pushes to the hub); without, nothing. Prints one JSON line: the wall time of
each part, training images per second, and the accuracy on each split. Not part of the example:
benchmarks/reproduce_gpu_figures.sh times it beside run_finetuning.sh.
  python benchmarks/hf_recipe.py --model_name_or_path MODEL --dataset DIR --batch_size 128 --num_epoch 1
  torchrun --nproc_per_node 2 benchmarks/hf_recipe.py ...   # data-parallel, --batch_size on each GPU
"""
import argparse
import json
import resource
import time

PROCESS_START = time.perf_counter()

import numpy as np
import torch
from datasets import load_dataset
from transformers import AutoImageProcessor, Trainer, TrainingArguments, ViTForImageClassification


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset", required=True, help="an image folder laid out as split/label/image")
    parser.add_argument("--output_path", default="/tmp/hf_recipe")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_epoch", type=int, default=5)
    parser.add_argument("--learning_rate", type=float, default=3e-4)
    parser.add_argument("--weight_decay", type=float, default=0.5)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--label_smoothing", type=float, default=0.1)
    parser.add_argument("--num_workers", type=int, default=8)
    parser.add_argument("--fast_image_processor", action="store_true",
                        help="the image processor's torchvision version, as the example uses (default: the one "
                        "AutoImageProcessor picks, the PIL one in transformers 4.51)")
    parser.add_argument("--eval_every_epoch", action="store_true", help="evaluate on validation after each epoch")
    parser.add_argument("--save", action="store_true",
                        help="write what the guide's recipe writes, as the example does by default: a checkpoint at "
                        "each epoch's end (the newest one kept) and the fine-tuned model with its image processor")
    return parser.parse_args()


def main():
    args = parse_args()
    splits = load_dataset("imagefolder", data_dir=args.dataset)
    names = splits["train"].features["label"].names
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path,
                                                   **({"use_fast": True} if args.fast_image_processor else {}))

    def transform(batch):
        inputs = processor([image.convert("RGB") for image in batch["image"]], return_tensors="pt")
        inputs["labels"] = batch["label"]
        return inputs

    def collate(examples):
        return {"pixel_values": torch.stack([example["pixel_values"] for example in examples]),
                "labels": torch.tensor([example["labels"] for example in examples])}

    def accuracy(prediction):
        return {"accuracy": float(np.mean(np.argmax(prediction.predictions, axis=1) == prediction.label_ids))}

    model = ViTForImageClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True)
    training_args = TrainingArguments(
        output_dir=args.output_path, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, num_train_epochs=args.num_epoch,
        learning_rate=args.learning_rate, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        label_smoothing_factor=args.label_smoothing, bf16=torch.cuda.is_available(),
        eval_strategy="epoch" if args.eval_every_epoch else "no", save_strategy="epoch" if args.save else "no",
        save_total_limit=1, logging_strategy="no",
        remove_unused_columns=False, dataloader_num_workers=args.num_workers, report_to="none")
    prepared = splits.with_transform(transform)
    trainer = Trainer(model=model, args=training_args, data_collator=collate, compute_metrics=accuracy,
                      train_dataset=prepared["train"], eval_dataset=prepared["validation"], processing_class=processor)
    setup_seconds = time.perf_counter() - PROCESS_START
    train_metrics = trainer.train().metrics
    if args.save:
        trainer.save_model()  # the model and, as its processing class, the image processor
    results = {"setup_seconds": setup_seconds, "train_images": len(prepared["train"]) * args.num_epoch,
               "train_seconds": train_metrics["train_runtime"],
               "train_images_per_second": train_metrics["train_samples_per_second"]}
    for split in ("validation", "test"):
        if split in prepared:
            results[f"{split}_accuracy"] = trainer.evaluate(prepared[split], metric_key_prefix=split)[
                f"{split}_accuracy"]
    results["peak_host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    results["total_seconds"] = time.perf_counter() - PROCESS_START
    if trainer.is_world_process_zero():  # once, launched on several GPUs as the guide says (torchrun, accelerate)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
