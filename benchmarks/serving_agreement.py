"""Is the saved model served the way training measured it? For a finished run and one split of an image folder:
each image's top-1 label through the example's own input path (its loader-worker decoding and Normalise, the model
in the run's precision) and through `pipeline` on the image files (what predict.py serves with), the accuracy of
each beside the one the run's results.json reports, the share of identical top-1 labels, and the largest
difference between the two inputs. Prints one JSON line.
  python -m benchmarks.serving_agreement --model ./output_model --dataset /path/to/images --split validation
"""
import argparse
import json

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
from transformers.image_utils import load_image

from data import labels_of, load_splits
from images import Decoder, Normalise


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the --output_path of a finished run")
    parser.add_argument("--dataset", required=True, help="the image folder (split/label/image) it was trained on")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--batch_size", type=int, default=64)
    return parser.parse_args()


@torch.no_grad()
def main():
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = json.load(open(f"{args.model}/results.json"))
    split = load_splits(args.dataset)[args.split]
    paths, labels = [cell["path"] for cell in split["image"]], labels_of(split)
    image_processor = AutoImageProcessor.from_pretrained(args.model)  # as saved: the fast one, as in training
    model = AutoModelForImageClassification.from_pretrained(args.model).to(device).eval()
    decoder, normalise = Decoder(image_processor), Normalise(image_processor, device)
    training_top1, largest_difference = [], 0.0
    for start in range(0, len(paths), args.batch_size):
        cells = split["image"][start:start + args.batch_size]
        pixel_values = normalise(decoder(cells)["pixel_values"].to(device))
        served = image_processor([load_image(cell["path"]) for cell in cells], return_tensors="pt")["pixel_values"]
        largest_difference = max(largest_difference, (pixel_values - served.to(device)).abs().max().item())
        with torch.autocast(device.type, torch.bfloat16, enabled=results["config"]["precision"] == "bf16"):
            training_top1 += model(pixel_values=pixel_values).logits.argmax(dim=-1).tolist()
    classifier = pipeline("image-classification", model=model, image_processor=image_processor, device=device)
    serving_top1 = [model.config.label2id[prediction[0]["label"]]
                    for prediction in classifier(paths, top_k=1, batch_size=args.batch_size)]
    reported = results["epochs"][-1][args.split]["accuracy"]

    def accuracy(top1):
        return sum(guess == label for guess, label in zip(top1, labels)) / len(labels)

    print(json.dumps({"images": len(paths), "results_json_accuracy": reported,
                      "example_input_accuracy": accuracy(training_top1), "pipeline_accuracy": accuracy(serving_top1),
                      "identical_top1_share": sum(a == b for a, b in zip(training_top1, serving_top1)) / len(paths),
                      "largest_input_difference": largest_difference, "precision": results["config"]["precision"]}))


if __name__ == "__main__":
    main()
