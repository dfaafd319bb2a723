import re

import pytest
import torch
from transformers import ViTConfig

from args import build_parser, layout_error, parse_demo_args
from conftest import MODEL_DIR, ROOT
from errors import RunError
from plugins import PluginSettings, settings_error


def parse_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        parse_demo_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(" (see --help)"), lines
    return lines[0]


def test_every_default_is_the_same_in_the_script_the_shell_variables_and_the_docs():
    """docs/configuration.md's table, run_finetuning.sh's variables and vit_train_demo.py's flags say one default."""
    shell = dict(re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", (ROOT / "run_finetuning.sh").read_text(), re.MULTILINE))
    parser = build_parser()
    rows = re.findall(r"^\| `(\w+)` \| `(--\w+)`[^|]* \| `?([\w./-]+)`?(?: \((?:on|off)\))? \|",
                      (ROOT / "docs" / "configuration.md").read_text(), re.MULTILINE)
    assert len(rows) >= 20, rows
    for variable, flag, documented in rows:
        assert shell[variable] == documented, variable
        default = parser.get_default(flag.removeprefix("--"))
        if isinstance(default, bool):  # a switch: the variable is 1 or 0
            assert default == (documented == "1"), flag
        elif isinstance(default, (int, float)):
            assert default == float(documented), flag
        else:
            assert default == documented, flag


def test_booleans_are_real_switches():
    assert parse_demo_args(["--plugin", "torch_ddp", "--grad_checkpoint"]).grad_checkpoint is True
    assert parse_demo_args(["--plugin", "torch_ddp", "--no-grad_checkpoint"]).grad_checkpoint is False
    assert parse_demo_args(["--plugin", "torch_ddp", "--no-augment"]).augment is False


@pytest.mark.parametrize("argv, named", [
    (["--batch_size", "0"], "--batch_size"),
    (["--num_epoch", "-1"], "--num_epoch"),
    (["--warmup_ratio", "1.5"], "--warmup_ratio"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--weight_decay", "-0.1"], "--weight_decay"),
    (["--batch_size", "many"], "--batch_size"),
    (["--plugin", "deepspeed"], "--plugin"),
    (["--tp_size", "2"], "--tp_size"),
    (["--data_mode", "disk"], "--data_mode"),
    (["--cache_budget_gib", "0"], "--cache_budget_gib"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--max_train_samples", "0"], "--max_train_samples"),
    (["--data_mode", "stream", "--cache_budget_gib", "2"], "--cache_budget_gib"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
])
def test_out_of_range_values_stop_with_an_argparse_error(capsys, argv, named):
    plugin = [] if "--plugin" in argv else ["--plugin", "torch_ddp"]
    message = parse_error(capsys, plugin + argv)
    assert "error:" in message and named in message


def test_tp_times_pp_must_divide_the_process_count(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    message = parse_error(capsys, ["--plugin", "hybrid_parallel", "--tp_size", "2", "--pp_size", "2"])
    assert "does not divide the 6 launched processes" in message


def test_a_pipeline_refuses_to_skip_unreadable_images(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = parse_error(capsys, ["--plugin", "hybrid_parallel", "--pp_size", "2", "--skip_unreadable"])
    assert "--skip_unreadable leaves a batch short" in message and "(--pp_size 2) trains only whole batches" in message


def test_a_pipeline_refuses_to_accumulate_gradients(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = parse_error(capsys, ["--plugin", "hybrid_parallel", "--pp_size", "2",
                                   "--gradient_accumulation_steps", "4"])
    assert message == ("error: --gradient_accumulation_steps 4 with a pipeline (--pp_size 2), which already splits "
                       "each batch into microbatches: raise --batch_size instead, or drop --pp_size (see --help)")


def test_pipeline_microbatches_must_split_the_batch_into_one_a_stage_or_more(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    pipeline = ["--plugin", "hybrid_parallel", "--pp_size", "2"]
    message = parse_error(capsys, pipeline + ["--batch_size", "32", "--microbatch_size", "32"])
    assert message.startswith("error: --microbatch_size 32 does not split --batch_size 32 into at least --pp_size 2 "
                              "whole microbatches; pick one of: 1, 2, 4, 8, 16")
    message = parse_error(capsys, pipeline + ["--batch_size", "1"])
    assert message.startswith("error: --batch_size 1 is fewer images than the --pp_size 2 pipeline stages, each of "
                              "which needs a microbatch; raise --batch_size to at least 2")
    message = parse_error(capsys, ["--plugin", "hybrid_parallel", "--microbatch_size", "8"])
    assert message.startswith("error: --microbatch_size 8 splits a pipeline's batches and there is no pipeline")


def test_a_layout_the_model_cannot_be_split_into_is_named():
    deit_tiny = ViTConfig.from_pretrained(MODEL_DIR, num_labels=3)  # 3 attention heads, 12 layers; beans' labels
    vit_base = ViTConfig(num_labels=3)  # 12 heads

    def error(tp_size, pp_size, config=deit_tiny):
        return layout_error(config, tp_size, pp_size, "vit")

    # the classifier's outputs need not divide: models.pad_classifier widens it (tests/test_tensor_parallel.py)
    assert error(1, 1) is None and error(3, 12) is None and error(2, 1, vit_base) is None
    assert error(2, 1) == ("--tp_size 2 does not divide the 3 attention heads of vit (tensor parallelism splits them); "
                           "pick one of: 1, 3")
    assert error(5, 1, vit_base) == ("--tp_size 5 does not divide the 12 attention heads of vit (tensor parallelism "
                                     "splits them); pick one of: 1, 2, 3, 4, 6, 12")
    assert error(1, 13) == "--pp_size 13 is more pipeline stages than the 12 layers of vit; pick at most 12"


def test_a_layout_the_model_cannot_be_split_into_is_refused_before_its_weights_are_read(tmp_path):
    from models import load_model

    for name in ("config.json", "preprocessor_config.json"):  # the weights left out: reading them would fail
        (tmp_path / name).write_bytes((MODEL_DIR / name).read_bytes())
    with pytest.raises(RunError, match=r"^--tp_size 2 does not divide the 3 attention heads"):
        load_model(str(tmp_path), ["angular_leaf_spot", "bean_rust", "healthy"],
                   PluginSettings("hybrid_parallel", "bf16", tp_size=2))
    with pytest.raises(RunError, match=r"^cannot load model"):  # the layout fits: the missing weights are next
        load_model(str(tmp_path), ["a", "b", "c"], PluginSettings("hybrid_parallel", "bf16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
@pytest.mark.parametrize("plugin", ["torch_ddp_fp16", "low_level_zero", "gemini", "hybrid_parallel"])
def test_gpu_plugin_on_cpu_names_the_plugin_that_runs(capsys, plugin):
    message = parse_error(capsys, ["--plugin", plugin])
    assert f"--plugin {plugin} needs a CUDA GPU" in message and "use --plugin torch_ddp" in message


def test_precision_defaults_to_bf16_on_a_gpu_and_fp32_on_the_cpu():
    on_gpu = torch.cuda.is_available()
    assert parse_demo_args(["--plugin", "torch_ddp"]).precision == ("bf16" if on_gpu else "fp32")
    if on_gpu:
        assert parse_demo_args(["--plugin", "torch_ddp_fp16"]).precision == "fp16"
        assert parse_demo_args(["--plugin", "gemini"]).precision == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_half_precision_on_cpu_names_the_fix(capsys):
    message = parse_error(capsys, ["--plugin", "torch_ddp", "--precision", "bf16"])
    assert "--precision bf16 needs a CUDA GPU" in message and "use --precision fp32" in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU plugins are refused earlier on the CPU")
@pytest.mark.parametrize("argv, message", [
    (["--plugin", "gemini", "--precision", "fp32"], "--plugin gemini trains in bf16 or fp16"),
    (["--plugin", "torch_ddp_fp16", "--precision", "bf16"], "use --plugin torch_ddp --precision bf16"),
])
def test_precision_a_plugin_cannot_train_in_is_refused(capsys, argv, message):
    assert message in parse_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cap is refused only where there is no GPU to cap")
def test_a_gpu_memory_cap_without_a_gpu_is_refused(capsys):
    message = parse_error(capsys, ["--plugin", "torch_ddp", "--max_gpu_memory_gib", "4"])
    assert message.startswith("error: --max_gpu_memory_gib 4 caps GPU memory and no CUDA GPU is available")


@pytest.mark.parametrize("argv, message", [
    (["--plugin", "torch_ddp", "--offload", "optimizer"],
     "--plugin torch_ddp cannot --offload optimizer; use --plugin low_level_zero or gemini or hybrid_parallel"),
    (["--plugin", "torch_ddp", "--offload", "disk"], "argument --offload: invalid choice: 'disk'"),
    (["--plugin", "torch_ddp", "--offload_fraction", "0.5"],
     "--offload_fraction 0.5 splits what gemini offloads; it needs --plugin gemini with --offload optimizer or all"),
    (["--plugin", "torch_ddp", "--offload_fraction", "1.5"], "--offload_fraction: must be in [0, 1], got 1.5"),
])
def test_offload_a_plugin_cannot_do_is_refused(capsys, argv, message):
    assert message in parse_error(capsys, argv)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU plugins are refused earlier on the CPU")
@pytest.mark.parametrize("argv, message", [
    (["--plugin", "low_level_zero", "--offload", "all"],
     "--plugin low_level_zero cannot --offload all; use --plugin gemini (low_level_zero and hybrid_parallel offload "
     "only the optimizer)"),
    (["--plugin", "hybrid_parallel", "--offload", "optimizer", "--precision", "fp32"],
     "--plugin hybrid_parallel offloads through ZeRO, which trains in bf16 or fp16, not --precision fp32"),
    (["--plugin", "low_level_zero", "--offload", "optimizer", "--offload_fraction", "0.5"],
     "it needs --plugin gemini with --offload optimizer or all"),
])
def test_offload_a_gpu_plugin_cannot_do_is_refused(capsys, argv, message):
    assert message in parse_error(capsys, argv)


def test_what_a_model_family_cannot_do_is_refused_from_its_config():
    from transformers import BertConfig, ConvNextConfig, SwinConfig

    from errors import RunError
    from models import classifier_class, model_error

    def error(config, plugin="torch_ddp", image_size=None, grad_checkpoint=False):
        return model_error(config, classifier_class(config, "m"), PluginSettings(plugin, "bf16"), image_size,
                           grad_checkpoint, "m")

    convnext, swin = ConvNextConfig(num_labels=3), SwinConfig(num_labels=3)
    assert error(convnext) is None and error(swin, grad_checkpoint=True) is None
    assert error(convnext, plugin="hybrid_parallel") == (
        "--plugin hybrid_parallel builds models through Colossal-AI's ShardFormer, which has no policy for "
        "ConvNextForImageClassification (m); use --plugin torch_ddp or low_level_zero or gemini")
    assert error(ViTConfig(num_labels=3), plugin="hybrid_parallel") is None
    assert error(convnext, grad_checkpoint=True) == (
        "--grad_checkpoint: transformers' ConvNextForImageClassification cannot recompute its activations; drop "
        "--grad_checkpoint")
    assert error(swin, image_size=384) == ("--image_size 384: another resolution than the checkpoint's is supported "
                                           "for ViTs, not for SwinForImageClassification; drop --image_size")
    with pytest.raises(RunError, match=r"^m is a bert model, which transformers cannot build as an image classifier"):
        classifier_class(BertConfig(), "m")


def test_lora_settings_without_lora_or_on_a_plugin_without_it_are_refused(capsys):
    assert parse_error(capsys, ["--plugin", "torch_ddp", "--lora_alpha", "32"]) == (
        "error: --lora_alpha 32.0 is for LoRA adapters and there are none; add --lora_rank (e.g. 16), or drop "
        "--lora_alpha (see --help)")
    assert parse_error(capsys, ["--plugin", "torch_ddp", "--lora_target_modules", "query"]).startswith(
        "error: --lora_target_modules query is for LoRA adapters and there are none")
    assert parse_demo_args(["--plugin", "torch_ddp", "--lora_rank", "8", "--lora_alpha", "16"]).lora_rank == 8
    gemini, split = PluginSettings("gemini", "bf16", lora_rank=8), PluginSettings("hybrid_parallel", "bf16", tp_size=2,
                                                                                   lora_rank=8)
    assert settings_error(gemini, on_gpu=True) == (
        "--lora_rank 8 needs --plugin torch_ddp or torch_ddp_fp16 or low_level_zero or hybrid_parallel (Colossal-AI "
        "0.5.0 trains LoRA adapters with those, without tensor parallelism); got --plugin gemini")
    assert settings_error(split, on_gpu=True).endswith("got --plugin hybrid_parallel --tp_size 2")


def test_qlora_without_lora_off_a_gpu_or_on_a_plugin_that_casts_the_model_is_refused(capsys):
    assert parse_error(capsys, ["--plugin", "torch_ddp", "--lora_quantize"]) == (
        "error: --lora_quantize holds the weights under LoRA adapters in 4 bits and there are none; add --lora_rank "
        "(e.g. 16), or drop --lora_quantize (see --help)")
    if not torch.cuda.is_available():
        assert parse_error(capsys, ["--plugin", "torch_ddp", "--lora_rank", "8", "--lora_quantize"]) == (
            "error: --lora_quantize needs a CUDA GPU (Colossal-AI quantizes the weights on one) and none is "
            "available; drop it on the CPU (see --help)")
    zero = PluginSettings("low_level_zero", "bf16", lora_rank=8, lora_quantize=True)
    assert settings_error(zero, on_gpu=True) == (
        "--lora_quantize needs --plugin torch_ddp (the others cast the model to their training precision, which "
        "would unpack its 4-bit weights); got --plugin low_level_zero")


def test_the_host_memory_a_run_needs_is_checked_against_what_is_available():
    from models import host_memory_error
    offloaded = PluginSettings("gemini", "fp16", offload="all")
    gib = 2**30
    assert host_memory_error(6.48e9, offloaded, 1, 125 * gib, "m") is None  # the largest-model benchmark's run
    assert host_memory_error(6.48e9, offloaded, 1, 90 * gib, "m") == (
        "m has 6.5B parameters, and training it needs at least 97 GiB of host memory (16 bytes a parameter with "
        "--offload all: fp32 weights, Adam's states, 16-bit weights and gradients), more than the 90.0 GiB this "
        "machine has available; train it on a machine with more memory, or a smaller model")
    assert host_memory_error(6.48e9, PluginSettings("torch_ddp", "bf16"), 4, 90 * gib, "m").startswith(
        "m has 6.5B parameters, and training it needs at least 97 GiB of host memory (4 bytes a parameter in each "
        "of 4 processes, reading the fp32 weights)")
    lora = PluginSettings("low_level_zero", "fp16", offload="optimizer", lora_rank=16)  # frozen: no Adam states
    assert host_memory_error(6.48e9, lora, 1, 90 * gib, "m") is None


@pytest.mark.parametrize("settings, grad_checkpoint, cap, remedies", [
    (PluginSettings("torch_ddp", "bf16"), False, 24, "with torch_ddp; try --offload optimizer (low_level_zero, gemini, "
     "hybrid_parallel), --grad_checkpoint, a smaller --batch_size or a higher cap"),
    (PluginSettings("gemini", "fp16", offload="all"), True, None, "with gemini --offload all; try a smaller "
     "--batch_size"),
    (PluginSettings("gemini", "fp16", offload="optimizer", offload_fraction=0.5), True, None, "with gemini --offload "
     "optimizer; try a higher --offload_fraction than 0.5 or a smaller --batch_size"),
    (PluginSettings("torch_ddp", "bf16", lora_rank=16), True, 24, "with torch_ddp and LoRA of rank 16; try "
     "--lora_quantize (frozen weights in 4 bits), a smaller --batch_size or a higher cap"),
    (PluginSettings("torch_ddp", "bf16", lora_rank=16, lora_quantize=True), True, None, "with torch_ddp and LoRA of "
     "rank 16 over 4-bit weights; try a smaller --batch_size"),
    (PluginSettings("gemini", "fp16", offload="all"), True, 24, "with gemini --offload all; try --data_mode stream "
     "(freeing the 0.18 GiB of images cached on the GPU), a smaller --batch_size or a higher cap"),
])
def test_running_out_of_gpu_memory_names_what_to_try_for_the_run(settings, grad_checkpoint, cap, remedies):
    from devices import out_of_memory_named

    with pytest.raises(RunError) as stopped, out_of_memory_named("m", 6.5e9, 32, settings, grad_checkpoint,
                                                                 cap) as gpu_use:
        if "--data_mode stream" in remedies:  # beans, cached as the run caches it
            gpu_use["cached_images_gib"] = 1295 * 3 * 224 * 224 / 2**30
        raise torch.OutOfMemoryError("CUDA out of memory")
    limit = f"the --max_gpu_memory_gib {cap} cap" if cap else "the GPU's memory"
    assert str(stopped.value) == f"out of GPU memory under {limit}, training m (6500.0M parameters) at --batch_size 32 " \
        + remedies
