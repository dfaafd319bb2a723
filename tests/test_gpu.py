"""Every plugin on one GPU with the published settings: real beans, pretrained DeiT-tiny, all 133 validation images.

Skipped without a CUDA GPU. GPU_RESULTS_DIR, if set, receives each run's results.json as <plugin>.json, and each
resume test's figures as resume_<name>.json.
"""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from checkpoint import complete_checkpoints
from conftest import BEANS_DIR, LABELS, MODEL_DIR, ROOT, copy_beans, example_env
from test_end_to_end import check_pipeline_classifies_test_split, check_schema, run_finetuning
from test_reliability import kill_job, metrics, run_to_end, start_run, wait_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def keep_result(name, text):
    """Writes `text` to GPU_RESULTS_DIR/<name>.json, the folder made if need be, when GPU_RESULTS_DIR is set."""
    if os.environ.get("GPU_RESULTS_DIR"):
        results_dir = Path(os.environ["GPU_RESULTS_DIR"])
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / f"{name}.json").write_text(text)


@pytest.mark.parametrize("plugin", ["torch_ddp", "torch_ddp_fp16", "low_level_zero", "gemini", "hybrid_parallel"])
def test_plugin_reaches_published_accuracy_on_one_gpu(tmp_path, plugin):
    output_path = tmp_path / "model"
    run, results = run_finetuning(output_path, gpu=True, PLUGIN=plugin, GPUNUM=1, DATASET=BEANS_DIR, BS=32, LR=1e-4,
                                  EPOCH=5, WEIGHT_DECAY=0.5, WARMUP_RATIO=0.3)
    keep_result(plugin, (output_path / "results.json").read_text())
    check_schema(results, num_epoch=5)
    assert results["config"]["plugin"] == plugin and results["config"]["device"].startswith("cuda")
    # said once, before the booster is built (gemini's optimizer swaps stdout while it is)
    assert "\ndata: caching all 1295 images on cuda:0" in run.stdout
    validation = results["epochs"][-1]["validation"]
    assert validation["num_examples"] == 133 and validation["accuracy"] >= 0.96
    assert results["test"]["num_examples"] == 128
    check_pipeline_classifies_test_split(output_path, results, device=0)


@pytest.mark.parametrize("plugin, data_mode", [(plugin, mode) for plugin in ("gemini", "low_level_zero", "hybrid_parallel")
                                                for mode in ("cache", "stream")] +
                         [("torch_ddp", "cache"), ("torch_ddp_fp16", "cache")])
def test_plugin_resumes_after_a_kill(tmp_path, plugin, data_mode):
    resumed = check_resume_after_a_kill(tmp_path, f"{plugin}_{data_mode}", PLUGIN=plugin, DATA_MODE=data_mode)
    assert resumed["data"]["mode"] == data_mode


@pytest.mark.parametrize("plugin, offload", [("gemini", "optimizer"), ("gemini", "all"),
                                             ("low_level_zero", "optimizer"), ("hybrid_parallel", "optimizer")])
