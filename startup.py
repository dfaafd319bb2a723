"""How the training script starts: the libraries' warnings that do not concern it hidden, and its libraries imported
without the parts it never uses. Each cut is measured in benchmarks/results (end to end, start-up cuts)."""
import importlib
import importlib.util
import logging
import os
import warnings

from errors import RunError

# warnings of the libraries about optional extras this example does not use (async checkpoint saving with
# TensorNVMe, apex's fused RMSNorm) or about their own use of deprecated PyTorch APIs
LIBRARY_NOISE = ("Please install the latest tensornvme", "Please install apex from source",
                 ".*but apex is not installed", "TypedStorage is deprecated",
                 r".*torch\.cuda\.amp\.GradScaler\(args\.\.\.\)` is deprecated")
# loggers that warn about such extras: bitsandbytes' 4-bit CPU kernels from the `kernels` hub (on CPUs with
# AVX512-BF16, as it loads)
NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops",)
# Colossal-AI's advice that the example already follows, said by its logger as a line naming the call, then the
# advice: low_level_zero's enable_lora asks to check the learning rate, as the user does for any run
ADVICE_FOLLOWED = ("enable_lora", "You have enabled LoRa training")
# loggers that say an error before raising it, which the example then says in its one line: datasets' parquet
# loader on a shard it cannot read (data.py names the shard, with the reason)
ERRORS_SAID_TWICE = ("datasets.packaged_modules.parquet.parquet",)


def hide_library_noise():
    for message in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("colossalai").addFilter(
        lambda record: not any(advice in record.getMessage() for advice in ADVICE_FOLLOWED))
    for name in ERRORS_SAID_TWICE:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def import_libraries():
    """Imports transformers and Colossal-AI; call it before anything else imports them."""
    # transformers imports scikit-learn, where it is installed, for assisted text generation, which a classifier
    # never does: 1.7 s of every start on the GPU machine
    import transformers.utils.import_utils
    transformers.utils.import_utils._sklearn_available = False
    # bitsandbytes, which Colossal-AI imports for its quantised training (here only --lora_quantize), wraps some of
    # its kernels in torch.compile as it loads, which imports PyTorch's inductor. With dynamo off while Colossal-AI
    # loads, those wrappers stay plain functions; the user's setting is restored before anything runs, so
    # torch.compile works as before. With both cuts a start on the CPU machine takes 3.65 s instead of 5.30
    # (benchmarks/results, start-up).
    if importlib.util.find_spec("colossalai") is None:  # said in one line, not in an ImportError's traceback
        raise RunError("colossalai is not installed: run 'pip install -r requirements.txt' first")
    setting = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        for module in ("colossalai.booster", "colossalai.nn.optimizer", "colossalai.nn.lr_scheduler"):
            importlib.import_module(module)
    finally:
        if setting is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = setting
