"""Turns an image-classification dataset (a hub id or a local split/label/image folder) into tensors.

Every image is decoded, converted to RGB and run through the model's image processor once, up front, and the
result is kept on the training device: beans (1295 images, 780 MB as float32) is small enough, so no epoch pays for
JPEG decoding or host-to-device copies again. A dataset too large for that would need a streaming loader instead.
"""
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from datasets import ClassLabel, DatasetDict
from datasets import Image as ImageFeature
from datasets import load_dataset
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps
import torch.nn.functional as F
from torch.utils.data import TensorDataset

REQUIRED_SPLITS = ("train", "validation")


class RunError(Exception):
    """A run that cannot go on (a bad dataset, model or path, a full disk, a diverged loss): the one-line message
    names what is wrong and the fix."""


def looks_like_path(dataset):
    return dataset.startswith((os.sep, ".", "~")) or os.path.exists(dataset)


def load_splits(dataset):
    """Loads a hub dataset or a local image folder as a DatasetDict with columns `image` (undecoded) and `labels`."""
    if looks_like_path(dataset):
        path = os.path.expanduser(dataset)
        if not os.path.isdir(path):
            raise RunError(f"dataset directory {dataset} does not exist; pass a hub id such as beans, "
                           "or a directory laid out as split/label/image")
        check_layout(path)
        try:
            splits = load_dataset("imagefolder", data_dir=path)
        except FileNotFoundError as error:
            raise RunError(f"no images found under {dataset} ({error}); lay it out as split/label/image") from None
    else:
        try:
            splits = load_dataset(dataset)
        except Exception as error:  # offline, unknown id, gated: all end the same way for the user
            raise RunError(f"cannot load dataset '{dataset}' from the Hugging Face hub ({type(error).__name__}: "
                            f"{error}); offline, pass a local copy: --dataset /path/to/split/label/images") from None
    for name in REQUIRED_SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise RunError(f"dataset {dataset} has no {name} split (found: {', '.join(splits) or 'none'}); "
                            f"put its images in {name}/<label>/")
    return DatasetDict({name: standardise_columns(split, dataset, name) for name, split in splits.items()})


def visible_entries(directory):
    return sorted((entry for entry in os.scandir(directory) if not entry.name.startswith(".")), key=lambda e: e.name)


def check_layout(path):
    """Refuses what the image-folder loader would otherwise drop without a word: files beside the label folders,
    empty label folders, and files that are not images."""
    for split in visible_entries(path):
        if not split.is_dir():
            continue  # a LICENSE or README beside the split folders is fine
        for label in visible_entries(split.path):
            if not label.is_dir():
                raise RunError(f"stray file {label.path}: images go in {split.name}/<label>/; move or delete it")
            files = visible_entries(label.path)
            if not files:
                raise RunError(f"label folder {label.path} is empty; add its images or remove the folder")
            for file in files:
                if os.path.splitext(file.name)[1].lower() not in ImageFolder.EXTENSIONS:
                    raise RunError(f"{file.path} is not an image file (by its extension); move or delete it")


def standardise_columns(split, dataset, split_name):
    label_columns = [name for name, feature in split.features.items() if isinstance(feature, ClassLabel)]
    image_columns = [name for name, feature in split.features.items() if isinstance(feature, ImageFeature)]
    if len(label_columns) != 1 or len(image_columns) != 1:
        raise RunError(f"{split_name} split of {dataset} needs one image column and one class-label column, "
                        f"found features {dict(split.features)}")
    split = split.select_columns([image_columns[0], label_columns[0]])
    split = split.rename_columns({image_columns[0]: "image", label_columns[0]: "labels"})
    return split.cast_column("image", ImageFeature(decode=False))


def label_names(splits, dataset):
    """The class names, after checking that every split holds exactly the classes the train split holds."""
    names = splits["train"].features["labels"].names
    in_train = set(splits["train"]["labels"])
    for split_name, split in splits.items():
        present = set(split["labels"])
        if present != in_train:
            extra = sorted(names[i] for i in present - in_train)
            missing = sorted(names[i] for i in in_train - present)
            raise RunError(f"the {split_name} split of {dataset} has other labels than train "
                            f"(only in {split_name}: {extra or 'none'}; missing from {split_name}: {missing or 'none'}); "
                            "every split needs the same label folders, each with images")
    if len(in_train) < len(names):
        raise RunError(f"dataset {dataset} declares labels {names} but train has images of only "
                        f"{sorted(names[i] for i in in_train)}")
    return names


def open_rgb(image):
    """Decodes one undecoded `image` cell ({"bytes", "path"}) to an upright RGB picture."""
    source = io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]
    try:
        with Image.open(source) as picture:
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RunError(f"cannot read image {image['path']}: {error}") from None


def to_tensors(split, image_processor, device="cpu", chunk_size=64):
    """Preprocesses a whole split into a TensorDataset of (pixel_values, labels) on `device`.

    Chunks of images are decoded and preprocessed on parallel threads: Pillow and NumPy release the GIL there."""
    def preprocess(start):
        images = [open_rgb(image) for image in split[start:start + chunk_size]["image"]]
        return torch.from_numpy(image_processor(images, return_tensors="np")["pixel_values"])

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        pixel_values = list(pool.map(preprocess, range(0, len(split), chunk_size)))
    return TensorDataset(torch.cat(pixel_values).to(device), torch.tensor(split["labels"], device=device))


def random_resized_crop_and_flip(pixel_values, min_area=0.5, max_aspect=4 / 3):
    """A random crop of each image (min_area to all of it, aspect ratio up to max_aspect either way), resized back
    to full size and flipped left-right half of the time: one batched resampling on the batch's own device."""
    count, device = len(pixel_values), pixel_values.device
    area = torch.empty(count, device=device).uniform_(min_area, 1.0)
    aspect = torch.empty(count, device=device).uniform_(-math.log(max_aspect), math.log(max_aspect)).exp()
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(count, device=device) < 0.5, -1.0, 1.0)
    # affine_grid works in [-1, 1] coordinates: scale to the crop's size, shift its centre anywhere it still fits
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2] = (torch.rand(count, device=device) * 2 - 1) * (1 - width)
    theta[:, 1, 2] = (torch.rand(count, device=device) * 2 - 1) * (1 - height)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid.to(pixel_values.dtype), mode="bilinear", align_corners=False)
