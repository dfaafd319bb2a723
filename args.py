"""Command-line flags of the ViT fine-tuning example, parsed and checked before anything heavy starts.

The defaults start from the settings of the published results table (gemini, batch 32, 5 epochs, weight decay 0.5)
with a schedule that suits 5 epochs (peak learning rate 3e-4 after a warm-up of 0.1 of the steps, where the table
has 1e-4 and 0.3), light augmentation and label smoothing 0.1: the accuracy ablation in benchmarks/results shows
what each bought.
"""
import argparse
import os

import torch

from plugins import (OFFLOADS, PLUGINS, PRECISIONS, PluginSettings, default_precision, model_parallel_error,
                     precision_error, settings_error)


DATA_MODES = ("auto", "cache", "stream")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 0, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def ratio(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


class OneLineErrors(argparse.ArgumentParser):
    """Says what is wrong with the flags in one line, without the whole usage (which --help gives)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser():
    parser = OneLineErrors(description="Fine-tune a pretrained ViT on an image classification dataset "
                                     "through a Colossal-AI Booster.")
    parser.add_argument("--model_name_or_path", default="google/vit-base-patch16-224",
                        help="Hugging Face hub id or local directory of a pretrained ViT")
    parser.add_argument("--image_size", type=positive_int, default=None,
                        help="fine-tune at this resolution (pixels a side; default: the checkpoint's), its position "
                        "embeddings interpolated once; the saved model and image processor keep it")
    parser.add_argument("--dataset", default="beans",
                        help="Hugging Face hub dataset id, or a local directory: split/label/image folders, a "
                        "snapshot of a hub dataset repository (parquet or arrow shards) or a save_to_disk folder "
                        "(train and validation splits required, test optional)")
    parser.add_argument("--image_column", default=None,
                        help="the dataset's image column (default: the one column of images)")
    parser.add_argument("--label_column", default=None,
                        help="the dataset's label column (default: the one class-label column)")
    parser.add_argument("--max_train_samples", type=positive_int, default=None,
                        help="train on a random subset of this many training images, for a quick trial")
    parser.add_argument("--max_eval_samples", type=positive_int, default=None,
                        help="evaluate on a random subset of this many images of each other split")
    parser.add_argument("--data_mode", choices=DATA_MODES, default="auto",
                        help="cache: decode every image once and keep it on the training device; stream: decode "
                        "each batch in loader workers as it is needed; auto: cache when it fits --cache_budget_gib")
    parser.add_argument("--cache_budget_gib", type=positive_float, default=None,
                        help="most memory the cache may take (default: a quarter of the free GPU memory, or of "
                        "the available host memory on the CPU)")
    parser.add_argument("--num_workers", type=non_negative_int, default=None,
                        help="loader worker processes that decode and resize images (default: the CPU cores of "
                        "this process's share of the node, but one)")
    parser.add_argument("--skip_unreadable", action=argparse.BooleanOptionalAction, default=False,
                        help="leave out unreadable images, counted and named in results.json, instead of stopping")
    parser.add_argument("--output_path", default="./output_model",
                        help="where the fine-tuned model, its image processor and results.json are written")
    parser.add_argument("--plugin", default="gemini", choices=list(PLUGINS), help="Colossal-AI booster plugin")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="training precision (default: bf16 on a GPU, fp16 for torch_ddp_fp16 and with --offload, "
                        "fp32 on the CPU)")
    parser.add_argument("--num_epoch", type=positive_int, default=5, help="number of training epochs")
    parser.add_argument("--batch_size", type=positive_int, default=32,
                        help="training batch size of each data-parallel rank")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                        help="batches whose gradients add up to one optimizer step: the global batch is --batch_size "
                        "x this x the data-parallel ranks, and the schedule counts optimizer steps")
    parser.add_argument("--tp_size", type=positive_int, default=1,
                        help="tensor-parallel size (hybrid_parallel only); must divide the model's attention "
                        "heads")
    parser.add_argument("--pp_size", type=positive_int, default=1,
                        help="pipeline-parallel size (hybrid_parallel only)")
    parser.add_argument("--microbatch_size", type=positive_int, default=None,
                        help="images per pipeline microbatch (with --pp_size > 1): must split --batch_size into at "
                        "least --pp_size whole microbatches (default: the largest that does)")
    parser.add_argument("--learning_rate", type=positive_float, default=3e-4,
                        help="peak learning rate, applied as given whatever the number of GPUs")
    parser.add_argument("--warmup_ratio", type=ratio, default=0.1,
                        help="fraction of the training steps spent warming the learning rate up from 0")
    parser.add_argument("--weight_decay", type=non_negative_float, default=0.5, help="AdamW weight decay")
    parser.add_argument("--label_smoothing", type=ratio, default=0.1,
                        help="label smoothing of the training loss, in [0, 1)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                        help="random resized crop (50-100%% of the area) and horizontal flip of the training images")
    parser.add_argument("--max_gpu_memory_gib", type=positive_float, default=None,
                        help="most GPU memory this process may allocate, to share a GPU or to rehearse a smaller one "
                        "(default: all of it)")
    parser.add_argument("--offload", choices=OFFLOADS, default="none",
                        help="keep training state in host memory, to train a model larger than the GPU: optimizer "
                        "(fp32 weights and Adam states, updated on the CPU; low_level_zero, gemini, hybrid_parallel) "
                        "or all (the 16-bit weights too, fetched layer by layer; gemini)")
    parser.add_argument("--offload_fraction", type=fraction, default=1.0,
                        help="gemini: the share of what --offload names that goes to the host; below 1 the rest "
                        "stays on the GPU, which is faster while it fits")
    parser.add_argument("--lora_rank", type=non_negative_int, default=0,
                        help="LoRA: train adapters of this rank on --lora_target_modules and the whole classification "
                        "head, the rest frozen (0: full fine-tuning of every weight)")
    parser.add_argument("--lora_alpha", type=positive_float, default=None,
                        help="LoRA: the adapters' scale is this over --lora_rank (default: --lora_rank, a scale of 1)")
    parser.add_argument("--lora_dropout", type=ratio, default=0.1, help="LoRA: dropout on the adapters' input")
    parser.add_argument("--lora_target_modules", default=None,
                        help="LoRA: comma-separated names of the linear layers that get adapters (default: attention's "
                        "query and value projections, as in PEFT's image-classification guide)")
    parser.add_argument("--lora_quantize", action=argparse.BooleanOptionalAction, default=False,
                        help="QLoRA: hold the frozen weights in 4 bits (bitsandbytes' NF4 with double quantization "
                        "and bf16 compute, Colossal-AI's default), the adapters and head in full precision; with "
                        "--lora_rank on a CUDA GPU")
    parser.add_argument("--grad_checkpoint", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute activations in the backward pass to save memory")
    parser.add_argument("--verbose", action=argparse.BooleanOptionalAction, default=False,
                        help="show the libraries' warnings and logging too (hidden: those known not to concern "
                        "this example)")
    parser.add_argument("--seed", type=int, default=42, help="random seed")
    parser.add_argument("--save_every", type=non_negative_int, default=0,
                        help="also checkpoint every this many steps (0: only at the end of each epoch)")
    parser.add_argument("--keep_checkpoints", type=non_negative_int, default=1,
                        help="how many of the newest checkpoints to keep under output_path/checkpoints "
                        "(0: write none)")
    parser.add_argument("--resume_from", default=None,
                        help="checkpoint folder to continue from, or 'latest' for the newest one under "
                        "output_path/checkpoints (starts afresh if there is none)")
    return parser


def parse_demo_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available()
    if error := model_parallel_error(plugin_settings(args)):
        parser.error(error)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size % (args.tp_size * args.pp_size) != 0:
        parser.error(f"--tp_size {args.tp_size} x --pp_size {args.pp_size} = {args.tp_size * args.pp_size} "
                     f"does not divide the {world_size} launched processes; launch a multiple of it")
    if args.microbatch_size is not None and args.pp_size == 1:
        parser.error(f"--microbatch_size {args.microbatch_size} splits a pipeline's batches and there is no pipeline; "
                     "add --pp_size 2 or more (hybrid_parallel), or drop --microbatch_size")
    if args.pp_size > 1:  # Colossal-AI's pipeline schedule wants at least one whole microbatch per stage
        fitting = [size for size in range(args.batch_size, 0, -1)
                   if args.batch_size % size == 0 and args.batch_size // size >= args.pp_size]
        if not fitting:
            parser.error(f"--batch_size {args.batch_size} is fewer images than the --pp_size {args.pp_size} pipeline "
                         f"stages, each of which needs a microbatch; raise --batch_size to at least {args.pp_size}")
        if args.microbatch_size is None:  # the fewest microbatches, the largest steps: fastest (benchmarks/results)
            args.microbatch_size = fitting[0]
        if args.microbatch_size not in fitting:
            parser.error(f"--microbatch_size {args.microbatch_size} does not split --batch_size {args.batch_size} "
                         f"into at least --pp_size {args.pp_size} whole microbatches; pick one of: "
                         f"{', '.join(map(str, reversed(fitting)))}")
    if args.gradient_accumulation_steps > 1 and args.pp_size > 1:
        parser.error(f"--gradient_accumulation_steps {args.gradient_accumulation_steps} with a pipeline (--pp_size "
                     f"{args.pp_size}), which already splits each batch into microbatches: raise --batch_size "
                     "instead, or drop --pp_size")
    if args.skip_unreadable and args.pp_size > 1:  # Colossal-AI's pipeline schedule takes one batch size only
        parser.error(f"--skip_unreadable leaves a batch short of an unreadable image, and a pipeline (--pp_size "
                     f"{args.pp_size}) trains only whole batches; remove the unreadable images, or drop --pp_size")
    for flag, value in (("--lora_alpha", args.lora_alpha), ("--lora_target_modules", args.lora_target_modules)):
        if not args.lora_rank and value is not None:
            parser.error(f"{flag} {value} is for LoRA adapters and there are none; add --lora_rank (e.g. 16), or "
                         f"drop {flag}")
    if args.lora_quantize and not args.lora_rank:
        parser.error("--lora_quantize holds the weights under LoRA adapters in 4 bits and there are none; add "
                     "--lora_rank (e.g. 16), or drop --lora_quantize")
    if args.lora_quantize and not on_gpu:
        parser.error("--lora_quantize needs a CUDA GPU (Colossal-AI quantizes the weights on one) and none is "
                     "available; drop it on the CPU")
    if error := settings_error(plugin_settings(args), on_gpu):
        parser.error(error)
    if args.max_gpu_memory_gib is not None and not on_gpu:
        parser.error(f"--max_gpu_memory_gib {args.max_gpu_memory_gib:g} caps GPU memory and no CUDA GPU is available; "
                     "drop it on the CPU")
    if args.cache_budget_gib is not None and args.data_mode != "auto":
        parser.error(f"--cache_budget_gib decides between caching and streaming, which --data_mode {args.data_mode} "
                     "has already decided; drop one of them")
    if args.precision is None:
        args.precision = default_precision(args.plugin, args.offload, on_gpu)
    if error := precision_error(plugin_settings(args), on_gpu):
        parser.error(error)
    return args


def plugin_settings(args):
    """What the flags ask of the plugin."""
    return PluginSettings(args.plugin, args.precision, args.offload, args.offload_fraction, args.tp_size, args.pp_size,
                          args.microbatch_size, args.gradient_accumulation_steps, args.lora_rank,
                          args.lora_quantize)


def layout_error(config, tp_size, pp_size, model_name):
    """Why the model of `config` cannot be split as --tp_size and --pp_size say, or None if it can."""
    heads = config.num_attention_heads
    if heads % tp_size:  # Colossal-AI splits the heads (and the classifier, which models.pad_classifier widens)
        sizes = [str(size) for size in range(1, heads + 1) if heads % size == 0]
        return (f"--tp_size {tp_size} does not divide the {heads} attention heads of {model_name} (tensor "
                f"parallelism splits them); pick one of: {', '.join(sizes)}")
    if pp_size > config.num_hidden_layers:
        return (f"--pp_size {pp_size} is more pipeline stages than the {config.num_hidden_layers} layers of "
                f"{model_name}; pick at most {config.num_hidden_layers}")
    return None
