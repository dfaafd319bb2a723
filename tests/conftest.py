"""Paths to the real beans images and the pretrained DeiT-tiny that the tests run on.

They default to ../shared beside the checkout; BEANS_DIR and MODEL_DIR point elsewhere (a GPU machine's copy).
"""
import os
import shutil
from pathlib import Path

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
