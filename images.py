"""How images reach the training device: decoded and resized in DataLoader worker processes, then cached on the
device or streamed, normalised and augmented there in whole batches.

Loader workers decode each image and resize it to the model's resolution with the model's image processor, kept as
uint8 (150 KB an image at 224 px, a quarter of float32). When all splits fit the cache budget, that happens once,
up front, and the result stays on the training device, so no epoch decodes a JPEG or copies to the device again.
Otherwise the images stream: the workers make every batch as it is needed, into pinned memory, and host and device
memory stay flat however large the dataset is. Both paths hand the same uint8 pixels to `Normalise`, which turns a
whole batch into model input on the device.

Index batches (lists of positions in a split) say which images a step takes; `SplitImages.device_batches` turns
them into device batches (tensors).
"""
import io
import math
import os

import torch
import torch.nn.functional as F
from datasets import concatenate_datasets
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, DistributedSampler

from data import labels_of
from devices import available_host_bytes, processes_on_node
from errors import RunError


class UnreadableImage(RunError):
    def __init__(self, reason):
        super().__init__(f"cannot read image {reason}")
        self.reason = reason  # "<path>: <what the decoder said>"


def open_rgb(image):
    """Decodes one undecoded image cell ({"bytes", "path"}) to an upright RGB picture, as `pipeline` does: at full
    scale (a JPEG decoded at reduced scale, through Pillow's draft mode, is faster, but its pixels are not the ones
    the saved model is served: tests/test_data.py)."""
    source = io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]
    try:
        with Image.open(source) as picture:
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{image['path']}: {error}") from None


class Decoder:
    """Turns undecoded image cells into uint8 pixel values [N, 3, H, W] at the model's resolution, through the
    model's image processor with its rescaling and normalisation left for the device (Normalise).

    It runs in loader workers: it decodes each image and resizes the batch with the image processor, as serving the
    saved model does, so that the training process only copies the result to the device.
    Resizing in the training process instead, even on the GPU, spends its CPU, which the training step needs, on
    the image processor's per-image Python (benchmarks/results: streaming)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.shape = tuple(self.resize([Image.new("RGB", (8, 8))]).shape[1:])

    def resize(self, pictures):
        return self.image_processor(pictures, do_rescale=False, do_normalize=False,
                                    return_tensors="pt")["pixel_values"]

    def __call__(self, images):
        """The readable images' pixel values, which of `images` were readable, and why the others were not."""
        pictures, readable, unreadable = [], [], []
        for image in images:
            try:
                pictures.append(open_rgb(image))
                readable.append(True)
            except UnreadableImage as error:
                readable.append(False)
                unreadable.append(error.reason)
        pixel_values = self.resize(pictures) if pictures else torch.empty(0, *self.shape, dtype=torch.uint8)
        return {"pixel_values": pixel_values, "readable": torch.tensor(readable), "unreadable": unreadable}


class StreamedSplit(torch.utils.data.Dataset):
    """A split read in DataLoader workers, a batch per call (`__getitems__`)."""

    def __init__(self, split, decoder):
        self.images, self.decoder = split.select_columns(["image"]), decoder

    def __len__(self):
        return len(self.images)

    def __getitems__(self, indices):
        return self.decoder(self.images[indices]["image"])


def as_is(batch):
    return batch


def yield_to_training(worker_id):
    """Loader workers run at a lower priority: they fill the cores the training process leaves idle, and never
    slow its kernel launches down."""
    os.nice(10)


class BatchPlan:
    """The DataLoader's batch sampler: the batches of indices of the coming pass, set before each pass, so that
    one set of persistent workers serves every epoch."""

    def __init__(self):
        self.indices = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def decoding_loader(split, decoder, num_workers, **batching):
    """A DataLoader whose worker processes decode and resize the images of `split`. It has a generator of its own:
    it draws its workers' seeds from it, and drawing from the global one would shift the augmentation's random
    stream away from a cached (or resumed) run's."""
    return DataLoader(StreamedSplit(split, decoder), collate_fn=as_is, num_workers=num_workers,
                      worker_init_fn=yield_to_training, generator=torch.Generator(), **batching)


