import shutil

import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from transformers import AutoImageProcessor

from conftest import BEANS_DIR, LABELS, MODEL_DIR, copy_beans
from data import RunError, label_names, load_splits, random_resized_crop_and_flip, standardise_columns, to_tensors


@pytest.fixture(scope="module")
def image_processor():
    return AutoImageProcessor.from_pretrained(MODEL_DIR, use_fast=False)


def test_local_beans_loads_with_its_splits_and_labels():
    splits = load_splits(str(BEANS_DIR))
    assert {name: len(split) for name, split in splits.items()} == {"train": 1034, "validation": 133, "test": 128}
    assert label_names(splits, str(BEANS_DIR)) == LABELS


def test_whole_split_becomes_normalised_tensors(image_processor):
    validation = to_tensors(load_splits(str(BEANS_DIR))["validation"], image_processor)
    pixel_values, labels = validation.tensors
    assert pixel_values.shape == (133, 3, 224, 224) and pixel_values.dtype == torch.float32
    assert torch.bincount(labels).tolist() == [44, 45, 44]
    # ImageNet mean/std normalisation: values spread around 0, within the range of (0 - 0.485) / 0.229 and so on
    assert -2.2 < pixel_values.min() < -1.0 and 1.0 < pixel_values.max() < 2.7


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
    converted.save(rgb_path.with_suffix(".jpg" if mode in ("L", "CMYK") else ".png"))
    rgb.save(beans / "train" / "healthy" / "reference.png")
    pixel_values, labels = to_tensors(load_splits(str(beans))["train"], image_processor).tensors
    assert pixel_values.shape == (7, 3, 224, 224) and torch.isfinite(pixel_values).all()
    if mode == "RGBA":  # an opaque RGBA picture must give exactly the pixels of its RGB original
        healthy = pixel_values[labels == 2]
        assert any(torch.equal(healthy[0], other) for other in healthy[1:])


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
    with pytest.raises(RunError, match=f"no images found under {tmp_path / 'beans'}"):
        load_splits(str(tmp_path / "beans"))


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_image_is_named(tmp_path, image_processor, damage):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    broken = sorted((beans / "train" / "bean_rust").iterdir())[0]
    content = broken.read_bytes()
    broken.write_bytes(content[:len(content) // 2] if damage == "truncated" else b"<html>not a picture</html>")
    with pytest.raises(RunError, match=f"cannot read image {broken}"):
        to_tensors(load_splits(str(beans))["train"], image_processor)


@pytest.mark.parametrize("size", [(1, 1), (10000, 10000)])
def test_tiny_and_huge_images_are_resized(tmp_path, image_processor, size):
    beans = copy_beans(tmp_path / "beans", per_label=1, splits=("train", "validation"))
    Image.new("RGB", size, (40, 160, 60)).save(beans / "train" / "healthy" / "odd_size.jpg")
    pixel_values, _ = to_tensors(load_splits(str(beans))["train"], image_processor).tensors
    assert pixel_values.shape == (4, 3, 224, 224) and torch.isfinite(pixel_values).all()


def test_exif_rotated_photo_is_turned_upright(tmp_path, image_processor):
    beans = copy_beans(tmp_path / "beans", per_label=1, splits=("train", "validation"))
    original_path = next((beans / "train" / "healthy").iterdir())
    upright = Image.open(original_path).convert("RGB")
    original_path.unlink()
    upright.save(beans / "train" / "healthy" / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored pixels must be turned 90 degrees clockwise to be upright
    upright.transpose(Image.Transpose.ROTATE_90).save(beans / "train" / "healthy" / "rotated.png", exif=exif)
    pixel_values, labels = to_tensors(load_splits(str(beans))["train"], image_processor).tensors
    healthy = pixel_values[labels == 2]
    assert len(healthy) == 2 and torch.equal(healthy[0], healthy[1])


def test_label_sets_that_differ_across_splits_are_named(tmp_path):
    beans = copy_beans(tmp_path / "beans", per_label=2, splits=("train", "validation"))
    shutil.copytree(beans / "validation" / "healthy", beans / "validation" / "mosaic_virus")
    with pytest.raises(RunError, match=r"validation split .*only in validation: \['mosaic_virus'\]"):
        label_names(load_splits(str(beans)), str(beans))


def test_augmentation_crops_and_flips_each_image_on_its_own(image_processor):
    pixel_values, _ = to_tensors(load_splits(str(BEANS_DIR))["validation"].select(range(16)), image_processor).tensors
    torch.manual_seed(0)
    augmented = random_resized_crop_and_flip(pixel_values)
    assert augmented.shape == pixel_values.shape and torch.isfinite(augmented).all()
    assert not torch.allclose(augmented, pixel_values)
    # with the whole area kept at its own aspect ratio, each image comes back as it was or mirrored, chosen per image
    whole = random_resized_crop_and_flip(pixel_values, min_area=1.0, max_aspect=1.0)
    same = [torch.allclose(w, p, atol=1e-4) for w, p in zip(whole, pixel_values)]
    mirrored = [torch.allclose(w, p.flip(-1), atol=1e-4) for w, p in zip(whole, pixel_values)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
