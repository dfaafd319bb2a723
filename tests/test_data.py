import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pandas
import psutil
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoImageProcessor
from transformers.image_utils import load_image

from conftest import BEANS_DIR, LABELS, MODEL_DIR, copy_beans, write_hub_snapshot
from data import label_names, load_splits, random_subsets, standardise_columns
from errors import RunError
from images import (Decoder, SplitImages, augmentation_draws, device_images, evaluation_index_batches,
                    random_resized_crop_and_flip, split_images, training_index_batches)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def image_processor():
    return AutoImageProcessor.from_pretrained(MODEL_DIR, use_fast=True)


def decoded(splits, decoder, device, cached, **options):
    """split_images with the caches filled, as a run has them once set up."""
    images, fill_caches = split_images(splits, decoder, device, cached, **options)
    fill_caches()
    return images


def to_tensors(split, image_processor, cached=True, skip_unreadable=False):
    """Every image of `split` as model input, and its labels, through SplitImages in one batch."""
    images = decoded({"split": split}, Decoder(image_processor), CPU, cached, num_workers=1,
                     skip_unreadable=skip_unreadable)["split"]
    pixel_values, labels, _ = next(images.device_batches([list(range(len(split)))]))
    return pixel_values, labels


def test_local_beans_loads_with_its_splits_and_labels():
    splits = load_splits(str(BEANS_DIR))
    assert {name: len(split) for name, split in splits.items()} == {"train": 1034, "validation": 133, "test": 128}
    assert label_names(splits, str(BEANS_DIR)) == LABELS


@pytest.fixture(scope="module")
def full_size_validation(tmp_path_factory):
    folder = copy_beans(tmp_path_factory.mktemp("full_size"), per_label=1, splits=["train"])
    return copy_beans(folder, per_label=None, splits=["validation"], full_size=True)


@pytest.mark.parametrize("sizes", ["224 px", "full size"])
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streamed"])
def test_whole_split_becomes_what_the_saved_model_is_served(image_processor, full_size_validation, cached, sizes):
    folder = BEANS_DIR if sizes == "224 px" else full_size_validation
    split = load_splits(str(folder))["validation"]
    pixel_values, labels = to_tensors(split, image_processor, cached)
    assert pixel_values.shape == (133, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [44, 45, 44]
    # ImageNet mean/std normalisation: values spread around 0, within the range of (0 - 0.485) / 0.229 and so on
    assert -2.2 < pixel_values.min() < -1.0 and 1.0 < pixel_values.max() < 2.7
    # what `pipeline` makes of each file (predict.py serves through it), up to the float rounding of the same pixels
    served = image_processor([load_image(cell["path"]) for cell in split["image"]], return_tensors="pt")["pixel_values"]
    assert (pixel_values - served).abs().max() < 1e-5


def test_cached_and_streamed_batches_are_the_same(image_processor):
    # two splits decoded by one pool of workers, in chunks that end inside each split: every image lands in its place
    beans = load_splits(str(BEANS_DIR))
    splits = {"train": beans["train"].select(range(40)), "validation": beans["validation"].select(range(13))}
    decoder = Decoder(image_processor)
    children = set(psutil.Process().children())
    cached, fill_caches = split_images(splits, decoder, CPU, True, num_workers=2, skip_unreadable=False, chunk_size=7)
    # the workers start in the calling thread (forked from a background thread, they hung a run) ...
    assert len(set(psutil.Process().children()) - children) == 2
    with ThreadPoolExecutor(max_workers=1) as background:  # ... which is where a run fills the caches
        background.submit(fill_caches).result()
    assert not set(psutil.Process().children()) - children  # and they end with the last chunk
    streamed = decoded(splits, decoder, CPU, False, num_workers=2, skip_unreadable=False)
    for name, index_batches in (("train", [[3, 1, 4], [1, 5, 9, 2, 6], [39]]), ("validation", [[12, 0, 7]])):
        cached_batches, streamed_batches = (list(images[name].device_batches(index_batches))
                                            for images in (cached, streamed))
        for (cached_pixels, cached_labels, _), (streamed_pixels, streamed_labels, _) in zip(cached_batches,
                                                                                             streamed_batches):
            assert torch.equal(cached_pixels, streamed_pixels) and torch.equal(cached_labels, streamed_labels)
        assert [len(labels) for _, labels, _ in streamed_batches] == [len(batch) for batch in index_batches]


class MarkingDecoder(Decoder):
    """A Decoder that leaves a file in `marks` for each batch it decodes (in whichever worker process)."""

    def __init__(self, image_processor, marks):
        super().__init__(image_processor)
        self.marks = marks

    def __call__(self, images):
        (self.marks / f"{os.getpid()}-{time.monotonic_ns()}").touch()
        return super().__call__(images)


def test_a_streamed_pass_decodes_before_its_first_batch_is_asked_for(tmp_path, image_processor):
    split = load_splits(str(BEANS_DIR))["validation"].select(range(8))
    images = SplitImages(split, MarkingDecoder(image_processor, tmp_path), CPU, cached=False, num_workers=2,
                         skip_unreadable=False)
    upcoming = images.device_batches([[0, 1], [2, 3]])
    deadline = time.monotonic() + 120
    while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(tmp_path.iterdir())) == 2  # both batches decoded, none asked for yet
    assert [labels.tolist() for _, labels, _ in upcoming] == [split["labels"][0:2], split["labels"][2:4]]


