"""Classifies images with a model fine-tuned by vit_train_demo.py: one image, several, or every image in folders.

    python predict.py --model ./output_model leaf.jpg
    python predict.py --model ./output_model --top_k 1 --json beans/test/ > predictions.json
"""
import argparse
import json
import os
import sys

import torch
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from transformers import AutoImageProcessor, pipeline

from errors import RunError
from images import open_rgb


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Top-k labels with probabilities for images, from a fine-tuned "
                                     "output directory of vit_train_demo.py.")
    parser.add_argument("images", nargs="+", help="image files, or folders searched (recursively) for images")
    parser.add_argument("--model", default="./output_model", help="the --output_path of a finished training run")
    parser.add_argument("--top_k", type=int, default=3, help="how many labels to print for each image")
    parser.add_argument("--batch_size", type=int, default=32, help="images classified at once")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when there is a GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a line per image")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top_k and --batch_size must be at least 1")
    return args


def image_paths(inputs):
    """The files given, and the images (by extension) under the folders given, in a stable order."""
    paths = []
    for given in inputs:
        if os.path.isdir(given):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(given) for name in names
                           if os.path.splitext(name)[1].lower() in ImageFolder.EXTENSIONS)
            if not found:
                raise RunError(f"folder {given} holds no images")
            paths += found
        elif os.path.isfile(given):
            paths.append(given)
        else:
            raise RunError(f"{given} does not exist; pass image files or folders of images")
    return paths


def load_classifier(model_path, device):
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise RunError(f"no fine-tuned model in {model_path} (no config.json); pass the --output_path of a finished "
                       "run with --model")
    try:
        # the fast processor (torchvision), as in training
        image_processor = AutoImageProcessor.from_pretrained(model_path, use_fast=True)
        return pipeline("image-classification", model=model_path, image_processor=image_processor, device=device)
    except (OSError, ValueError, RuntimeError) as error:
        raise RunError(f"cannot load the model in {model_path}: {str(error).splitlines()[0]}") from None


def main(argv=None):
    args = parse_args(argv)
    classifier = load_classifier(args.model, args.device)
    paths = image_paths(args.images)
    top_k = min(args.top_k, classifier.model.config.num_labels)
    predictions = []
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start:start + args.batch_size]
        images = [open_rgb({"bytes": None, "path": path}) for path in batch]  # a bad file stops here, named
        for path, labels in zip(batch, classifier(images, top_k=top_k, batch_size=args.batch_size)):
            predictions.append({"path": path, "predictions": labels})
            if not args.json:
                print(f"{path}: " + ", ".join(f"{label['label']} {label['score']:.4f}" for label in labels))
    if args.json:
        print(json.dumps(predictions, indent=2))


if __name__ == "__main__":
    try:
        main()
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
