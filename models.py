"""Which model: any image classifier transformers loads (AutoModelForImageClassification: ViT, DeiT, BEiT, DINOv2,
Swin, ConvNeXt, SigLIP's vision tower, ...), with a new head for the dataset's labels, trained in full or through
LoRA adapters. What a run asks of the model (a plugin that must shard it, a tensor or pipeline layout, another
resolution, gradient checkpointing, the host memory it takes) is checked against its config, before its weights are
read."""
import functools
import json
import os

import torch
import transformers

from args import layout_error
from devices import available_host_bytes, processes_on_node
from errors import RunError
from plugins import PLUGINS, able
from resolution import processor_size_error, set_resolution, size_error

# host memory a parameter takes while training, per node: with offload, its fp32 weight, Adam's two states and its
# 16-bit weight and gradient (16 bytes; a 6.48B ViT with OFFLOAD=all took 98 GiB: benchmarks/results, largest
# model); otherwise each process reads its fp32 weights on the host before moving them to the GPU (4 bytes)
HOST_BYTES_OFFLOADED, HOST_BYTES_LOADED = 16, 4

# the image classifiers Colossal-AI 0.5.0's ShardFormer has a policy for (colossalai/shardformer/policies/
# auto_policy.py), which hybrid_parallel needs to build the model at all
SHARDFORMER_CLASSIFIERS = ("ViTForImageClassification",)


def classifier_class(config, model_name):
    """The class AutoModelForImageClassification builds for `config`, or a one-line refusal."""
    classes = transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING.get(type(config), None)
    if classes is None:
        raise RunError(f"{model_name} is a {config.model_type} model, which transformers cannot build as an image "
                       "classifier (AutoModelForImageClassification); pass an image model such as a ViT, DeiT, BEiT, "
                       "DINOv2, Swin, ConvNeXt or SigLIP")
    return classes[0] if isinstance(classes, tuple) else classes


def model_error(config, model_class, settings, image_size, grad_checkpoint, model_name):
    """Why the model of `config` (built as `model_class`) cannot train as asked, or None."""
    name = model_class.__name__
    if PLUGINS[settings.plugin].model_parallel and name not in SHARDFORMER_CLASSIFIERS:
        others = able(lambda plugin: plugin.on_cpu or not plugin.model_parallel and plugin.variant_of is None)
        return (f"--plugin {settings.plugin} builds models through Colossal-AI's ShardFormer, which has no policy for "
                f"{name} ({model_name}); use --plugin {others}")
    if settings.tp_size * settings.pp_size > 1 and (error := layout_error(config, settings.tp_size, settings.pp_size,
                                                                          model_name)):
        return error
    if image_size and config.model_type != "vit":
        return (f"--image_size {image_size}: another resolution than the checkpoint's is supported for ViTs, not for "
                f"{name}; drop --image_size")
    if error := size_error(config, image_size, model_name):
        return error
    if grad_checkpoint and not model_class.supports_gradient_checkpointing:
        return f"--grad_checkpoint: transformers' {name} cannot recompute its activations; drop --grad_checkpoint"
    return None


def host_memory_error(parameters, settings, processes, available, model_name):
    """Why training `parameters` as `settings` say cannot fit the `available` bytes of host memory, or None."""
    offloaded = settings.offload != "none" and not settings.lora_rank  # LoRA's frozen weights have no Adam states
    needed = parameters * (HOST_BYTES_OFFLOADED if offloaded else HOST_BYTES_LOADED * processes)
    if needed <= available:
        return None
    each = f" in each of {processes} processes" if processes > 1 else ""
    how = (f"{HOST_BYTES_OFFLOADED} bytes a parameter with --offload {settings.offload}: fp32 weights, Adam's states, "
           "16-bit weights and gradients" if offloaded else
           f"{HOST_BYTES_LOADED} bytes a parameter{each}, reading the fp32 weights")
    return (f"{model_name} has {parameters / 1e9:.1f}B parameters, and training it needs at least "
            f"{needed / 2**30:.0f} GiB of host memory ({how}), more than the {available / 2**30:.1f} GiB this "
            "machine has available; train it on a machine with more memory, or a smaller model")


