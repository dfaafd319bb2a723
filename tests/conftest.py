"""Paths to the real beans images and the pretrained DeiT-tiny that the tests run on.

Each is found in BEANS_DIR / MODEL_DIR if set, else in ../shared beside the checkout, else downloaded once from the
Hugging Face hub (`beans`, written out as split/label/image; `facebook/deit-tiny-patch16-224`) into
TEST_DATA_CACHE (default ~/.cache/vit-finetuning-tests). Offline with none of them, the tests stop with one line
saying what to set.
"""
import os
import shutil
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TEST_DATA_CACHE", Path.home() / ".cache" / "vit-finetuning-tests"))
MISSING = ("the tests need the beans images and a small pretrained ViT: set BEANS_DIR (a split/label/image copy "
           "of beans) and MODEL_DIR (facebook/deit-tiny-patch16-224 saved locally), put them in ../shared/datasets/"
           "beans and ../shared/models/deit-tiny-patch16-224, or go online once to download them")


def download_beans(destination):
    from datasets import load_dataset

    splits = load_dataset("beans")
    for split_name, split in splits.items():
        names = split.features["labels"].names
        for number, row in enumerate(split.cast_column("image", ImageFeature(decode=False))):
            folder = destination / split_name / names[row["labels"]]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{names[row['labels']]}_{split_name}_{number}.jpg").write_bytes(row["image"]["bytes"])


def download_model(destination):
    from huggingface_hub import snapshot_download

    snapshot_download("facebook/deit-tiny-patch16-224", local_dir=destination)


def locate(variable, shared, cached, download):
    if variable in os.environ:
        return Path(os.environ[variable])
    if shared.exists():
        return shared
    if not cached.exists():
        try:
            download(cached.with_suffix(".partial"))
        except Exception:  # offline, or the hub unreachable: the same one line either way
            raise SystemExit(f"error: {MISSING}")
        cached.with_suffix(".partial").rename(cached)
    return cached


BEANS_DIR = locate("BEANS_DIR", ROOT.parent / "shared" / "datasets" / "beans", CACHE / "beans", download_beans)
MODEL_DIR = locate("MODEL_DIR", ROOT.parent / "shared" / "models" / "deit-tiny-patch16-224",
                   CACHE / "deit-tiny-patch16-224", download_model)
LABELS = ["angular_leaf_spot", "bean_rust", "healthy"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where there is none")


def copy_beans(destination, per_label, splits=("train", "validation", "test"), labels=LABELS):
    """A small image-folder copy of beans: the first `per_label` real images of each label in each split."""
    for split in splits:
        for label in labels:
            (destination / split / label).mkdir(parents=True)
            for image in sorted((BEANS_DIR / split / label).iterdir())[:per_label]:
                shutil.copy(image, destination / split / label / image.name)
    return destination


def write_hub_snapshot(image_folder, destination):
    """The image folder as the hub keeps a dataset repository: parquet shards data/<split>-00000-of-00001.parquet
    with the hub beans' columns (image_file_path, image with its bytes inside, labels) and a dataset card."""
    features = Features({"image_file_path": Value("string"), "image": ImageFeature(),
                         "labels": ClassLabel(names=LABELS)})
    (destination / "data").mkdir(parents=True)
    for split in sorted(path.name for path in image_folder.iterdir()):
        paths = sorted((image_folder / split).glob("*/*"))
        rows = {"image_file_path": [str(path) for path in paths],
                "image": [{"bytes": path.read_bytes(), "path": path.name} for path in paths],
                "labels": [LABELS.index(path.parent.name) for path in paths]}
        shard = destination / "data" / f"{split}-00000-of-00001.parquet"
        Dataset.from_dict(rows, features=features).to_parquet(str(shard))
    (destination / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# beans\n")
    return destination
