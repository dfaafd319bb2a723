"""Fine-tuning at another resolution than the checkpoint's: the position embeddings interpolated once, and the
model's config and image processor set to the new size, so that the saved model is served at it as it is."""
import torch


def size_error(config, image_size, model_name):
    """Why `image_size` cannot be used with the model of `config`, or None."""
    if image_size is None or image_size % config.patch_size == 0:
        return None
    patch = config.patch_size
    lower, upper = image_size // patch * patch, (image_size // patch + 1) * patch
    return (f"--image_size {image_size} is not a whole number of the {patch}-pixel patches of {model_name}; pick "
            f"{lower or upper}{f' or {upper}' if lower else ''}")


def processor_size_error(config, image_processor, model_name):
    """Why a ViT's image processor cannot feed it, or None: ViT takes images of exactly its config's image_size and
    stops at the first batch otherwise."""
    sizes = (image_processor.crop_size if getattr(image_processor, "do_center_crop", False)
             else image_processor.size) or {}
    made = (sizes.get("height"), sizes.get("width"))
    if config.model_type != "vit" or None in made or made == (config.image_size,) * 2:
        return None
    return (f"{model_name}: its image processor makes {made[0]}x{made[1]} images, but its config.json says the model "
            f"takes {config.image_size}x{config.image_size} (image_size); make preprocessor_config.json's size "
            f"{config.image_size}, or config.json's image_size {made[0]} if the weights were trained at it")


@torch.no_grad()
def set_resolution(model, image_processor, image_size):
    """Makes `model` (a ViTForImageClassification) and its `image_processor` work at `image_size` pixels a side:
    the pretrained position embeddings bicubically interpolated to the new grid of patches (transformers' own
    interpolation, which it otherwise repeats at every forward pass), and every size of the image processor scaled
    by the same factor (224 -> 384: a resize to 256 and a crop to 224 become 439 and 384)."""
    embeddings = model.vit.embeddings
    grid = image_size // model.config.patch_size
    placeholder = torch.zeros(1, grid * grid + 1, model.config.hidden_size)
    interpolated = embeddings.interpolate_pos_encoding(placeholder, image_size, image_size)
    embeddings.position_embeddings = torch.nn.Parameter(interpolated.contiguous())
    embeddings.patch_embeddings.image_size = (image_size, image_size)
    embeddings.patch_embeddings.num_patches = grid * grid
    scale = image_size / model.config.image_size
    model.config.image_size = image_size
    for name in ("size", "crop_size"):
        sizes = getattr(image_processor, name, None)
        if sizes:
            setattr(image_processor, name, {key: round(value * scale) for key, value in sizes.items()})
