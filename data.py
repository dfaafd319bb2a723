"""Turns an image-classification dataset (a hub id or a local split/label/image folder) into tensors.

Every image is decoded, converted to RGB and run through the model's image processor once, up front:
beans is small enough to keep in memory, so no epoch pays for JPEG decoding again.
"""
import io
import os

import torch
from datasets import ClassLabel, DatasetDict
from datasets import Image as ImageFeature
from datasets import load_dataset
from PIL import Image, ImageOps
from torch.utils.data import TensorDataset

REQUIRED_SPLITS = ("train", "validation")


class InputError(ValueError):
    """A dataset, model or path given by the user that cannot be used; the message names it and the fix."""


def looks_like_path(dataset):
    return dataset.startswith((os.sep, ".", "~")) or os.path.exists(dataset)


def load_splits(dataset):
    """Loads a hub dataset or a local image folder as a DatasetDict with columns `image` (undecoded) and `labels`."""
    if looks_like_path(dataset):
        path = os.path.expanduser(dataset)
        if not os.path.isdir(path):
            raise InputError(f"dataset directory {dataset} does not exist; pass a hub id such as beans, "
                            "or a directory laid out as split/label/image")
        try:
            splits = load_dataset("imagefolder", data_dir=path)
        except FileNotFoundError as error:
            raise InputError(f"no images found under {dataset} ({error}); lay it out as split/label/image") from None
    else:
        try:
            splits = load_dataset(dataset)
        except Exception as error:  # offline, unknown id, gated: all end the same way for the user
            raise InputError(f"cannot load dataset '{dataset}' from the Hugging Face hub ({type(error).__name__}: "
                            f"{error}); offline, pass a local copy: --dataset /path/to/split/label/images") from None
    for name in REQUIRED_SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise InputError(f"dataset {dataset} has no {name} split (found: {', '.join(splits) or 'none'}); "
                            f"put its images in {name}/<label>/")
    return DatasetDict({name: standardise_columns(split, dataset, name) for name, split in splits.items()})


def standardise_columns(split, dataset, split_name):
    label_columns = [name for name, feature in split.features.items() if isinstance(feature, ClassLabel)]
    image_columns = [name for name, feature in split.features.items() if isinstance(feature, ImageFeature)]
    if len(label_columns) != 1 or len(image_columns) != 1:
        raise InputError(f"{split_name} split of {dataset} needs one image column and one class-label column, "
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
            raise InputError(f"the {split_name} split of {dataset} has other labels than train "
                            f"(only in {split_name}: {extra or 'none'}; missing from {split_name}: {missing or 'none'}); "
                            "every split needs the same label folders, each with images")
    if len(in_train) < len(names):
        raise InputError(f"dataset {dataset} declares labels {names} but train has images of only "
                        f"{sorted(names[i] for i in in_train)}")
    return names


def open_rgb(image):
    """Decodes one undecoded `image` cell ({"bytes", "path"}) to an upright RGB picture."""
    source = io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]
    try:
        with Image.open(source) as picture:
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read image {image['path']}: {error}") from None


def to_tensors(split, image_processor, chunk_size=64):
    """Preprocesses a whole split into a TensorDataset of (pixel_values, labels)."""
    pixel_values = []
    for start in range(0, len(split), chunk_size):
        images = [open_rgb(image) for image in split[start:start + chunk_size]["image"]]
        pixel_values.append(torch.from_numpy(image_processor(images, return_tensors="np")["pixel_values"]))
    return TensorDataset(torch.cat(pixel_values), torch.tensor(split["labels"], dtype=torch.long))