def test_hub_style_columns_are_renamed():
    features = Features({"image_file_path": Value("string"), "image": ImageFeature(),
                         "labels": ClassLabel(names=LABELS)})
    image = str(next((BEANS_DIR / "test" / "healthy").iterdir()))
    hub_split = Dataset.from_dict({"image_file_path": [image], "image": [image], "labels": [2]}, features=features)
    split = standardise_columns(hub_split, "beans", "train")
    assert split.column_names == ["image", "labels"] and split[0]["labels"] == 2
    assert split[0]["image"]["path"] == image


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(tmp_path, image_processor, mode):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    rgb_path = sorted((beans / "train" / "healthy").iterdir())[0]
    rgb = Image.open(rgb_path).convert("RGB")
    rgb_path.unlink()
    converted = rgb.convert("L").convert(mode) if mode == "I;16" else rgb.convert(mode)
    converted_path = rgb_path.with_suffix(".jpg" if mode in ("L", "CMYK") else ".png")
    converted.save(converted_path)
    rgb.save(beans / "train" / "healthy" / "reference.png")
    split = load_splits(str(beans))["train"]
    pixel_values, _ = to_tensors(split, image_processor)
    assert pixel_values.shape == (7, 3, 224, 224) and torch.isfinite(pixel_values).all()
    paths = [cell["path"] for cell in split["image"]]
    image, reference = (pixel_values[paths.index(str(path))]
                        for path in (converted_path, rgb_path.parent / "reference.png"))
    # what serving makes of the same file
    served = image_processor(load_image(str(converted_path)), return_tensors="pt")["pixel_values"][0]
    assert (image - served).abs().max() < 1e-5
    if mode in ("L", "I;16"):  # grey: the same values in each channel, before normalisation
        unnormalised = image * torch.tensor(image_processor.image_std).view(3, 1, 1) + \
            torch.tensor(image_processor.image_mean).view(3, 1, 1)
        assert torch.allclose(unnormalised[0], unnormalised[1], atol=1e-5)
        assert torch.allclose(unnormalised[1], unnormalised[2], atol=1e-5)
    elif mode == "RGBA":  # an opaque RGBA picture gives exactly the pixels of its RGB original
        assert torch.equal(image, reference)
    else:  # a palette or CMYK picture: the original's colours, up to dithering and JPEG (its mean colour holds)
        assert (image.mean(dim=(1, 2)) - reference.mean(dim=(1, 2))).abs().max() < 0.1