def load_model(model_name, names, settings, image_size=None, grad_checkpoint=False):
    """The image processor, and the model with a new classification head for `names`, trained as `settings`
    (plugins.PluginSettings) say, at `image_size` pixels a side if given (resolution.py), recomputing activations
    in the backward pass if `grad_checkpoint`."""
    from transformers.modeling_utils import init_empty_weights, no_init_weights  # after startup.import_libraries
    try:
        config = transformers.AutoConfig.from_pretrained(model_name, num_labels=len(names),
                                                         id2label=dict(enumerate(names)),
                                                         label2id={name: i for i, name in enumerate(names)})
        model_class = classifier_class(config, model_name)
        with init_empty_weights(), no_init_weights():  # its size: parameters on the meta device, uninitialised
            parameters = sum(parameter.numel() for parameter in model_class(config).parameters())
        if error := (model_error(config, model_class, settings, image_size, grad_checkpoint, model_name) or
                     host_memory_error(parameters, settings, processes_on_node(), available_host_bytes(),
                                       model_name)):
            raise RunError(error)
        image_processor = transformers.AutoImageProcessor.from_pretrained(model_name, use_fast=True)
        if error := processor_size_error(config, image_processor, model_name):
            raise RunError(error)
        model = model_class.from_pretrained(model_name, config=config, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as error:  # ValueError: a config.json transformers cannot read
        first_line = str(error).splitlines()[0]
        raise RunError(f"cannot load model '{model_name}' ({first_line}); check the name, or pass a local copy: "
                       "--model_name_or_path /path/to/model") from None
    if image_size and image_size != config.image_size:
        set_resolution(model, image_processor, image_size)
    for name, parameter in model.named_parameters():
        # masked image modelling's token (DINOv2 has one), which classifying never uses: DDP would stop at the
        # second step, its gradient never having come
        if name.endswith("mask_token"):
            parameter.requires_grad_(False)
    if grad_checkpoint:
        model.gradient_checkpointing_enable()
    if settings.tp_size > 1:
        pad_classifier(model, settings.tp_size)
    return image_processor, model


def pad_classifier(model, multiple):
    """Widens `model`'s classifier to a multiple of `multiple` outputs, which tensor parallelism splits evenly across
    its ranks (Colossal-AI 0.5.0 splits the classifier's outputs), so any number of labels works. The padded
    outputs start at zero and are cut off the model's logits by a forward hook, so no loss, accuracy or prediction
    sees them, and no gradient reaches them; save_unpadded_classifier drops them from the saved model."""
    classifier, labels = model.classifier, model.classifier.out_features
    outputs = -(-labels // multiple) * multiple
    if outputs == labels:
        return
    wider = torch.nn.Linear(classifier.in_features, outputs, dtype=classifier.weight.dtype,
                            device=classifier.weight.device)
    with torch.no_grad():
        wider.weight.zero_()
        wider.bias.zero_()
        wider.weight[:labels] = classifier.weight
        wider.bias[:labels] = classifier.bias
    model.classifier = wider
    model.num_labels = outputs  # ShardFormer's pipeline forward reads the classifier's outputs as this many labels
    model.register_forward_hook(functools.partial(cut_to_labels, labels))


def cut_to_labels(labels, model, inputs, output):
    """A forward hook: the model's `output` with the logits of its first `labels` outputs only."""
    if "logits" in output:  # the last pipeline stage's output; earlier stages pass their hidden states on
        output["logits"] = output["logits"][..., :labels]
    return output


def save_unpadded_classifier(output_path, labels):
    """Cuts the saved model in `output_path` (safetensors shards and their index, as the booster writes them) back
    to the classifier outputs of its `labels` labels, where pad_classifier widened it; transformers and predict.py
    then load it as any other."""
    from safetensors.torch import load_file, save_file

    weight_map = json.load(open(os.path.join(output_path, "model.safetensors.index.json")))["weight_map"]
    for file in {weight_map["classifier.weight"], weight_map["classifier.bias"]}:
        tensors = load_file(os.path.join(output_path, file))
        padded = [name for name in ("classifier.weight", "classifier.bias") if len(tensors.get(name, ())) > labels]
        for name in padded:
            tensors[name] = tensors[name][:labels].clone()
        if padded:  # a shard without padding (labels a multiple of the tensor-parallel size) stays as written
            save_file(tensors, os.path.join(output_path, file), metadata={"format": "pt"})


def with_lora(model, booster, rank, alpha, dropout, target_modules, quantize=False, autocast_dtype=None):
    """`model` with LoRA adapters of `rank` on the linear layers named in `target_modules` (comma-separated) and
    its classification head trained in full, through Colossal-AI's booster.enable_lora (PEFT underneath); with
    `quantize`, its other linear layers held in 4 bits (QLoRA: Colossal-AI's bitsandbytes NF4 default). Trained
    under autocast to `autocast_dtype`, its frozen layers are held in that dtype (hold_frozen_layers_in)."""
    from peft import LoraConfig
    targets = [name.strip() for name in target_modules.split(",") if name.strip()]
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=["classifier"])
    if quantize and model.is_gradient_checkpointing:
        # PEFT makes the recomputed layers' inputs require gradients for a model in full precision only (else it
        # leaves it to prepare_model_for_kbit_training): without them no gradient reaches the adapters there
        model.enable_input_require_grads()
    try:
        model = booster.enable_lora(model, lora_config=config, quantize=quantize)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and "classifier" not in name})
        raise RunError(f"--lora_target_modules {target_modules} names no layer of {type(model).__name__}; name some "
                       f"of its linear layers: {', '.join(linear)}") from None
    if autocast_dtype and not quantize:
        hold_frozen_layers_in(model, autocast_dtype)
    return model


