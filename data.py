"""Every way an image-classification dataset reaches the model.

Where it is read from (load_splits): a hub id, or a local copy in any form users keep one: an image folder laid
out as split/label/image, a snapshot of a hub dataset repository (parquet or arrow shards), or a DatasetDict
written by `save_to_disk`.

How its images reach the device (SplitImages): DataLoader worker processes decode each image and resize it to
the model's resolution with the model's image processor, kept as uint8 (150 KB an image at 224 px, a quarter of
float32). When all splits fit the cache budget, that happens once, up front, and the result stays on the training
device, so no epoch decodes a JPEG or copies to the device again. Otherwise the images stream: the workers make
every batch as it is needed, into pinned memory, and host and device memory stay flat however large the dataset
is. Both paths hand the same uint8 pixels to `Normalise`, which turns a whole batch into model input on the device.
"""
import io
import math
import os

import torch
import torch.nn.functional as F
from datasets import ClassLabel, DatasetDict, concatenate_datasets
from datasets import Image as ImageFeature
from datasets import disable_progress_bars, load_dataset, load_from_disk
from datasets.data_files import SPLIT_KEYWORDS
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, DistributedSampler

REQUIRED_SPLITS = ("train", "validation")
SHARD_EXTENSIONS = (".parquet", ".arrow")
ACCEPTED_LAYOUTS = ("split/label/image folders (train/healthy/1.jpg), a hub dataset snapshot with parquet or arrow "
                    "shards (data/train-00000-of-00001.parquet), or a DatasetDict saved with save_to_disk")


class RunError(Exception):
    """A run that cannot go on (a bad dataset, model or path, a full disk, a diverged loss): the one-line message
    names what is wrong and the fix."""


class UnreadableImage(RunError):
    def __init__(self, reason):
        super().__init__(f"cannot read image {reason}")
        self.reason = reason  # "<path>: <what the decoder said>"


def open_rgb(image, draft_size=0):
    """Decodes one undecoded image cell ({"bytes", "path"}) to an upright RGB picture; a JPEG at the smallest
    power-of-two scale that still leaves every side draft_size pixels or more (several times faster to decode)."""
    source = io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]
    try:
        with Image.open(source) as picture:
            if draft_size:
                picture.draft("RGB", (draft_size, draft_size))
            return ImageOps.exif_transpose(picture).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImage(f"{image['path']}: {error}") from None


def looks_like_path(dataset):
    return dataset.startswith((os.sep, ".", "~")) or os.path.exists(dataset)


def load_splits(dataset, image_column=None, label_column=None):
    """Loads a dataset as a DatasetDict with columns `image` (undecoded: {"bytes", "path"}) and `labels`."""
    if looks_like_path(dataset):
        disable_progress_bars()  # a local copy's "Downloading data" and "Generating split" bars tell nothing
        splits = load_local(dataset)
    else:
        try:
            splits = load_dataset(dataset)
        except Exception as error:  # offline, unknown id, gated: all end the same way for the user
            raise RunError(f"cannot load dataset '{dataset}' from the Hugging Face hub ({type(error).__name__}: "
                            f"{error}); offline, pass a local copy: --dataset /path/to/split/label/images") from None
    for name in REQUIRED_SPLITS:
        if name not in splits or len(splits[name]) == 0:
            raise RunError(f"dataset {dataset} has no {name} split (found: {', '.join(splits) or 'none'}); "
                            f"put its images in {name}/<label>/")
    return DatasetDict({name: standardise_columns(split, dataset, name, image_column, label_column)
                        for name, split in splits.items()})