class SplitImages:
    """One split as batches on the device: `device_batches(index_batches)` yields, for each batch of indices, the
    model input made of its readable images, their labels, and which images of the batch were readable (on the host).

    Making a batch never waits for the device: which images are readable is known on the host, and indices go to
    the device without a blocking copy, so the training loop queues a step while the device runs the one before.

    An unreadable image stops the run with a one-line error naming it, or, with skip_unreadable, is left out of
    its batch and recorded in `unreadable`."""

    def __init__(self, split, decoder, device, cached, num_workers, skip_unreadable):
        self.device, self.cached, self.skip_unreadable, self.unreadable = device, cached, skip_unreadable, set()
        self.num_workers = num_workers
        self.normalise = Normalise(decoder.image_processor, device)
        self.labels = torch.tensor(labels_of(split), device=device)
        if cached:  # filled by split_images
            self.pixel_values = torch.empty(len(split), *decoder.shape, dtype=torch.uint8, device=device)
            self.readable = torch.empty(len(split), dtype=torch.bool)
        else:
            self.plan = BatchPlan()
            self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            self.loader = decoding_loader(split, decoder, num_workers, batch_sampler=self.plan,
                                          pin_memory=device.type == "cuda", persistent_workers=num_workers > 0)

    def __len__(self):
        return len(self.labels)

    def store(self, start, chunk):
        """Caches a decoded chunk of the split: its images from `start` on."""
        self.check(chunk["unreadable"])
        readable = chunk["readable"]
        self.readable[start:start + len(readable)] = readable
        self.pixel_values[torch.arange(start, start + len(readable))[readable]] = chunk["pixel_values"].to(self.device)

    def check(self, unreadable):
        if unreadable and not self.skip_unreadable:
            raise RunError(f"cannot read image {unreadable[0]}; replace or remove it, or pass --skip_unreadable "
                           "to go on without it")
        self.unreadable.update(unreadable)

    def kept_on_device(self, indices, readable):
        """The readable ones of `indices`, on the device: copied from pinned memory, which the host does not wait
        for (from pageable memory, the driver may first wait for the work already queued on the device)."""
        kept = torch.tensor(indices)[readable]
        return kept.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else kept

    def device_batches(self, index_batches):
        """A pass over `index_batches`. Streamed images start decoding at this call, not at the first batch asked
        for, so a pass set going early (the next epoch's, while this one is evaluated) finds its first batches
        ready; starting a pass ends the split's pass before it."""
        if self.cached:
            return self.cached_device_batches(index_batches)
        self.plan.indices = index_batches
        return self.streamed_device_batches(index_batches, iter(self.loader))

    def cached_device_batches(self, index_batches):
        for indices in index_batches:
            readable = self.readable[indices]
            kept = self.kept_on_device(indices, readable)
            yield self.normalise(self.pixel_values[kept]), self.labels[kept], readable

    def streamed_device_batches(self, index_batches, decoded):
        for indices, batch in zip(index_batches, decoded):
            self.check(batch["unreadable"])
            kept = self.kept_on_device(indices, batch["readable"])
            yield self.normalise(self.copied_to_device(batch["pixel_values"])), self.labels[kept], batch["readable"]

    def copied_to_device(self, pixel_values):
        """A streamed batch's pixels on the device. On a GPU the copy runs on a stream of its own, beside the steps
        already queued rather than after them (a ViT-B/16 step at batch 128 on an H200: 0.32 ms slower with the
        copy on the compute stream, 0.03 ms this way; benchmarks/results: streaming)."""
        if self.copy_stream is None:
            return pixel_values.to(self.device, non_blocking=True)
        compute_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            on_device = pixel_values.to(self.device, non_blocking=True)
        compute_stream.wait_stream(self.copy_stream)
        on_device.record_stream(compute_stream)  # freed only once the steps using it have run
        return on_device