def hold_frozen_layers_in(model, dtype):
    """Casts the weights of `model`'s frozen linear and convolution layers to `dtype`, the 16-bit dtype autocast
    computes those layers in: autocast casts them to it in every forward pass anyway, so the model computes exactly
    the same while its frozen weights take half the memory (a 6.5B ViT's 24 GiB become 12)."""
    for module in model.modules():
        if (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
                and not any(parameter.requires_grad for parameter in module.parameters())):
            module.to(dtype)


def save_merged(boosted_model, output_path):
    """Saves the LoRA-trained `boosted_model` as a plain model, its adapters merged into the weights, which
    transformers and predict.py load as they are (on one rank, after the adapters are saved: merging ends them)."""
    peft_model = boosted_model.unwrap(unwrap_peft=False)
    if getattr(peft_model.base_model.model, "is_loaded_in_4bit", False):
        dequantize_merged(peft_model)
    # merged on the host in full precision (frozen layers held in 16 bits by hold_frozen_layers_in too): a model
    # that LoRA trains under a GPU memory cap may not fit it in fp32
    peft_model.cpu().float()
    peft_model.merge_and_unload().save_pretrained(output_path, safe_serialization=True)


def dequantize_merged(peft_model):
    """Turns QLoRA's 4-bit linear layers back into full-precision ones on the host, in place: each weight as
    bitsandbytes dequantizes it in the forward pass, the adapters added to the layers they adapt in full precision
    (PEFT's own merge would quantize the sum again)."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    model = peft_model.base_model.model

    def replace(name, base, weight):
        linear = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight.float().cpu())
        if base.bias is not None:
            linear.bias = torch.nn.Parameter(base.bias.data.float().cpu())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)

    def dequantized(layer):
        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()

    adapted = [(name, module) for name, module in model.named_modules()
               if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), bnb.nn.Linear4bit)]
    for name, module in adapted:
        base = module.get_base_layer()
        weight = dequantized(base) + sum(module.get_delta_weight(adapter).float() for adapter in module.active_adapters)
        replace(name, base, weight)
    for name, module in [(name, module) for name, module in model.named_modules()
                         if isinstance(module, bnb.nn.Linear4bit)]:
        replace(name, module, dequantized(module))
    model.is_loaded_in_4bit = False
