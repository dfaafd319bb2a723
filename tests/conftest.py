"""Paths to the real beans images and the pretrained DeiT-tiny that the tests run on.

Each is found in BEANS_DIR / MODEL_DIR if set, else in ../shared beside the checkout, else downloaded once from the
Hugging Face hub (`beans`, written out as split/label/image; `facebook/deit-tiny-patch16-224`) into
TEST_DATA_CACHE (default ~/.cache/vit-finetuning-tests). Where they cannot be downloaded, the tests stop with one
line saying why and what to set. Once the data is local, the runs the tests start never ask the hub (HF_HUB_OFFLINE).
"""
import fcntl
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from colossalai.testing import free_port
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from hub import unreachable_reason

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TEST_DATA_CACHE", Path.home() / ".cache" / "vit-finetuning-tests"))
MISSING = ("the tests need the beans images and a small pretrained ViT: set BEANS_DIR (a split/label/image copy "
           "of beans) and MODEL_DIR (facebook/deit-tiny-patch16-224 saved locally), or put them in "
           "../shared/datasets/beans and ../shared/models/deit-tiny-patch16-224")


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
        reason = unreachable_reason()
        if reason is None:
            try:
                download(cached.with_suffix(".partial"))
            except Exception as error:  # whatever the download met, said with what to do instead
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if reason:
            raise SystemExit(f"error: cannot download {cached.name}: {reason}; {MISSING}")
        cached.with_suffix(".partial").rename(cached)
    return cached


BEANS_DIR = locate("BEANS_DIR", ROOT.parent / "shared" / "datasets" / "beans", CACHE / "beans", download_beans)
MODEL_DIR = locate("MODEL_DIR", ROOT.parent / "shared" / "models" / "deit-tiny-patch16-224",
                   CACHE / "deit-tiny-patch16-224", download_model)
LABELS = ["angular_leaf_spot", "bean_rust", "healthy"]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything the tests read is local now


def example_env(gpu=False, **variables):
    """The environment of one run of the example: this one, a free rendezvous port and `variables` as strings. The
    CPU tests' runs see no GPU on a machine that has one too (GPUNUM=2 would want two there); `gpu` shows it."""
    env = {**os.environ, "MASTER_PORT": str(free_port()), **{name: str(value) for name, value in variables.items()}}
    return env if gpu else {**env, "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture
def default_port_taken():
    """The default rendezvous port, 29500, held as another job on the machine would hold it, by one test at a time
    (a lock file orders the tests that take it when several run at once, pytest -n): returns the port."""
    with open(os.path.join(tempfile.gettempdir(), "vit-finetuning-tests-port-29500.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released as the file closes
        with socket.socket() as busy:
            busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a finished run's closing connections
            busy.bind(("", 29500))
            busy.listen()
            yield 29500


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped where there is none")


# the tests that take longest where many run at once (bash test_ci.sh -n 14 on the 16-core GPU machine): started
# first, so that the run does not end waiting on one of them started last
LONGEST = ("test_two_nodes_train_the_same_model_as_one_node_with_two_processes",
           "test_streamed_run_holds_no_more_memory_on_a_dataset_eight_times_larger")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.name not in LONGEST)


# sizes of photos as users have them: the hub's beans originals (500x500), landscape and portrait
FULL_SIZES = [(500, 500), (640, 480), (375, 500)]


def copy_beans(destination, per_label, splits=("train", "validation", "test"), labels=LABELS, full_size=False):
    """An image-folder copy of beans: the first `per_label` real images (all: None) of each label in each split.
    full_size: each scaled up to one of FULL_SIZES in turn and saved as a JPEG, as the test copies in ../shared are
    224 px, where resizing to the model's resolution changes nothing."""
    for split in splits:
        for label in labels:
            (destination / split / label).mkdir(parents=True)
            for number, image in enumerate(sorted((BEANS_DIR / split / label).iterdir())[:per_label]):
                if full_size:
                    with Image.open(image) as picture:
                        picture.resize(FULL_SIZES[number % len(FULL_SIZES)], Image.Resampling.BICUBIC).save(
                            destination / split / label / image.name, quality=90)
                else:
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
