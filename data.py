"""Which dataset: a hub id, or a local copy in any form users keep one, read as splits of undecoded images and
class labels.

Accepted local copies: an image folder laid out as split/label/image, a snapshot of a hub dataset repository
(parquet or arrow shards), or a DatasetDict written by `save_to_disk`. How the images then reach the training
device is images.py's job.
"""
import os

from datasets import ClassLabel, DatasetDict
from datasets import Image as ImageFeature
from datasets import disable_progress_bars, load_dataset, load_from_disk
from datasets.data_files import SPLIT_KEYWORDS
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

from errors import RunError
from hub import looks_like_path

REQUIRED_SPLITS = ("train", "validation")
SHARD_EXTENSIONS = (".parquet", ".arrow")
ACCEPTED_LAYOUTS = ("split/label/image folders (train/healthy/1.jpg), a hub dataset snapshot with parquet or arrow "
                    "shards (data/train-00000-of-00001.parquet), or a DatasetDict saved with save_to_disk")


def load_splits(dataset, image_column=None, label_column=None):
    """Loads a dataset as a DatasetDict with columns `image` (undecoded: {"bytes", "path"}) and `labels`."""
    if looks_like_path(dataset):
        disable_progress_bars()  # a local copy's "Downloading data" and "Generating split" bars tell nothing
        splits = load_local(dataset)
    else:
        try:
            splits = load_dataset(dataset)
        except Exception as error:  # an unknown id, a gated dataset (an unreachable hub is said before: hub.py)
            raise RunError(f"cannot load dataset '{dataset}' from the Hugging Face hub ({type(error).__name__}: "
                            f"{str(error).splitlines()[0]}); check the id, or pass a local copy: "
                            "--dataset /path/to/split/label/images") from None
    for name in REQUIRED_SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise RunError(f"dataset {dataset} has no {name} split (found: {', '.join(splits) or 'none'}); "
                            f"put its images in {name}/<label>/")
    return DatasetDict({name: standardise_columns(split, dataset, name, image_column, label_column)
                        for name, split in splits.items()})


def load_local(dataset):
    path = os.path.expanduser(dataset)
    if not os.path.isdir(path):
        raise RunError(f"dataset directory {dataset} does not exist; pass a hub id such as beans, or a directory "
                       f"holding {ACCEPTED_LAYOUTS}")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return load_from_disk(path)
    if os.path.isfile(os.path.join(path, "state.json")):
        raise RunError(f"{dataset} holds a single Dataset saved with save_to_disk; save a DatasetDict with train "
                       "and validation splits instead")
    shards = [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names
              if name.endswith(SHARD_EXTENSIONS)]
    if shards:
        try:
            return load_dataset(path)
        except Exception as error:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            broken = unreadable_parquet(shards)
            raise RunError(f"cannot load the dataset shards under {dataset}: "
                           + (f"{broken} is unreadable ({reason}); replace or remove it" if broken else reason)) from None
    # listing the files for the loader saves it matching dozens of split-name patterns against each (minutes for
    # tens of thousands of images)
    return load_dataset("imagefolder", data_files=image_folder_files(path, dataset))


def unreadable_parquet(shards):
    """The first of the parquet `shards` that pyarrow cannot open, or None."""
    import pyarrow.parquet
    for shard in sorted(shards):
        if shard.endswith(".parquet"):
            try:
                pyarrow.parquet.read_schema(shard)
            except Exception:  # whatever pyarrow says: the caller gives the loader's own words
                return shard
    return None


def visible_entries(directory):
    return sorted((entry for entry in os.scandir(directory) if not entry.name.startswith(".")), key=lambda e: e.name)