def test_offloaded_training_resumes_after_a_kill(tmp_path, plugin, offload):
    resumed = check_resume_after_a_kill(tmp_path, f"{plugin}_offload_{offload}", PLUGIN=plugin, OFFLOAD=offload)
    assert resumed["config"]["offload"] == offload


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs or more")
@pytest.mark.parametrize("plugin", ["torch_ddp", "torch_ddp_fp16", "low_level_zero", "gemini", "hybrid_parallel"])
def test_every_plugin_resumes_after_a_kill_on_every_gpu_of_the_machine(tmp_path, plugin):
    """Data-parallel over all the machine's GPUs (2, 4 or 8) at one GPU's global batch of 32: killed and resumed, the
    same run as an uninterrupted one, every image evaluated once."""
    gpus = torch.cuda.device_count()
    resumed = check_resume_after_a_kill(tmp_path, f"{plugin}_{gpus}_gpus", PLUGIN=plugin, GPUNUM=gpus, BS=32 // gpus)
    assert resumed["config"]["world_size"] == resumed["config"]["data_parallel_size"] == gpus
    assert resumed["epochs"][-1]["validation"]["num_examples"] == 133 and resumed["test"]["num_examples"] == 128


def check_resume_after_a_kill(tmp_path, name, **settings):
    """Kills a 2-epoch run (64 steps) after its first checkpoint, resumes it, and compares it with an uninterrupted
    run. On a fast plugin the run may write another checkpoint before the kill lands: it resumes from the latest."""
    settings = {"gpu": True, "GPUNUM": 1, "BS": 32, "LR": 1e-4, "EPOCH": 2, "WARMUP_RATIO": 0.3, "WEIGHT_DECAY": 0.5,
                "SAVE_EVERY": 10, "KEEP_CHECKPOINTS": 2, **settings}
    _, uninterrupted = run_to_end(BEANS_DIR, tmp_path / "uninterrupted", **settings)
    output_path = tmp_path / "interrupted"
    process = start_run(BEANS_DIR, output_path, **settings)
    wait_for(lambda: complete_checkpoints(output_path), process)
    kill_job(process)
    output, resumed = run_to_end(BEANS_DIR, output_path, RESUME="latest", **settings)
    resumed_from = re.search(r"resuming from .*/step_(\d+): epoch \d, step \d+ of 32", output)
    assert resumed_from and int(resumed_from.group(1)) < 64, output  # mid-run, with steps still to train
    keep_result(f"resume_{name}", json.dumps({"uninterrupted": metrics(uninterrupted), "resumed": metrics(resumed)}))
    assert resumed["data"]["mode"] == uninterrupted["data"]["mode"]
    # each checkpoint holds the fp32 master weights (gemini's through its own IO, the others' beside the model):
    # the resumed run is the same run
    assert metrics(resumed) == metrics(uninterrupted)
    return resumed


@pytest.mark.parametrize("plugin", ["torch_ddp", "low_level_zero", "gemini", "hybrid_parallel"])
def test_accumulated_batches_train_as_one_batch_of_their_size(tmp_path, plugin):
    """GRAD_ACCUM=4 BS=8 against BS=32, through each plugin's own way of accumulating (no_sync, or gemini's)."""
    same = {"gpu": True, "PLUGIN": plugin, "GPUNUM": 1, "DATASET": BEANS_DIR, "EPOCH": 2, "LR": 1e-4, "AUGMENT": 0,
            "KEEP_CHECKPOINTS": 0}
    _, whole = run_finetuning(tmp_path / "whole", BS=32, **same)
    _, accumulated = run_finetuning(tmp_path / "accumulated", BS=8, GRAD_ACCUM=4, **same)
    for one, four in zip(whole["epochs"], accumulated["epochs"], strict=True):  # bf16: to its rounding
        assert four["train_loss"] == pytest.approx(one["train_loss"], rel=2e-2)
        assert four["validation"]["loss"] == pytest.approx(one["validation"]["loss"], rel=5e-2)


@pytest.mark.parametrize("plugin", ["torch_ddp", "low_level_zero", "hybrid_parallel"])
def test_lora_trains_on_each_plugin_that_has_it_and_is_served_merged(tmp_path, plugin):
    output_path = tmp_path / "model"
    run, results = run_finetuning(output_path, gpu=True, PLUGIN=plugin, GPUNUM=1, DATASET=BEANS_DIR, LORA_RANK=16,
                                  LR=1e-3, EPOCH=5)
    assert "You have enabled LoRa training" not in run.stdout + run.stderr  # low_level_zero's advice, hidden
    assert results["config"]["num_trained_parameters"] < results["config"]["num_parameters"] / 10
    assert results["epochs"][-1]["validation"]["accuracy"] > 0.6  # it learned: chance is 1/3
    check_pipeline_classifies_test_split(output_path, results, device=0)


def pretrained_shaped(family, destination):
    """DINOv2-small or Swin-tiny as the hub has them (facebook/dinov2-small's and microsoft/swin-tiny-patch4-window7-
    224's configs and image processors), with random weights: the hub cannot be reached from the test machines."""
    import transformers as hf
    imagenet = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}
    config, image_processor = {
        "dinov2": (hf.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                   image_size=518),
                   hf.BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                        **imagenet)),
        "swin": (hf.SwinConfig(), hf.ViTImageProcessor(size={"height": 224, "width": 224}, **imagenet)),
    }[family]
    hf.AutoModelForImageClassification.from_config(config).save_pretrained(destination)
    image_processor.save_pretrained(destination)
    return destination