def device_images(splits, image_processor, device, announce, data_mode="auto", cache_budget_gib=None,
                  max_gpu_memory_gib=None, num_workers=None, skip_unreadable=False):
    """Every split as SplitImages, cached on the device if all of them fit the cache budget (or as data_mode
    says), else streamed, and the function that fills the caches (split_images); `announce` is given one line
    saying which and why before the work starts. The keyword parameters are the flags of the same names."""
    decoder = Decoder(image_processor)
    count = sum(len(split) for split in splits.values())
    cache_bytes = count * math.prod(decoder.shape)
    budget = cache_budget(device, cache_budget_gib, max_gpu_memory_gib)
    cached = data_mode == "cache" or (data_mode == "auto" and cache_bytes <= budget)
    num_workers = default_num_workers() if num_workers is None else num_workers
    size = f"{cache_bytes / 2**30:.2f} GiB as uint8"
    if data_mode != "auto":
        why = f"--data_mode {data_mode}; the cache would take {size}"
    else:
        source = ("--cache_budget_gib" if cache_budget_gib is not None else
                  f"a quarter of the free {'GPU' if device.type == 'cuda' else 'host'} memory")
        why = f"{size}, {'within' if cached else 'over'} the {budget / 2**30:.2f} GiB budget ({source})"
    workers = f"{num_workers} loader worker{'s' * (num_workers != 1)}"
    line = (f"data: caching all {count} images on {device}, decoded by {workers} ({why})" if cached else
            f"data: streaming {count} images through {workers} ({why})")
    announce(line)
    return split_images(splits, decoder, device, cached, num_workers, skip_unreadable)


def split_images(splits, decoder, device, cached, num_workers, skip_unreadable, chunk_size=32):
    """Each split as SplitImages, and a function that fills their caches (nothing to do when streamed). Cached,
    the images are decoded by one pool of loader worker processes for every split: it starts once, and no worker
    idles while a split waits its turn. Workers, not threads, leave the training process free to set up meanwhile
    (threads would hold its GIL for much of the processor's work).

    The workers start here, in the calling thread; the returned function only collects their images, and may run
    in a background thread. Forked from a background thread while the main one set the booster up, they could
    hang, as a fork copies the locks other threads hold (hybrid_parallel with offload hung in 3 runs of 3)."""
    images = {name: SplitImages(split, decoder, device, cached, num_workers, skip_unreadable)
              for name, split in splits.items()}
    if not cached:
        return images, lambda: None
    chunks, index_batches, offset = [], [], 0  # chunks: (split name, first index in the split)
    for name, split in splits.items():
        for start in range(0, len(split), chunk_size):
            chunks.append((name, start))
            index_batches.append(list(range(offset + start, offset + min(start + chunk_size, len(split)))))
        offset += len(split)
    every_image = concatenate_datasets([split.select_columns(["image"]) for split in splits.values()])
    decoded = iter(decoding_loader(every_image, decoder, min(num_workers, len(index_batches)),
                                   batch_sampler=index_batches))  # forks the workers now

    def fill_caches():
        for chunk, (name, start) in zip(decoded, chunks):  # the loader first: its end shuts its workers down
            images[name].store(start, chunk)

    return images, fill_caches


def cache_budget(device, budget_gib=None, gpu_cap_gib=None):
    """Bytes the cache may take on `device`: budget_gib if given, else a quarter of what is free there (within
    gpu_cap_gib, if the GPU is capped; on the host, a quarter of its available memory shared by this node's
    processes), leaving the rest for training."""
    if budget_gib is not None:
        return int(budget_gib * 2**30)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if gpu_cap_gib:
            free = min(free, int(gpu_cap_gib * 2**30) - torch.cuda.memory_reserved(device))
        return max(free, 0) // 4
    return available_host_bytes() // 4 // processes_on_node()