def image_folder_files(path, dataset):
    """The image files of each split of an image folder, its split folders named as the hub names them (val, valid
    and dev are validation). Refuses a folder of none of the accepted layouts, and what the image-folder loader
    would otherwise drop without a word: files beside the label folders, empty label folders, and files that are
    not images."""
    split_folders = [entry for entry in visible_entries(path) if entry.is_dir()]  # a LICENSE beside them is fine
    if not any(label.is_dir() for split in split_folders for label in visible_entries(split.path)):
        found = ", ".join(entry.name + ("/" if entry.is_dir() else "") for entry in visible_entries(path)[:8])
        raise RunError(f"{dataset} holds none of the accepted dataset layouts (found: {found or 'nothing'}); "
                       f"accepted: {ACCEPTED_LAYOUTS}")
    split_names = {keyword: str(split) for split, keywords in SPLIT_KEYWORDS.items() for keyword in keywords}
    files = {}
    for split in split_folders:
        for label in visible_entries(split.path):
            if not label.is_dir():
                raise RunError(f"stray file {label.path}: images go in {split.name}/<label>/; move or delete it")
            images = visible_entries(label.path)
            if not images:
                raise RunError(f"label folder {label.path} is empty; add its images or remove the folder")
            for image in images:
                if os.path.splitext(image.name)[1].lower() not in ImageFolder.EXTENSIONS:
                    raise RunError(f"{image.path} is not an image file (by its extension); move or delete it")
            files.setdefault(split_names.get(split.name, split.name), []).extend(image.path for image in images)
    return files


def is_image(feature):
    """An Image feature, or what one is stored as: a {bytes, path} struct (an image column written by pandas)."""
    return isinstance(feature, ImageFeature) or (isinstance(feature, dict) and set(feature) == {"bytes", "path"})


# what the column is, what it is called where its type does not say (as the Hugging Face examples call it), its flag
COLUMNS = {"image": (is_image, ("image", "img"), "--image_column"),
           "label": (lambda feature: isinstance(feature, ClassLabel), ("label", "labels"), "--label_column")}


def find_column(split, kind, wanted, split_name):
    """The column named by the flag (`wanted`), else the one column of its kind's type, else the one of its kind's
    names; None when neither tells."""
    is_kind, names, flag = COLUMNS[kind]
    if wanted is not None:
        if wanted not in split.column_names:
            raise RunError(f"{flag} {wanted} is not a column of the {split_name} split "
                           f"(columns: {', '.join(split.column_names)})")
        return wanted
    for found in ([name for name, feature in split.features.items() if is_kind(feature)],
                  [name for name in split.column_names if name in names]):
        if len(found) == 1:
            return found[0]
    return None


def standardise_columns(split, dataset, split_name, image_column=None, label_column=None):
    image = find_column(split, "image", image_column, split_name)
    label = find_column(split, "label", label_column, split_name)
    unknown = [kind for kind, column in (("image", image), ("label", label)) if column is None]
    if unknown:
        flags = " and ".join(f"{COLUMNS[kind][2]} NAME" for kind in unknown)
        raise RunError(f"cannot tell the {' and '.join(unknown)} column of the {split_name} split of {dataset} by type "
                       f"or name (features: {dict(split.features)}); name {'them' if len(unknown) > 1 else 'it'} with "
                       f"{flags}")
    split = split.select_columns([image, label]).rename_columns({image: "image", label: "labels"})
    if not isinstance(split.features["labels"], ClassLabel):  # strings or numbers: their sorted values are classes
        split = split.class_encode_column("labels")
    return split.cast_column("image", ImageFeature(decode=False))


def labels_of(split):
    """The label column as a list, read in one batch (indexing datasets' Column object reads row by row: minutes
    for a large split)."""
    return split.select_columns(["labels"])[:]["labels"]


def label_names(splits, dataset):
    """The class names, after checking that every split holds exactly the classes the train split holds."""
    names = splits["train"].features["labels"].names
    in_train = set(labels_of(splits["train"]))
    for split_name, split in splits.items():
        if split.features["labels"].names != names:
            raise RunError(f"the {split_name} split of {dataset} names its classes {split.features['labels'].names}, "
                           f"train names them {names}; give every split the same classes")
        present = set(labels_of(split))
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


def random_subsets(splits, max_train_samples, max_eval_samples, seed):
    """A random subset of each split for a quick trial (the same subset for the same seed); None keeps it whole."""
    def subset(split, count):
        return split if count is None or count >= len(split) else split.shuffle(seed=seed).select(range(count))
    return DatasetDict({name: subset(split, max_train_samples if name == "train" else max_eval_samples)
                        for name, split in splits.items()})