@pytest.mark.parametrize("plugin", ["low_level_zero", "gemini"])
@pytest.mark.parametrize("family, model_class", [("dinov2", "Dinov2ForImageClassification"),
                                                 ("swin", "SwinForImageClassification")])
def test_pretrained_shaped_dinov2_and_swin_train_and_are_served_as_measured(tmp_path, family, model_class, plugin):
    model = pretrained_shaped(family, tmp_path / family)
    run, results = run_finetuning(tmp_path / "model", gpu=True, PLUGIN=plugin, GPUNUM=1, MODEL=model,
                                  DATASET=BEANS_DIR, EPOCH=5)
    assert run.stdout.startswith(f"fine-tuning {model} ({model_class}, ")
    check_schema(results, num_epoch=5)
    assert results["epochs"][-1]["train_loss"] < results["epochs"][0]["train_loss"]
    check_pipeline_classifies_test_split(tmp_path / "model", results, device=0)


def test_qlora_trains_adapters_over_4_bit_weights_and_is_served_merged_in_full_precision(tmp_path):
    output_path = tmp_path / "model"  # recomputing activations, as a model that needs QLoRA would
    run, results = run_finetuning(output_path, gpu=True, PLUGIN="torch_ddp", GPUNUM=1, DATASET=BEANS_DIR, LORA_RANK=16,
                                  LORA_QUANTIZE=1, GRAD_CHECKPOINT=1, LR=1e-3, EPOCH=5)
    assert ", LoRA adapters of rank 16 over 4-bit weights; saving to" in run.stdout.splitlines()[0]
    assert results["config"]["num_trained_parameters"] < results["config"]["num_parameters"] / 10
    assert results["epochs"][-1]["validation"]["accuracy"] > 0.6
    check_pipeline_classifies_test_split(output_path, results, device=0)


def test_lora_under_a_cap_its_fp32_weights_exceed_saves_the_merged_model(tmp_path):
    """A ViT-H/14 of random weights: 2.36 GiB in fp32, more than the 2 GiB cap, 1.18 GiB in the bf16 that LoRA holds
    its frozen weights in. The merged model is saved in fp32, which the GPU could not hold under the cap. Streamed,
    so that no image cache shares the cap."""
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

    base = tmp_path / "vit-huge"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                        intermediate_size=5120, patch_size=14)).to(torch.bfloat16).save_pretrained(base)
    AutoImageProcessor.from_pretrained(MODEL_DIR).save_pretrained(base)
    _, results = run_finetuning(tmp_path / "model", gpu=True, PLUGIN="torch_ddp", MODEL=base, DATASET=BEANS_DIR,
                                DATA_MODE="stream", EPOCH=1, BS=8, LORA_RANK=16, LR=1e-3, GRAD_CHECKPOINT=1,
                                MAX_GPU_MEMORY_GIB=2, KEEP_CHECKPOINTS=0)
    assert 1.0 < results["memory"]["peak_gpu_gib"] <= 2
    merged = ViTForImageClassification.from_pretrained(tmp_path / "model")
    assert merged.dtype == torch.float32 and merged.num_parameters() == results["config"]["num_parameters"]
    query = "vit.encoder.layer.0.attention.attention.query.weight"
    assert not torch.equal(merged.state_dict()[query], ViTForImageClassification.from_pretrained(base).state_dict()[
        query])  # the adapters merged in


