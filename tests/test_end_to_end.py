"""End to end through run_finetuning.sh on the CPU: 2 torch_ddp processes, real beans, pretrained DeiT-tiny."""
import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import pipeline
from transformers.image_utils import load_image

from conftest import BEANS_DIR, LABELS, MODEL_DIR, ROOT, copy_beans, example_env, write_hub_snapshot
from data import load_splits


def run_finetuning(output_path, gpu=False, **variables):
    env = example_env(gpu, **{"MODEL": MODEL_DIR, "OUTPUT_PATH": output_path, **variables})
    run = subprocess.run(["bash", "run_finetuning.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run, json.loads((output_path / "results.json").read_text())


def run_demo(dataset, output_path, *flags, env=None, model=MODEL_DIR):
    """vit_train_demo.py in one process on the CPU with torch_ddp and the stand-in model, as a user starts it."""
    return subprocess.run([sys.executable, "vit_train_demo.py", "--plugin", "torch_ddp", "--dataset", str(dataset),
                           "--model_name_or_path", str(model), "--output_path", str(output_path), *flags],
                          cwd=ROOT, env=env or example_env(), capture_output=True, text=True, timeout=600)


def check_metrics(metrics, num_examples):
    assert set(metrics) == {"loss", "accuracy", "num_examples", "per_class", "confusion_matrix"}
    confusion = metrics["confusion_matrix"]
    assert metrics["num_examples"] == num_examples == sum(map(sum, confusion))
    assert metrics["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(len(confusion))) / num_examples)
    assert list(metrics["per_class"]) == LABELS
    for i, label in enumerate(LABELS):
        scores = metrics["per_class"][label]
        assert scores["support"] == sum(confusion[i])
        assert scores["recall"] == pytest.approx(confusion[i][i] / sum(confusion[i]))
        assert 0 <= scores["precision"] <= 1 and 0 <= scores["f1"] <= 1


def check_schema(results, num_epoch, num_validation=133, num_test=128):
    assert set(results) == {"config", "data", "memory", "epochs", "test", "best_epoch", "train_images_per_second",
                            "checkpoints", "seconds"}
    assert results["data"]["mode"] in ("cache", "stream") and results["data"]["unreadable"] == []
    assert results["data"]["num_examples"]["validation"] == num_validation
    assert 0.5 < results["memory"]["peak_host_gib"] < 24
    assert [epoch["epoch"] for epoch in results["epochs"]] == list(range(1, num_epoch + 1))
    for epoch in results["epochs"]:
        assert set(epoch) == ({"epoch", "train_loss", "images_per_second", "data_wait_seconds", "validation", "memory"}
                              | ({"test"} if num_test else set()))
        assert epoch["train_loss"] > 0 and epoch["images_per_second"] > 0 and 0 <= epoch["data_wait_seconds"]
        assert 0.5 < epoch["memory"]["peak_host_gib"] <= results["memory"]["peak_host_gib"]
        check_metrics(epoch["validation"], num_validation)
    if num_test:
        check_metrics(results["test"], num_test)
        assert results["test"] == results["epochs"][-1]["test"]
    best_accuracy = max(epoch["validation"]["accuracy"] for epoch in results["epochs"])
    assert results["best_epoch"] in results["epochs"] and results["best_epoch"]["validation"]["accuracy"] == best_accuracy
    seconds = results["seconds"]
    assert results["train_images_per_second"] > 0
    assert set(seconds) == {"setup", "setup_parts", "train", "data_wait", "evaluation", "checkpoints", "total"}
    assert list(seconds["setup_parts"]) == ["imports", "distributed", "dataset", "model", "booster", "images",
                                            "resume"]
    assert min(seconds["setup_parts"].values()) > 0
    assert 0 <= seconds["data_wait"] < seconds["train"]
    assert (seconds["checkpoints"] > 0) == (results["config"]["keep_checkpoints"] > 0)
    written = results["checkpoints"]  # one at each epoch's end, and every save_every steps
    steps = [checkpoint["step"] for checkpoint in written]
    assert steps == sorted(set(steps)) and len(steps) >= num_epoch * (results["config"]["keep_checkpoints"] > 0)
    assert all(checkpoint["seconds"] > 0 and checkpoint["gib"] > 0 for checkpoint in written)
    # written beside training (the state copied to host memory, which has room for a small model's)
    assert all(checkpoint["beside_training"] and checkpoint["write_seconds"] > 0 for checkpoint in written)
    assert sum(checkpoint["seconds"] for checkpoint in written) <= seconds["checkpoints"]
    assert sum(seconds[part] for part in ("setup", "train", "evaluation", "checkpoints")) < seconds["total"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    output_path = tmp_path_factory.mktemp("two_process_run") / "model"
    # One epoch over all 1034 training images (global batch 2 x 16); a shorter warm-up and no augmentation suit
    # a single epoch.
    run, results = run_finetuning(output_path, PLUGIN="torch_ddp", GPUNUM=2, DATASET=BEANS_DIR, EPOCH=1, BS=16,
                                  LR=3e-4, WARMUP_RATIO=0.1, AUGMENT=0, LABEL_SMOOTHING=0)
    return output_path, results


def test_one_epoch_on_two_processes_learns_beans(two_process_run):
    _, results = two_process_run
    check_schema(results, num_epoch=1)
    assert results["config"]["world_size"] == 2 and results["config"]["label_names"] == LABELS
    assert results["epochs"][-1]["validation"]["accuracy"] >= 0.85 and results["test"]["accuracy"] >= 0.85


def check_pipeline_classifies_test_split(output_path, results, device):
    """The saved model reloads through `pipeline` and gives the test accuracy measured during training, up to a
    borderline image or two."""
    classifier = pipeline("image-classification", model=str(output_path), device=device)
    images = sorted((BEANS_DIR / "test").glob("*/*.jpg"))
    predictions = classifier([str(image) for image in images], top_k=1, batch_size=32)
    assert {prediction[0]["label"] for prediction in predictions} <= set(LABELS)
    correct = sum(prediction[0]["label"] == image.parent.name for prediction, image in zip(predictions, images))
    assert abs(correct / len(images) - results["test"]["accuracy"]) <= 2 / len(images)


def test_saved_model_reloads_through_pipeline_and_classifies_the_test_split(two_process_run):
    output_path, results = two_process_run
    check_pipeline_classifies_test_split(output_path, results, device="cpu")


def test_predict_classifies_the_test_folder_as_training_measured(two_process_run):
    output_path, results = two_process_run
    run = subprocess.run([sys.executable, "predict.py", "--model", str(output_path), "--json", "--device", "cpu",
                          str(BEANS_DIR / "test")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    predictions = json.loads(run.stdout)
    assert len(predictions) == 128
    for prediction in predictions:
        scores = [label["score"] for label in prediction["predictions"]]
        assert {label["label"] for label in prediction["predictions"]} == set(LABELS)
        assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-4)
    correct = sum(p["predictions"][0]["label"] == os.path.basename(os.path.dirname(p["path"])) for p in predictions)
    assert abs(correct / 128 - results["test"]["accuracy"]) <= 2 / 128


def test_predict_prints_top_k_per_image_and_names_a_bad_one(two_process_run, tmp_path):
    output_path, _ = two_process_run
    image = sorted((BEANS_DIR / "test" / "healthy").iterdir())[0]
    not_an_image = tmp_path / "leaf.jpg"
    not_an_image.write_text("not a picture")
    predict = [sys.executable, "predict.py", "--model", str(output_path), "--device", "cpu", "--top_k", "2"]
    run = subprocess.run([*predict, str(image)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    line, = run.stdout.strip().splitlines()
    assert line.startswith(f"{image}: ") and len(line.split(", ")) == 2
    for bad, message in ((not_an_image, f"error: cannot read image {not_an_image}"),
                         (tmp_path / "missing", f"error: {tmp_path / 'missing'} does not exist")):
        run = subprocess.run([*predict, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(message)
    run = subprocess.run([*predict[:2], "--model", str(tmp_path), str(image)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and f"error: no fine-tuned model in {tmp_path}" in run.stderr


def test_run_leaves_plots_a_model_card_and_tensorboard_logs(two_process_run):
    output_path, results = two_process_run
    for name, size in (("training_curves.png", (1000, 400)), ("confusion_matrix.png", (900, 450))):
        with Image.open(output_path / name) as plot:
            assert plot.format == "PNG" and plot.size == size
            assert len(plot.convert("L").getcolors(maxcolors=100000)) > 50  # drawn on, not blank
    card = (output_path / "README.md").read_text()
    final = results["epochs"][-1]
    assert f"| 1 | {final['train_loss']:.4f} | {final['validation']['loss']:.4f} | " in card
    assert f'pipeline("image-classification", model="{output_path}")' in card
    events = EventAccumulator(str(output_path / "tensorboard"))
    events.Reload()
    steps_per_epoch = 1034 // 32
    for tag in ("train/loss", "train/learning_rate", "train/images_per_second"):
        assert [event.step for event in events.Scalars(tag)] == list(range(1, steps_per_epoch + 1))
    for tag in ("validation/accuracy", "validation/loss", "test/accuracy", "train/data_wait_seconds"):
        assert [event.step for event in events.Scalars(tag)] == [steps_per_epoch]
    assert events.Scalars("validation/accuracy")[0].value == pytest.approx(final["validation"]["accuracy"])


def predicted_confusion(model_path, folder):
    """The confusion matrix of predict.py's top-1 labels for the images of `folder` (label/image)."""
    run = subprocess.run([sys.executable, "predict.py", "--model", str(model_path), "--json", "--top_k", "1",
                          "--device", "cpu", str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    confusion = [[0] * len(LABELS) for _ in LABELS]
    for prediction in json.loads(run.stdout):
        label = os.path.basename(os.path.dirname(prediction["path"]))
        confusion[LABELS.index(label)][LABELS.index(prediction["predictions"][0]["label"])] += 1
    return confusion


def test_predict_serves_full_size_photos_as_training_measured_them(tmp_path):
    """Photos larger than the model's resolution (the hub's beans are 500x500): predict.py on the saved model finds
    on the validation files the confusion matrix that training reported for them."""
    dataset = copy_beans(tmp_path / "beans", per_label=12, splits=("train", "validation"), full_size=True)
    _, results = run_finetuning(tmp_path / "model", PLUGIN="torch_ddp", DATASET=dataset, EPOCH=1, BS=8)
    assert predicted_confusion(tmp_path / "model", dataset / "validation") == \
        results["epochs"][-1]["validation"]["confusion_matrix"]


@pytest.mark.parametrize("dataset, model, line", [
    ("beans", MODEL_DIR, "cannot download dataset 'beans': the Hugging Face hub at http://127.0.0.1:9 cannot be "
     "reached (ConnectionError); pass a local copy (--dataset /path/to/it), or set HF_HUB_OFFLINE=1 to use a copy "
     "already in the Hugging Face cache"),
    (BEANS_DIR, "google/vit-base-patch16-224", "cannot download model 'google/vit-base-patch16-224': the Hugging Face "
     "hub at http://127.0.0.1:9 cannot be reached (ConnectionError); pass a local copy (--model_name_or_path "
     "/path/to/it), or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache"),
    # a local dataset that is not there is said first, before the hub is asked for the model
    ("/no/such/beans", "google/vit-base-patch16-224", "dataset directory /no/such/beans does not exist"),
], ids=["hub dataset", "hub model", "missing local dataset, hub model"])
def test_an_unreachable_hub_is_said_at_once_in_one_line(tmp_path, dataset, model, line):
    """A hub id and no way to the hub (an endpoint that refuses connections), as behind a firewall without
    HF_HUB_OFFLINE: one line naming what could not be downloaded and the flag that takes a local copy, not the
    libraries' retries."""
    env = {name: value for name, value in example_env(HF_ENDPOINT="http://127.0.0.1:9").items()
           if name != "HF_HUB_OFFLINE"}
    run = run_demo(dataset, tmp_path / "model", env=env, model=model)
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(f"error: {line}"), run.stderr


def test_a_shard_that_cannot_be_read_is_said_in_one_line(tmp_path):
    snapshot = write_hub_snapshot(copy_beans(tmp_path / "beans", per_label=1), tmp_path / "snapshot")
    broken = snapshot / "data" / "validation-00000-of-00001.parquet"
    broken.write_bytes(b"not parquet")
    run = run_demo(snapshot, tmp_path / "model")
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert run.stderr.startswith(f"error: cannot load the dataset shards under {snapshot}: {broken} is unreadable (")


def test_dataset_without_test_split_skips_the_test_evaluation(tmp_path):
    small_beans = copy_beans(tmp_path / "beans", per_label=4, splits=("train", "validation"))
    run, results = run_finetuning(tmp_path / "model", DATASET=small_beans, GPUNUM=1, EPOCH=1, BS=4)
    assert f"dataset {small_beans} has no test split: skipping the test evaluation" in run.stdout
    assert results["test"] is None
    check_schema(results, num_epoch=1, num_validation=12, num_test=0)
    assert "No CUDA GPU found: running torch_ddp on the CPU instead of gemini." in run.stdout


def tiny_classifier(family, destination):
    """A random-weight image classifier of `family`, 32 px, a few thousand parameters, with its family's own image
    processor: a stand-in for the hub's checkpoints, saved as they are."""
    import transformers as hf
    config, image_processor = {
        "beit": (hf.BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64), hf.BeitImageProcessor(size={"height": 32, "width": 32},
                                                                            do_center_crop=False)),
        "dinov2": (hf.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, mlp_ratio=2),
                   hf.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})),
        "swin": (hf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                               window_size=4), hf.ViTImageProcessor(size={"height": 32, "width": 32})),
        "convnext": (hf.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
                     hf.ConvNextImageProcessor(size={"shortest_edge": 32})),
    }[family]
    hf.AutoModelForImageClassification.from_config(config).save_pretrained(destination)
    image_processor.save_pretrained(destination)
    return destination


@pytest.mark.parametrize("family, model_class", [("beit", "BeitForImageClassification"),
                                                 ("dinov2", "Dinov2ForImageClassification"),
                                                 ("swin", "SwinForImageClassification"),
                                                 ("convnext", "ConvNextForImageClassification")])
def test_each_model_family_trains_and_is_served_as_measured(tmp_path, family, model_class):
    dataset = copy_beans(tmp_path / "beans", per_label=4)
    model = tiny_classifier(family, tmp_path / family)
    run, results = run_finetuning(tmp_path / "model", PLUGIN="torch_ddp", MODEL=model, DATASET=dataset, GPUNUM=1,
                                  EPOCH=1, BS=4)
    assert run.stdout.startswith(f"fine-tuning {model} ({model_class}, ")
    check_schema(results, num_epoch=1, num_validation=12, num_test=12)
    assert json.loads((tmp_path / "model" / "config.json").read_text())["architectures"] == [model_class]
    # served as measured: the saved image processor makes of each file (as pipeline and predict.py do) the input
    # training evaluated, and predict.py labels the images as training's evaluation did
    from test_data import to_tensors
    from transformers import AutoImageProcessor
    saved = AutoImageProcessor.from_pretrained(tmp_path / "model")
    split = load_splits(str(dataset))["validation"]
    served = saved([load_image(cell["path"]) for cell in split["image"]], return_tensors="pt")["pixel_values"]
    assert (to_tensors(split, saved)[0] - served).abs().max() < 1e-5
    assert predicted_confusion(tmp_path / "model", dataset / "validation") == \
        results["epochs"][-1]["validation"]["confusion_matrix"]


def test_lora_trains_adapters_and_saves_a_merged_model_served_as_measured(tmp_path):
    from safetensors.torch import load_file
    dataset = copy_beans(tmp_path / "beans", per_label=8)
    output_path = tmp_path / "model"
    run, results = run_finetuning(output_path, PLUGIN="torch_ddp", GPUNUM=1, DATASET=dataset, EPOCH=2, BS=8, LR=1e-3,
                                  LORA_RANK=4)
    assert ", LoRA adapters of rank 4; saving to" in run.stdout.splitlines()[0]
    # rank-4 adapters on query and value of DeiT-tiny's 12 layers (192 wide), and the 3-label head in full
    assert results["config"]["num_trained_parameters"] == 12 * 2 * 4 * (192 + 192) + (192 * 3 + 3)
    adapter = json.loads((output_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["query", "value"]
    assert (output_path / "adapter" / "adapter_model.safetensors").exists()
    merged, pretrained = load_file(output_path / "model.safetensors"), load_file(MODEL_DIR / "model.safetensors")
    layer = "vit.encoder.layer.5.attention.attention"
    assert torch.equal(merged[f"{layer}.key.weight"], pretrained[f"{layer}.key.weight"])  # frozen
    assert not torch.equal(merged[f"{layer}.query.weight"], pretrained[f"{layer}.query.weight"])  # adapted
    assert not any("lora" in name for name in merged)  # a plain model
    assert predicted_confusion(output_path, dataset / "validation") == \
        results["epochs"][-1]["validation"]["confusion_matrix"]


def with_trained_adapters(model):
    """`model` with rank-4 LoRA adapters on query and value and its head trained in full, in eval mode, the adapters'
    B matrices drawn as training leaves them (not the zeros they start from)."""
    from peft import LoraConfig, get_peft_model
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["query", "value"],
                                               modules_to_save=["classifier"])).eval()
    torch.manual_seed(0)
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    return adapted


def validation_pixels():
    """Every 20th beans validation image, as the stand-in's image processor prepares it."""
    from transformers import AutoImageProcessor
    images = [load_image(str(path)) for path in sorted((BEANS_DIR / "validation").glob("*/*.jpg"))[::20]]
    return AutoImageProcessor.from_pretrained(MODEL_DIR)(images, return_tensors="pt")["pixel_values"]


def test_a_qlora_model_is_saved_as_the_full_precision_model_its_4_bit_layers_computed(tmp_path):
    """bitsandbytes holds 4-bit weights on the CPU too, though Colossal-AI quantizes only on a GPU: its conversion
    is applied here as booster.enable_lora(quantize=True) applies it, with fp32 compute for a close comparison.
    The saved merged model gives the 4-bit model's logits, adapters included, as a plain ViT."""
    from colossalai.quantization.bnb import get_keys_to_not_convert, replace_with_bnb_layers
    from colossalai.quantization.bnb_config import BnbQuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForImageClassification

    from models import dequantize_merged
    torch.manual_seed(0)  # the new head and the adapters' A matrices
    model = AutoModelForImageClassification.from_pretrained(MODEL_DIR, num_labels=3, ignore_mismatched_sizes=True)
    config = BnbQuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32,
                                   bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")
    quantized = replace_with_bnb_layers(model, config, get_keys_to_not_convert(model)).to("cpu")  # quantizes
    quantized.is_loaded_in_4bit = True
    adapted = with_trained_adapters(quantized)
    pixels = validation_pixels()
    merged = copy.deepcopy(adapted)  # untouched by a forward pass: on the CPU, bitsandbytes repacks the weights then
    with torch.no_grad():
        expected = adapted(pixel_values=pixels).logits
        dequantize_merged(merged)
        merged.merge_and_unload().save_pretrained(tmp_path / "merged", safe_serialization=True)
        served = AutoModelForImageClassification.from_pretrained(tmp_path / "merged").eval()
        logits = served(pixel_values=pixels).logits
    # bitsandbytes' CPU kernel rounds its sums: the logits agree to 0.012 (leaving the adapters out moves them 0.09),
    # and so do the predictions wherever the 4-bit model's top two logits are further apart than twice that bound
    bound = 0.03
    assert (logits - expected).abs().max() < bound
    top_two = expected.topk(2, dim=1).values
    clear = top_two[:, 0] - top_two[:, 1] > 2 * bound
    assert clear.sum() >= 3 and torch.equal(logits.argmax(1)[clear], expected.argmax(1)[clear])
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in name or "absmax" in name for name in saved)
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())


def test_lora_holds_frozen_layers_in_the_autocast_dtype_and_computes_the_same():
    """Under bf16 autocast a LoRA run holds its frozen linear and convolution weights in bf16, which autocast would
    cast them to in every pass: the logits are bitwise those of the model holding them in fp32, in half the bytes."""
    from transformers import AutoModelForImageClassification

    from models import hold_frozen_layers_in
    adapted = with_trained_adapters(
        AutoModelForImageClassification.from_pretrained(MODEL_DIR, num_labels=3, ignore_mismatched_sizes=True))
    held = copy.deepcopy(adapted)
    hold_frozen_layers_in(held, torch.bfloat16)
    pixels = validation_pixels()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(held(pixel_values=pixels).logits, adapted(pixel_values=pixels).logits)
    dtypes = {name: parameter.dtype for name, parameter in held.named_parameters()}
    layer = "base_model.model.vit.encoder.layer.5"
    assert dtypes[f"{layer}.attention.attention.key.weight"] == torch.bfloat16  # frozen
    assert dtypes[f"{layer}.attention.attention.query.base_layer.weight"] == torch.bfloat16  # frozen, adapted
    assert dtypes[f"{layer}.attention.attention.query.lora_A.default.weight"] == torch.float32  # trained
    assert dtypes["base_model.model.classifier.modules_to_save.default.weight"] == torch.float32  # trained in full
    assert dtypes[f"{layer}.layernorm_before.weight"] == torch.float32  # autocast computes layer norms in fp32

    def size(model):
        return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    assert 0.5 < size(held) / size(adapted) < 0.55


def save_to_disk_folder(image_folder, destination):
    load_splits(str(image_folder)).save_to_disk(str(destination))
    return destination


def folder_with_val_split(image_folder, destination):
    (image_folder / "validation").rename(image_folder / "val")
    return image_folder


@pytest.mark.parametrize("form", [write_hub_snapshot, save_to_disk_folder, folder_with_val_split])
def test_each_accepted_dataset_form_trains_end_to_end(tmp_path, form):
    dataset = form(copy_beans(tmp_path / "beans", per_label=4), tmp_path / "converted")
    run, results = run_finetuning(tmp_path / "model", DATASET=dataset, GPUNUM=1, EPOCH=1, BS=4)
    check_schema(results, num_epoch=1, num_validation=12, num_test=12)
    assert results["data"]["num_examples"] == {"train": 12, "validation": 12, "test": 12}


@pytest.mark.parametrize("flag, value, message", [
    ("--dataset", "/no/such/beans", "error: dataset directory /no/such/beans does not exist"),
    ("--dataset", str(ROOT / ".ci"), f"error: {ROOT / '.ci'} holds none of the accepted dataset layouts (found: run)"),
    ("--model_name_or_path", "/no/such/model", "error: cannot load model '/no/such/model'"),
    ("--output_path", "/proc/results", "error: cannot create --output_path /proc/results"),
    ("--batch_size", "2000", "error: --batch_size 2000 x 1 data-parallel ranks is larger than the 1034 training images"),
    ("--gradient_accumulation_steps", "40", "error: --batch_size 32 x 40 accumulated batches x 1 data-parallel ranks "
     "is larger than the 1034 training images; lower --batch_size or --gradient_accumulation_steps"),
])
def test_bad_input_stops_with_one_line_naming_it(tmp_path, flag, value, message):
    run = run_demo(BEANS_DIR, tmp_path / "model", flag, value)  # the later of a flag given twice holds
    assert run.returncode == 1
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith(message) and "Traceback" not in run.stderr
    assert "\ndata:" not in run.stdout  # said before any image is decoded


def test_lora_on_layers_the_model_does_not_have_names_those_it_has(tmp_path):
    run = run_demo(BEANS_DIR, tmp_path / "model", "--lora_rank", "4", "--lora_target_modules", "qkv")
    assert run.returncode == 1 and "Traceback" not in run.stderr and "\ndata:" not in run.stdout
    assert run.stderr.strip().splitlines()[-1] == (
        "error: --lora_target_modules qkv names no layer of ViTForImageClassification; name some of its linear "
        "layers: dense, key, query, value")


def test_a_model_larger_than_the_host_is_refused_before_its_weights_are_read(tmp_path):
    """A 51.6B-parameter ViT's config alone, without weights: its fp32 weights would take 192 GiB of host memory."""
    from transformers import AutoImageProcessor, ViTConfig
    model = tmp_path / "vit-51b"
    ViTConfig(hidden_size=8192, num_hidden_layers=64, num_attention_heads=64, intermediate_size=32768).save_pretrained(
        model)
    AutoImageProcessor.from_pretrained(MODEL_DIR).save_pretrained(model)
    run = run_demo(BEANS_DIR, tmp_path / "model", "--model_name_or_path", str(model))
    assert run.returncode == 1 and "Traceback" not in run.stderr and "\ndata:" not in run.stdout
    assert re.fullmatch(
        rf"error: {model} has 51.6B parameters, and training it needs at least 192 GiB of host memory \(4 bytes a "
        r"parameter, reading the fp32 weights\), more than the [\d.]+ GiB this machine has available; train it on a "
        r"machine with more memory, or a smaller model", run.stderr.strip().splitlines()[-1])


def test_a_checkpoint_without_a_classification_head_gets_one(tmp_path):
    """Like google/vit-huge-patch14-224-in21k: the backbone alone (ViTModel), with its image processor."""
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, ViTModel
    backbone = tmp_path / "backbone"
    ViTModel.from_pretrained(MODEL_DIR, add_pooling_layer=False).save_pretrained(backbone)
    AutoImageProcessor.from_pretrained(MODEL_DIR).save_pretrained(backbone)
    output_path = tmp_path / "model"
    run = run_demo(BEANS_DIR, output_path, "--model_name_or_path", str(backbone), "--num_epoch", "1",
                   "--max_train_samples", "64", "--max_eval_samples", "16")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((output_path / "results.json").read_text())
    assert results["config"]["num_parameters"] == pytest.approx(5.5e6, rel=0.05)
    weights = {}
    for shard in output_path.glob("*.safetensors"):
        weights.update(load_file(shard))
    assert weights["classifier.weight"].shape == (3, 192)  # a new head for beans' 3 labels, saved with the model
    config = json.loads((output_path / "config.json").read_text())
    assert sorted(config["id2label"].values()) == sorted(LABELS)


def test_fine_tuning_at_a_higher_resolution_saves_a_model_served_at_it(tmp_path):
    """IMAGE_SIZE=64 from a 32-pixel ViT: the pretrained position embeddings interpolated once (bicubic, as
    transformers interpolates them), and the saved config and image processor at 64, so predict.py serves the model
    with no extra flag and finds what training measured."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    pretrained = tmp_path / "vit-32px"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(pretrained)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(pretrained)
    dataset = copy_beans(tmp_path / "beans", per_label=6, splits=("train", "validation"))
    _, results = run_finetuning(tmp_path / "model", MODEL=pretrained, DATASET=dataset, IMAGE_SIZE=64, EPOCH=1, BS=6,
                                LR=1e-9, WEIGHT_DECAY=0, KEEP_CHECKPOINTS=0)  # the weights all but unchanged
    assert results["config"]["image_size"] == 64
    saved = ViTForImageClassification.from_pretrained(tmp_path / "model")
    assert saved.config.image_size == 64
    assert json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())["size"] == {"height": 64,
                                                                                              "width": 64}
    original = ViTForImageClassification.from_pretrained(pretrained).vit.embeddings.position_embeddings
    grid = original[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    position_embeddings = saved.vit.embeddings.position_embeddings
    assert position_embeddings.shape == (1, 65, 32)
    assert torch.allclose(position_embeddings[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 64, 32), atol=1e-5)
    assert predicted_confusion(tmp_path / "model", dataset / "validation") == \
        results["epochs"][-1]["validation"]["confusion_matrix"]


def test_a_vit_whose_image_processor_makes_another_size_is_refused_before_training(tmp_path):
    """A 32-pixel ViT saved with a 224-pixel image processor: transformers' ViT would stop at the first batch."""
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

    model = tmp_path / "vit-32px"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=64)).save_pretrained(model)
    AutoImageProcessor.from_pretrained(MODEL_DIR).save_pretrained(model)
    run = run_demo(BEANS_DIR, tmp_path / "out", "--model_name_or_path", str(model))
    assert run.returncode == 1 and "Traceback" not in run.stderr and "\ndata:" not in run.stdout
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: {model}: its image processor makes 224x224 images, but its config.json says the model takes 32x32 "
        "(image_size); make preprocessor_config.json's size 32, or config.json's image_size 224 if the weights were "
        "trained at it")


def test_a_resolution_the_patches_do_not_tile_is_refused_naming_the_nearest():
    from transformers import ViTConfig

    from resolution import size_error

    assert size_error(ViTConfig(patch_size=16), 380, "vit") == (
        "--image_size 380 is not a whole number of the 16-pixel patches of vit; pick 368 or 384")
    assert size_error(ViTConfig(patch_size=16), 8, "vit") == (
        "--image_size 8 is not a whole number of the 16-pixel patches of vit; pick 16")
    assert size_error(ViTConfig(patch_size=16), 384, "vit") is None