def test_missing_dataset_directory_is_named():
    with pytest.raises(RunError, match="dataset directory ./no/such/beans does not exist"):
        load_splits("./no/such/beans")


def test_unreachable_hub_dataset_says_how_to_run_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    with pytest.raises(RunError, match="cannot load dataset 'beans' from the Hugging Face hub.*--dataset"):
        load_splits("beans")


def test_missing_validation_split_is_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "test"))
    with pytest.raises(RunError, match=f"dataset {beans} has no validation split"):
        load_splits(str(beans))


def test_empty_train_split_is_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("validation",))
    (beans / "train").mkdir()
    with pytest.raises(RunError, match="has no train split"):
        load_splits(str(beans))


def test_empty_label_folder_is_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    (beans / "validation" / "mosaic_virus").mkdir()
    with pytest.raises(RunError, match=f"label folder {beans / 'validation' / 'mosaic_virus'} is empty"):
        load_splits(str(beans))


def test_stray_file_at_the_split_level_is_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    shutil.copy(next((beans / "train" / "healthy").iterdir()), beans / "train" / "leaf.jpg")
    with pytest.raises(RunError, match=f"stray file {beans / 'train' / 'leaf.jpg'}: images go in train/<label>/"):
        load_splits(str(beans))


def test_file_that_is_not_an_image_is_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    (beans / "train" / "healthy" / "notes.txt").write_text("picked on Monday")
    with pytest.raises(RunError, match=f"{beans / 'train' / 'healthy' / 'notes.txt'} is not an image file"):
        load_splits(str(beans))