@pytest.mark.parametrize("quantize", [0, 1], ids=["lora", "qlora"])
def test_lora_and_qlora_resume_after_a_kill(tmp_path, quantize):
    check_resume_after_a_kill(tmp_path, f"torch_ddp_{'q' * quantize}lora", PLUGIN="torch_ddp", LORA_RANK=16,
                              LORA_QUANTIZE=quantize, LR=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_pipeline_trains_on_after_evaluating_a_short_last_batch(tmp_path):
    """Two pipeline stages, 36 images a split at batch 32: each evaluation ends in a batch of 4, after which
    Colossal-AI's schedule would refuse the next epoch's batch of 32 unless the evaluation batches are padded."""
    dataset = copy_beans(tmp_path / "beans", per_label=12)
    run, results = run_finetuning(tmp_path / "model", gpu=True, PLUGIN="hybrid_parallel", PP_SIZE=2, GPUNUM=2,
                                  DATASET=dataset, BS=32, EPOCH=2)
    assert "(tensor parallel 1, pipeline parallel 2 in microbatches of 16);" in run.stdout
    assert len(results["epochs"]) == 2 and results["config"]["pp_size"] == 2
    assert results["config"]["microbatch_size"] == 16  # the default: two microbatches a batch, one a stage
    assert results["epochs"][-1]["validation"]["num_examples"] == 36 and results["test"]["num_examples"] == 36


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensor_parallelism_trains_beans_three_labels_and_saves_a_model_that_serves(tmp_path):
    """TP_SIZE=2 with 3 labels: the classifier, padded to 4 outputs (models.pad_classifier), trains split over two
    GPUs; every image is evaluated once over the 3 labels, and the saved model is a 3-label classifier that
    `pipeline` serves with the accuracy training measured."""
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

    model = tmp_path / "vit_4_heads"  # DeiT-tiny's 3 heads do not split in two: its shape with 4, random weights
    ViTForImageClassification(ViTConfig.from_pretrained(MODEL_DIR, num_attention_heads=4)).save_pretrained(model)
    AutoImageProcessor.from_pretrained(MODEL_DIR).save_pretrained(model)
    output_path = tmp_path / "model"
    run, results = run_finetuning(output_path, gpu=True, PLUGIN="hybrid_parallel", TP_SIZE=2, GPUNUM=2,
                                  DATASET=BEANS_DIR, MODEL=model, BS=32, EPOCH=2)
    assert "(tensor parallel 2, pipeline parallel 1)" in run.stdout
    check_schema(results, num_epoch=2)
    assert results["epochs"][-1]["validation"]["num_examples"] == 133 and results["test"]["num_examples"] == 128
    check_pipeline_classifies_test_split(output_path, results, device=0)


def test_a_memory_cap_holds_and_running_out_under_it_is_one_line(tmp_path):
    _, results = run_finetuning(tmp_path / "capped", gpu=True, PLUGIN="torch_ddp", DATASET=BEANS_DIR, EPOCH=1,
                                MAX_GPU_MEMORY_GIB=3)
    assert 0 < results["memory"]["peak_gpu_gib"] <= 3 and results["config"]["max_gpu_memory_gib"] == 3
    run = subprocess.run(["bash", "run_finetuning.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=example_env(gpu=True, PLUGIN="torch_ddp", DATASET=BEANS_DIR, MODEL=MODEL_DIR, BS=512,
                                         EPOCH=1, MAX_GPU_MEMORY_GIB=0.5, OUTPUT_PATH=tmp_path / "too_small"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: out of GPU memory under the --max_gpu_memory_gib 0.5 cap, training {MODEL_DIR} (5.5M parameters) at "
        "--batch_size 512 with torch_ddp; try --offload optimizer (low_level_zero, gemini, hybrid_parallel), "
        "--grad_checkpoint, a smaller --batch_size or a higher cap")


def test_streamed_gpu_memory_is_the_same_on_a_dataset_fifty_times_larger(tmp_path):
    """Beans' 1034 training images against 51,700 (each 50 times under other names, links to the same files),
    streamed: the GPU holds the batches in flight, never the dataset."""
    large = tmp_path / "large"
    large.mkdir()
    for split in ("validation", "test"):
        os.symlink(BEANS_DIR / split, large / split)
    for image in BEANS_DIR.glob("train/*/*.jpg"):
        (large / "train" / image.parent.name).mkdir(parents=True, exist_ok=True)
        for copy in range(50):
            os.symlink(image, large / "train" / image.parent.name / f"{copy}_{image.name}")
    peaks = {}
    for name, dataset in (("beans", BEANS_DIR), ("large", large)):
        _, results = run_finetuning(tmp_path / name, gpu=True, PLUGIN="torch_ddp", GPUNUM=1, DATASET=dataset, BS=128,
                                    EPOCH=1, DATA_MODE="stream", KEEP_CHECKPOINTS=0)
        assert results["data"]["mode"] == "stream"
        assert results["data"]["num_examples"]["train"] == {"beans": 1034, "large": 51700}[name]
        peaks[name] = results["memory"]["peak_gpu_gib"]
    assert peaks["large"] == pytest.approx(peaks["beans"], rel=0.02), peaks


def test_gpu_batches_hold_the_pixels_the_workers_make(tmp_path):
    """Cached on the GPU and streamed to it, batches of images of several sizes hold exactly the pixels that the
    loader workers make (and the CPU path keeps)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from data import load_splits
    from images import Decoder
    from test_data import decoded

    sizes = [(500, 500), (320, 240), (231, 301), (224, 224)]
    for split in ("train", "validation"):
        for label in LABELS:
            (tmp_path / split / label).mkdir(parents=True)
            for index, source in enumerate(sorted((BEANS_DIR / split / label).iterdir())[:4]):
                Image.open(source).resize(sizes[index]).save(tmp_path / split / label / source.name)
    decoder = Decoder(AutoImageProcessor.from_pretrained(MODEL_DIR, use_fast=True))
    split = load_splits(str(tmp_path))["validation"]
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    index_batches = [[3, 1, 4], list(range(5, 12)), [0, 2]]
    cached, streamed = (decoded({"validation": split}, decoder, gpu, is_cached, num_workers=2,
                                skip_unreadable=False)["validation"] for is_cached in (True, False))
    for (cached_batch, labels, _), (streamed_batch, _, _) in zip(cached.device_batches(index_batches),
                                                                 streamed.device_batches(index_batches)):
        assert cached_batch.device.type == "cuda" and torch.equal(cached_batch, streamed_batch) and len(labels)
    on_cpu = decoded({"validation": split}, decoder, cpu, True, num_workers=2, skip_unreadable=False)["validation"]
    assert cached.pixel_values.dtype == torch.uint8 and torch.equal(cached.pixel_values.cpu(), on_cpu.pixel_values)


def test_a_kernel_not_built_is_named_with_the_command_that_builds_it(tmp_path):
    """Colossal-AI would compile a missing kernel in every process, for minutes, at the first step: the optimizer
    is refused at once instead (with a home folder where nothing was ever built)."""
    check = ("import torch, startup; startup.import_libraries(); "
             "from plugins import PluginSettings, build_optimizer; "
             "build_optimizer(torch.nn.Linear(2, 2), PluginSettings('gemini', 'fp16', offload='all'), 1e-3, 0.0)")
    run = subprocess.run(["python3", "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=example_env(gpu=True, HOME=tmp_path))
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        "errors.RunError: Colossal-AI's fused_optim_cuda and cpu_adam_x86 kernels are not built; build them once "
        "before training (a minute or two): python3 -c \"from colossalai.kernel.kernel_loader import CPUAdamLoader, "
        "FusedOptimizerLoader; CPUAdamLoader().load(); FusedOptimizerLoader().load()\"")