def load_local(dataset):
    path = os.path.expanduser(dataset)
    if not os.path.isdir(path):
        raise RunError(f"dataset directory {dataset} does not exist; pass a hub id such as beans, or a directory "
                       f"holding {ACCEPTED_LAYOUTS}")
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return load_from_disk(path)
    if os.path.isfile(os.path.join(path, "state.json")):
        raise RunError(f"{dataset} holds a single Dataset saved with save_to_disk; save a DatasetDict with train "
                       "and validation splits instead")
    shards = [name for _, _, names in os.walk(path) for name in names if name.endswith(SHARD_EXTENSIONS)]
    if shards:
        try:
            return load_dataset(path)
        except Exception as error:
            raise RunError(f"cannot load the dataset shards under {dataset} ({type(error).__name__}: "
                           f"{str(error).splitlines()[0]}); name them <split>-00000-of-00001.parquet") from None
    # listing the files for the loader saves it matching dozens of split-name patterns against each (minutes for
    # tens of thousands of images)
    return load_dataset("imagefolder", data_files=image_folder_files(path, dataset))


def visible_entries(directory):
    return sorted((entry for entry in os.scandir(directory) if not entry.name.startswith(".")), key=lambda e: e.name)


def image_folder_files(path, dataset):
    """The image files of each split of an image folder, its split folders named as the hub names them (val, valid
    and dev are validation). Refuses a folder of none of the accepted layouts, and what the image-folder loader
    would otherwise drop without a word: files beside the label folders, empty label folders, and files that are
    not images."""
    split_folders = [entry for entry in visible_entries(path) if entry.is_dir()]  # a LICENSE beside them is fine
    if not any(label.is_dir() for split in split_folders for label in visible_entries(split.path)):
        found = ", ".join(entry.name + ("/" if entry.is_dir() else "") for entry in visible_entries(path)[:8])
        raise RunError(f"{dataset} holds none of the accepted dataset layouts (found: {found or 'nothing'}); "
                       f"accepted: {ACCEPTED_LAYOUTS}")
    split_names = {keyword: str(split) for split, keywords in SPLIT_KEYWORDS.items() for keyword in keywords}
    files = {}
    for split in split_folders:
        for label in visible_entries(split.path):
            if not label.is_dir():
                raise RunError(f"stray file {label.path}: images go in {split.name}/<label>/; move or delete it")
            images = visible_entries(label.path)
            if not images:
                raise RunError(f"label folder {label.path} is empty; add its images or remove the folder")
            for image in images:
                if os.path.splitext(image.name)[1].lower() not in ImageFolder.EXTENSIONS:
                    raise RunError(f"{image.path} is not an image file (by its extension); move or delete it")
            files.setdefault(split_names.get(split.name, split.name), []).extend(image.path for image in images)
    return files


def find_column(split, wanted, feature_type, flag, split_name):
    """The column named by `flag` (`wanted`), else the one column of `feature_type`."""
    if wanted is not None:
        if wanted not in split.column_names:
            raise RunError(f"{flag} {wanted} is not a column of the {split_name} split "
                           f"(columns: {', '.join(split.column_names)})")
        return wanted
    found = [name for name, feature in split.features.items() if isinstance(feature, feature_type)]
    if len(found) != 1:
        kind = "image" if feature_type is ImageFeature else "class-label"
        raise RunError(f"the {split_name} split has {len(found) or 'no'} {kind} columns "
                       f"(features: {dict(split.features)}); name the one to use with {flag}")
    return found[0]


def standardise_columns(split, dataset, split_name, image_column=None, label_column=None):
    image = find_column(split, image_column, ImageFeature, "--image_column", split_name)
    label = find_column(split, label_column, ClassLabel, "--label_column", split_name)
    split = split.select_columns([image, label]).rename_columns({image: "image", label: "labels"})
    if not isinstance(split.features["labels"], ClassLabel):  # strings or numbers: their sorted values are classes
        split = split.class_encode_column("labels")
    return split.cast_column("image", ImageFeature(decode=False))


def labels_of(split):
    """The label column as a list, read in one batch (indexing datasets' Column object reads row by row: minutes
    for a large split)."""
    return split.select_columns(["labels"])[:]["labels"]


