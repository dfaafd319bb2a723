"""Writes a large JPEG image folder (split/label/image) made from the beans images, to measure the streaming path.

Each new image is a random crop (30-100% of the area) of a random beans image of the same split and label, flipped
half the time, rotated by a random angle, resized to --size and saved as JPEG quality 90: as large and as costly
to decode as the 500x500 originals of the hub's beans.
  python benchmarks/synthesize_dataset.py --source ../shared/datasets/beans --output /tmp/large_beans --train 50000
"""
import argparse
import os
import random
from concurrent.futures import ProcessPoolExecutor

from PIL import Image


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="an image folder laid out as split/label/image")
    parser.add_argument("--output", required=True)
    parser.add_argument("--train", type=int, default=50000, help="images to write in train")
    parser.add_argument("--eval", type=int, default=1000, help="images to write in validation and in test")
    parser.add_argument("--size", type=int, default=500, help="side of the square images written")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def write_images(job):
    sources, destination, first, count, size, seed = job
    rng = random.Random(seed)
    for number in range(first, first + count):
        with Image.open(rng.choice(sources)) as picture:
            picture = picture.convert("RGB")
        width, height = picture.size
        area = rng.uniform(0.3, 1.0)
        side_x, side_y = int(width * area ** 0.5), int(height * area ** 0.5)
        left, top = rng.randint(0, width - side_x), rng.randint(0, height - side_y)
        picture = picture.crop((left, top, left + side_x, top + side_y))
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        picture = picture.rotate(rng.uniform(-30, 30), resample=Image.Resampling.BILINEAR)
        picture.resize((size, size), Image.Resampling.BILINEAR).save(
            os.path.join(destination, f"{number:06d}.jpg"), quality=90)
    return count


def main():
    args = parse_args()
    counts = {"train": args.train, "validation": args.eval, "test": args.eval}
    jobs = []
    for split, total in counts.items():
        labels = sorted(os.listdir(os.path.join(args.source, split)))
        for label_number, label in enumerate(labels):
            folder = os.path.join(args.source, split, label)
            sources = [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
            destination = os.path.join(args.output, split, label)
            os.makedirs(destination, exist_ok=True)
            share = total // len(labels) + (label_number < total % len(labels))
            for first in range(0, share, 500):
                jobs.append((sources, destination, first, min(500, share - first), args.size,
                             f"{args.seed}/{split}/{label}/{first}"))
    with ProcessPoolExecutor() as pool:
        written = sum(pool.map(write_images, jobs))
    print(f"wrote {written} images of {args.size}x{args.size} under {args.output}")


if __name__ == "__main__":
    main()
