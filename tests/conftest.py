"""Paths to the real beans images and the pretrained DeiT-tiny that the tests run on.

They default to ../shared beside the checkout; BEANS_DIR and MODEL_DIR point elsewhere (a GPU machine's copy).
"""
import os
import shutil
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature

ROOT = Path(__file__).resolve().parent.parent
BEANS_DIR = Path(os.environ.get("BEANS_DIR", ROOT.parent / "shared" / "datasets" / "beans"))
MODEL_DIR = Path(os.environ.get("MODEL_DIR", ROOT.parent / "shared" / "models" / "deit-tiny-patch16-224"))
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
        Dataset.from_dict(rows, features=features).to_parquet(str(destination / "data" / f"{split}-00000-of-00001.parquet"))
    (destination / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# beans\n")
    return destination