def label_names(splits, dataset):
    """The class names, after checking that every split holds exactly the classes the train split holds."""
    names = splits["train"].features["labels"].names
    in_train = set(labels_of(splits["train"]))
    for split_name, split in splits.items():
        if split.features["labels"].names != names:
            raise RunError(f"the {split_name} split of {dataset} names its classes {split.features['labels'].names}, "
                           f"train names them {names}; give every split the same classes")
        present = set(labels_of(split))
        if present != in_train:
            extra = sorted(names[i] for i in present - in_train)
            missing = sorted(names[i] for i in in_train - present)
            raise RunError(f"the {split_name} split of {dataset} has other labels than train "
                            f"(only in {split_name}: {extra or 'none'}; missing from {split_name}: {missing or 'none'}); "
                            "every split needs the same label folders, each with images")
    if len(in_train) < len(names):
        raise RunError(f"dataset {dataset} declares labels {names} but train has images of only "
                        f"{sorted(names[i] for i in in_train)}")
    return names


def limit_samples(splits, max_train_samples, max_eval_samples, seed):
    """A random subset of each split for a quick trial (the same subset for the same seed)."""
    def first(split, count):
        return split if count is None or count >= len(split) else split.shuffle(seed=seed).select(range(count))
    return DatasetDict({name: first(split, max_train_samples if name == "train" else max_eval_samples)
                        for name, split in splits.items()})


class Decoder:
    """Turns undecoded image cells into uint8 pixel values [N, 3, H, W] at the model's resolution, through the
    model's image processor with its rescaling and normalisation left for the device (Normalise).

    It runs in loader workers: it decodes each image (a JPEG at reduced scale, through its draft mode) and resizes
    the batch with the image processor, so that the training process only copies the result to the device.
    Resizing in the training process instead, even on the GPU, spends its CPU, which the training step needs, on
    the image processor's per-image Python (BENCHMARKS.md, streaming)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        size = image_processor.size
        self.draft_size = max(size.get("shortest_edge", 0), size.get("height", 0), size.get("width", 0))
        self.shape = tuple(self.resize([Image.new("RGB", (8, 8))]).shape[1:])

    def resize(self, pictures):
        return self.image_processor(pictures, do_rescale=False, do_normalize=False,
                                    return_tensors="pt")["pixel_values"]

    def __call__(self, images):
        """The readable images' pixel values, which of `images` were readable, and why the others were not."""
        pictures, readable, unreadable = [], [], []
        for image in images:
            try:
                pictures.append(open_rgb(image, self.draft_size))
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
    """One split as batches on the device: `batches(index_batches)` yields, for each batch of indices, the model
    input made of its readable images, their labels, and which images of the batch were readable (on the host).

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

    def batches(self, index_batches):
        """A pass over `index_batches`. Streamed images start decoding at this call, not at the first batch asked
        for, so a pass set going early (the next epoch's, while this one is evaluated) finds its first batches
        ready; starting a pass ends the split's pass before it."""
        if self.cached:
            return self.cached_batches(index_batches)
        self.plan.indices = index_batches
        return self.streamed_batches(index_batches, iter(self.loader))

    def cached_batches(self, index_batches):
        for indices in index_batches:
            readable = self.readable[indices]
            kept = self.kept_on_device(indices, readable)
            yield self.normalise(self.pixel_values[kept]), self.labels[kept], readable

    def streamed_batches(self, index_batches, decoded):
        for indices, batch in zip(index_batches, decoded):
            self.check(batch["unreadable"])
            kept = self.kept_on_device(indices, batch["readable"])
            yield self.normalise(self.copied_to_device(batch["pixel_values"])), self.labels[kept], batch["readable"]

    def copied_to_device(self, pixel_values):
        """A streamed batch's pixels on the device. On a GPU the copy runs on a stream of its own, beside the steps
        already queued rather than after them (a ViT-B/16 step at batch 128 on an H200: 0.32 ms slower with the
        copy on the compute stream, 0.03 ms this way; BENCHMARKS.md)."""
        if self.copy_stream is None:
            return pixel_values.to(self.device, non_blocking=True)
        compute_stream = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            on_device = pixel_values.to(self.device, non_blocking=True)
        compute_stream.wait_stream(self.copy_stream)
        on_device.record_stream(compute_stream)  # freed only once the steps using it have run
        return on_device


def device_images(splits, image_processor, device, args, announce):
    """Every split as SplitImages, cached on the device if all of them fit the cache budget (or as args.data_mode
    says), else streamed, and the function that fills the caches (split_images); `announce` is given one line
    saying which and why before the work starts."""
    decoder = Decoder(image_processor)
    count = sum(len(split) for split in splits.values())
    cache_bytes = count * math.prod(decoder.shape)
    budget = cache_budget(device, args.cache_budget_gib, args.max_gpu_memory_gib)
    cached = args.data_mode == "cache" or (args.data_mode == "auto" and cache_bytes <= budget)
    num_workers = default_num_workers() if args.num_workers is None else args.num_workers
    size = f"{cache_bytes / 2**30:.2f} GiB as uint8"
    if args.data_mode != "auto":
        why = f"--data_mode {args.data_mode}; the cache would take {size}"
    else:
        source = ("--cache_budget_gib" if args.cache_budget_gib is not None else
                  f"a quarter of the free {'GPU' if device.type == 'cuda' else 'host'} memory")
        why = f"{size}, {'within' if cached else 'over'} the {budget / 2**30:.2f} GiB budget ({source})"
    workers = f"{num_workers} loader worker{'s' * (num_workers != 1)}"
    line = (f"data: caching all {count} images on {device}, decoded by {workers} ({why})" if cached else
            f"data: streaming {count} images through {workers} ({why})")
    announce(line)
    return split_images(splits, decoder, device, cached, num_workers, args.skip_unreadable)


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
    with open("/proc/meminfo") as meminfo:
        available_kib = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable:"))
    return available_kib * 1024 // 4 // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def default_num_workers():
    """This process's share of the node's CPU cores, but one that the training loop keeps."""
    cores = len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores - 1)