def test_directory_without_images_is_named(tmp_path):
    (tmp_path / "beans" / "train").mkdir(parents=True)
    with pytest.raises(RunError, match=f"{tmp_path / 'beans'} holds none of the accepted dataset layouts "
                                       r"\(found: train/\)"):
        load_splits(str(tmp_path / "beans"))


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streamed"])
@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_image_is_named_or_skipped_and_counted(tmp_path, image_processor, damage, cached):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    broken = sorted((beans / "train" / "bean_rust").iterdir())[0]
    content = broken.read_bytes()
    broken.write_bytes(content[:len(content) // 2] if damage == "truncated" else b"<html>not a picture</html>")
    train = load_splits(str(beans))["train"]
    with pytest.raises(RunError, match=f"cannot read image {broken}: .*; replace or remove it, or pass "
                                       "--skip_unreadable"):
        to_tensors(train, image_processor, cached)
    images = decoded({"train": train}, Decoder(image_processor), CPU, cached, num_workers=1,
                     skip_unreadable=True)["train"]
    pixel_values, labels, readable = next(images.device_batches([list(range(6))]))
    assert readable.tolist() == [True, True, False, True, True, True] and len(pixel_values) == len(labels) == 5
    assert torch.bincount(labels).tolist() == [2, 1, 2]
    assert [reason.split(": ")[0] for reason in images.unreadable] == [str(broken)]


@pytest.mark.parametrize("size", [(1, 1), (10000, 10000)])
def test_tiny_and_huge_images_are_resized(tmp_path, image_processor, size):
    beans = copy_beans(tmp_path / "beans", per_label=1, splits=("train", "validation"))
    Image.new("RGB", size, (40, 160, 60)).save(beans / "train" / "healthy" / "odd_size.jpg")
    pixel_values, _ = to_tensors(load_splits(str(beans))["train"], image_processor)
    assert pixel_values.shape == (4, 3, 224, 224) and torch.isfinite(pixel_values).all()


def test_hidden_files_and_files_beside_the_split_folders_are_ignored(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    (beans / "LICENSE").write_text("CC BY 4.0\n")
    (beans / ".DS_Store").write_bytes(b"\0\1")
    (beans / "train" / ".DS_Store").write_bytes(b"\0\1")
    (beans / "train" / "healthy" / ".hidden.jpg").write_bytes(b"not a picture")
    splits = load_splits(str(beans))
    assert {name: len(split) for name, split in splits.items()} == {"train": 6, "validation": 6}
    paths = [image["path"] for image in splits["train"][:]["image"]]
    assert sorted(os.path.basename(path) for path in paths) == sorted(
        path.name for path in (beans / "train").glob("*/*") if not path.name.startswith("."))


def test_a_picture_over_pillow_s_decompression_bomb_limit_is_refused_naming_the_file(tmp_path, image_processor):
    beans = copy_beans(tmp_path / "beans", per_label=1, splits=("train", "validation"))
    bomb = beans / "train" / "healthy" / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 megapixels, over twice Pillow's limit, in a few kilobytes
    with pytest.raises(RunError, match=f"cannot read image {bomb}: Image size \\(400000000 pixels\\) exceeds limit"):
        to_tensors(load_splits(str(beans))["train"], image_processor)


def test_exif_rotated_photo_is_turned_upright(tmp_path, image_processor):
    beans = copy_beans(tmp_path / "beans", per_label=1, splits=("train", "validation"))
    original_path = next((beans / "train" / "healthy").iterdir())
    upright = Image.open(original_path).convert("RGB")
    original_path.unlink()
    upright.save(beans / "train" / "healthy" / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be turned 90 degrees clockwise to be upright
    upright.transpose(Image.Transpose.ROTATE_90).save(beans / "train" / "healthy" / "rotated.png", exif=exif)
    pixel_values, labels = to_tensors(load_splits(str(beans))["train"], image_processor)
    healthy = pixel_values[labels == 2]
    assert len(healthy) == 2 and torch.equal(healthy[0], healthy[1])


def test_label_sets_that_differ_across_splits_are_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    shutil.copytree(beans / "validation" / "healthy", beans / "validation" / "mosaic_virus")
    with pytest.raises(RunError, match=r"validation split .*only in validation: \['mosaic_virus'\]"):
        label_names(load_splits(str(beans)), str(beans))


def test_augmentation_crops_and_flips_each_image_on_its_own(image_processor):
    pixel_values, _ = to_tensors(load_splits(str(BEANS_DIR))["validation"].select(range(16)), image_processor)
    draws = augmentation_draws(16, seed=0, epoch=0)
    augmented = random_resized_crop_and_flip(pixel_values, draws)
    assert augmented.shape == pixel_values.shape and torch.isfinite(augmented).all()
    assert not torch.allclose(augmented, pixel_values)
    # each image by its own draws: alone, or in another batch, it comes out the same
    assert torch.allclose(random_resized_crop_and_flip(pixel_values[5:6], draws[5:6]), augmented[5:6], atol=1e-6)
    assert torch.equal(draws, augmentation_draws(16, seed=0, epoch=0))
    assert not torch.equal(draws, augmentation_draws(16, seed=0, epoch=1))
    # with the whole area kept at its own aspect ratio, each image comes back as it was or mirrored, chosen per image
    whole = random_resized_crop_and_flip(pixel_values, draws, min_area=1.0, max_aspect=1.0)
    same = [torch.allclose(w, p, atol=1e-4) for w, p in zip(whole, pixel_values)]
    mirrored = [torch.allclose(w, p.flip(-1), atol=1e-4) for w, p in zip(whole, pixel_values)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)


def test_hub_snapshot_with_hub_column_names_loads_like_the_image_folder(tmp_path):
    beans = copy_beans(tmp_path / "folder", per_label=3)
    snapshot = write_hub_snapshot(beans, tmp_path / "snapshot")
    (snapshot / "README.md").unlink()  # a snapshot without its dataset card loads all the same
    splits = load_splits(str(snapshot))
    assert {name: len(split) for name, split in splits.items()} == {"train": 9, "validation": 9, "test": 9}
    assert label_names(splits, str(snapshot)) == LABELS
    assert splits["train"][0]["image"]["bytes"] is not None  # the images are inside the parquet shards


def test_save_to_disk_folder_loads(tmp_path):
    splits = load_splits(str(copy_beans(tmp_path / "folder", per_label=2)))
    splits.save_to_disk(str(tmp_path / "saved"))
    saved = load_splits(str(tmp_path / "saved"))
    assert {name: len(split) for name, split in saved.items()} == {"train": 6, "validation": 6, "test": 6}
    saved["train"].save_to_disk(str(tmp_path / "one_split"))
    with pytest.raises(RunError, match="holds a single Dataset saved with save_to_disk; save a DatasetDict"):
        load_splits(str(tmp_path / "one_split"))


@pytest.mark.parametrize("name", ["val", "valid", "dev"])
def test_other_names_of_the_validation_split_are_recognised(tmp_path, name):
    beans = copy_beans(tmp_path / "beans", per_label=2)
    (beans / "validation").rename(beans / name)
    assert len(load_splits(str(beans))["validation"]) == 6


def test_folder_of_no_accepted_layout_is_named_with_the_layouts(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("path,label\n")
    (tmp_path / "notes.txt").write_text("leaves")
    with pytest.raises(RunError, match=r"holds none of the accepted dataset layouts \(found: data/, notes.txt\); "
                                       r"accepted: split/label/image folders .*parquet or arrow shards.*save_to_disk"):
        load_splits(str(tmp_path))


def test_columns_are_found_by_type_or_named(tmp_path):
    features = Features({"photo": ImageFeature(), "thumbnail": ImageFeature(), "disease": Value("string")})
    image = str(next((BEANS_DIR / "test" / "healthy").iterdir()))
    split = Dataset.from_dict({"photo": [image] * 2, "thumbnail": [image] * 2, "disease": ["rust", "healthy"]},
                              features=features)
    with pytest.raises(RunError, match=r"^cannot tell the image and label column of the train split of leaves by type "
                                       r"or name \(features: .*\); name them with --image_column NAME and "
                                       r"--label_column NAME$"):
        standardise_columns(split, "leaves", "train")
    with pytest.raises(RunError, match=r"^cannot tell the label column .*; name it with --label_column NAME$"):
        standardise_columns(split, "leaves", "train", image_column="photo")
    with pytest.raises(RunError, match="--image_column picture is not a column of the train split "
                                       "\\(columns: photo, thumbnail, disease\\)"):
        standardise_columns(split, "leaves", "train", image_column="picture")
    named = standardise_columns(split, "leaves", "train", image_column="photo", label_column="disease")
    assert named.features["labels"].names == ["healthy", "rust"] and named["labels"] == [1, 0]


def test_a_parquet_file_written_from_pandas_trains_with_its_columns_found_by_name(tmp_path):
    """pandas writes an image column as {bytes, path} structs and labels as strings: found as the Hugging Face
    examples find them, by the names img and label."""
    for split in ("train", "validation"):
        paths = [path for label in ("healthy", "bean_rust")
                 for path in sorted((BEANS_DIR / split / label).iterdir())[:2]]
        frame = pandas.DataFrame({"img": [{"bytes": path.read_bytes(), "path": path.name} for path in paths],
                                  "label": [path.parent.name for path in paths], "note": ["leaf"] * 4})
        (tmp_path / "data").mkdir(exist_ok=True)
        frame.to_parquet(tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    splits = load_splits(str(tmp_path))
    assert splits["train"].features["labels"].names == ["bean_rust", "healthy"]
    assert splits["validation"]["labels"] == [1, 1, 0, 0]
    pixel_values, _ = to_tensors(splits["validation"], AutoImageProcessor.from_pretrained(MODEL_DIR, use_fast=True))
    assert pixel_values.shape == (4, 3, 224, 224)


def test_sample_limits_take_a_seeded_subset_of_each_split():
    splits = load_splits(str(BEANS_DIR))
    limited = random_subsets(splits, 100, 20, seed=1)
    assert {name: len(split) for name, split in limited.items()} == {"train": 100, "validation": 20, "test": 20}
    assert limited["train"]["image"] == random_subsets(splits, 100, 20, seed=1)["train"]["image"]
    assert random_subsets(splits, None, 500, seed=1)["validation"].num_rows == 133


def test_data_over_the_cache_budget_streams_and_says_why(image_processor):
    splits = load_splits(str(BEANS_DIR))
    lines = []
    images, _ = device_images(splits, image_processor, CPU, lines.append, cache_budget_gib=0.1, num_workers=2)
    assert lines == ["data: streaming 1295 images through 2 loader workers (0.18 GiB as uint8, over the 0.10 GiB "
                     "budget (--cache_budget_gib))"]
    assert not images["train"].cached
    small = random_subsets(splits, 64, 16, seed=0)
    images, _ = device_images(small, image_processor, CPU, lines.append, cache_budget_gib=0.1, num_workers=2)
    assert lines[-1] == "data: caching all 96 images on cpu, decoded by 2 loader workers (0.01 GiB as uint8, " \
                        "within the 0.10 GiB budget (--cache_budget_gib))"
    assert images["validation"].cached and len(images["validation"]) == 16


def test_training_index_batches_deal_one_shuffled_order_across_ranks():
    one = training_index_batches(40, 8, 0, 1, seed=3, epoch=2)
    assert len(one) == 5 and sorted(sum(one, [])) == list(range(40))
    two = [training_index_batches(40, 4, rank, 2, seed=3, epoch=2) for rank in (0, 1)]
    # the global batch of step s is the same 8 images whatever the number of ranks
    assert all(sorted(one[step]) == sorted(two[0][step] + two[1][step]) for step in range(5))
    assert training_index_batches(40, 8, 0, 1, seed=3, epoch=3) != one
    assert len(training_index_batches(41, 8, 0, 1, seed=0, epoch=0)) == 5  # the last, partial batch is dropped


def test_evaluation_index_batches_cover_every_example_once_with_equal_shapes_on_every_rank():
    shards = [evaluation_index_batches(133, 32, rank, 3) for rank in range(3)]
    assert [[len(batch) for batch in shard] for shard in shards] == [[32, 13]] * 3
    positions = sorted(sum(sum(shards, []), []))
    assert positions == list(range(135))  # 133 examples and two padding positions past the end
    whole = [evaluation_index_batches(133, 32, rank, 3, whole_batches=True) for rank in range(3)]
    assert [[len(batch) for batch in shard] for shard in whole] == [[32, 32]] * 3
    assert sorted(sum(sum(whole, []), []))[:133] == list(range(133))


def test_snapshot_of_arrow_shards_loads(tmp_path):
    load_splits(str(copy_beans(tmp_path / "folder", per_label=2))).save_to_disk(str(tmp_path / "shards"))
    for index in (tmp_path / "shards").rglob("*.json"):  # leaves <split>/data-00000-of-00001.arrow alone
        index.unlink()
    splits = load_splits(str(tmp_path / "shards"))
    assert {name: len(split) for name, split in splits.items()} == {"train": 6, "validation": 6, "test": 6}
    assert label_names(splits, "shards") == LABELS


def test_a_shard_that_is_not_parquet_is_named_with_the_loaders_words(tmp_path):
    snapshot = write_hub_snapshot(copy_beans(tmp_path / "folder", per_label=1), tmp_path / "snapshot")
    broken = snapshot / "data" / "validation-00000-of-00001.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(RunError, match=rf"^cannot load the dataset shards under {snapshot}: {broken} is unreadable "
                                       r"\(\w+: .*\); replace or remove it$"):
        load_splits(str(snapshot))