def default_num_workers():
    """This process's share of the node's CPU cores, but one that the training loop keeps."""
    cores = len(os.sched_getaffinity(0)) // processes_on_node()
    return max(1, cores - 1)


def training_index_batches(num_examples, batch_size, dp_rank, dp_size, seed, epoch):
    """This rank's training index batches of an epoch, full ones only: one shuffled order of every example, dealt out
    rank by rank as torch's DistributedSampler deals it."""
    sampler = DistributedSampler(range(num_examples), num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[start:start + batch_size] for start in range(0, len(indices) - batch_size + 1, batch_size)]


def evaluation_index_batches(num_examples, batch_size, dp_rank, dp_size, whole_batches=False):
    """This rank's share of every example once, as batches of positions. Every rank gets the same number of
    batches of the same sizes (ZeRO and Gemini gather parameters collectively inside each forward pass), so the
    last rank's share is padded with positions past the end, which `evaluate` does not count. With
    `whole_batches`, every batch is padded to `batch_size` (Colossal-AI's pipeline schedule, having evaluated a
    smaller batch, refuses the next training batch)."""
    per_rank = math.ceil(num_examples / dp_size)
    if whole_batches:
        per_rank = math.ceil(per_rank / batch_size) * batch_size
    positions = list(range(dp_rank, per_rank * dp_size, dp_size))
    return [positions[start:start + batch_size] for start in range(0, len(positions), batch_size)]


class Normalise:
    """uint8 pixel values to model input on their own device: the image processor's rescaling and normalisation,
    for a whole batch at once."""

    def __init__(self, image_processor, device):
        self.scale = image_processor.rescale_factor if image_processor.do_rescale else 1.0
        mean, std = ((image_processor.image_mean, image_processor.image_std) if image_processor.do_normalize
                     else ([0.0], [1.0]))
        self.mean = torch.tensor(mean, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, device=device).view(-1, 1, 1)

    def __call__(self, pixel_values):
        return (pixel_values.float() * self.scale - self.mean) / self.std


def augmentation_draws(num_images, seed, epoch):
    """The random numbers that crop and flip each training image in an epoch, made from the seed and the epoch
    alone: an image is augmented the same way whichever rank and batch it lands in, so that the number of GPUs at
    the same global batch changes nothing (tests/test_scaling.py), and a resumed run draws what it would have."""
    return torch.rand(num_images, 5, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def augmented(device_batches, index_batches, draws):
    """`device_batches` (of the training images at `index_batches`) with each image cropped and flipped by its row
    of `draws` (augmentation_draws)."""
    for indices, (pixel_values, labels, readable) in zip(index_batches, device_batches):
        image_draws = draws[torch.tensor(indices)[readable]]
        if pixel_values.is_cuda:  # from pinned memory, which the host need not wait for (see kept_on_device)
            image_draws = image_draws.pin_memory().to(pixel_values.device, non_blocking=True)
        yield random_resized_crop_and_flip(pixel_values, image_draws), labels, readable


def random_resized_crop_and_flip(pixel_values, draws, min_area=0.5, max_aspect=4 / 3):
    """A random crop of each image (min_area to all of it, aspect ratio up to max_aspect either way), resized back
    to full size and flipped left-right half of the time, as its row of `draws` (five numbers in [0, 1)) says: one
    batched resampling on the batch's own device."""
    count = len(pixel_values)
    area = min_area + (1 - min_area) * draws[:, 0]
    aspect = ((draws[:, 1] * 2 - 1) * math.log(max_aspect)).exp()
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    flip = torch.where(draws[:, 2] < 0.5, -1.0, 1.0)
    # affine_grid works in [-1, 1] coordinates: scale to the crop's size, shift its centre anywhere it still fits
    theta = torch.zeros(count, 2, 3, device=pixel_values.device)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2] = (draws[:, 3] * 2 - 1) * (1 - width)
    theta[:, 1, 2] = (draws[:, 4] * 2 - 1) * (1 - height)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid.to(pixel_values.dtype), mode="bilinear", align_corners=False)