def epoch_batches(num_examples, batch_size, dp_rank, dp_size, seed, epoch):
    """This rank's training batches of an epoch, full ones only: one shuffled order of every example, dealt out
    rank by rank as torch's DistributedSampler deals it."""
    sampler = DistributedSampler(range(num_examples), num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[start:start + batch_size] for start in range(0, len(indices) - batch_size + 1, batch_size)]


def evaluation_batches(num_examples, batch_size, dp_rank, dp_size, whole_batches=False):
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


def random_resized_crop_and_flip(pixel_values, min_area=0.5, max_aspect=4 / 3):
    """A random crop of each image (min_area to all of it, aspect ratio up to max_aspect either way), resized back
    to full size and flipped left-right half of the time: one batched resampling on the batch's own device."""
    count, device = len(pixel_values), pixel_values.device
    area = torch.empty(count, device=device).uniform_(min_area, 1.0)
    aspect = torch.empty(count, device=device).uniform_(-math.log(max_aspect), math.log(max_aspect)).exp()
    width, height = (area * aspect).sqrt().clamp(max=1.0), (area / aspect).sqrt().clamp(max=1.0)
    flip = torch.where(torch.rand(count, device=device) < 0.5, -1.0, 1.0)
    # affine_grid works in [-1, 1] coordinates: scale to the crop's size, shift its centre anywhere it still fits
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 1, 1] = width * flip, height
    theta[:, 0, 2] = (torch.rand(count, device=device) * 2 - 1) * (1 - width)
    theta[:, 1, 2] = (torch.rand(count, device=device) * 2 - 1) * (1 - height)
    grid = F.affine_grid(theta, list(pixel_values.shape), align_corners=False)
    return F.grid_sample(pixel_values, grid.to(pixel_values.dtype), mode="bilinear", align_corners=False)
