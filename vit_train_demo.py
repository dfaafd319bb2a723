"""Fine-tunes a pretrained ViT (or any image classifier transformers loads) through a Colossal-AI Booster, evaluates
it on every image, and saves it.

Launch with `colossalai run --nproc_per_node N vit_train_demo.py ...` or `torchrun --nproc_per_node N ...`; one
process also runs as `python vit_train_demo.py ...`. run_finetuning.sh does all three from its variables.

main() is the recipe, top to bottom: parse, launch, data, model, booster, resume, epochs (train, evaluate,
checkpoint), save. The machinery sits in modules named for what they do: data.py (which dataset), images.py (how its
images reach the device), models.py (which model), plugins.py (what each plugin can do and how it is built),
checkpoint.py, evaluation.py, devices.py, reporting.py (lines, results.json, plots, timing) and startup.py.
"""
import itertools
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import hub
import reporting
import startup
from args import parse_demo_args, plugin_settings
from data import label_names, load_splits, random_subsets
from devices import copied_to_host, init_distributed, out_of_memory_named, peak_memory, sum_over_ranks
from errors import RunError
from evaluation import evaluate
from images import augmentation_draws, augmented, device_images, training_index_batches
from models import load_model, save_merged, save_unpadded_classifier, with_lora
from plugins import Boosted, Topology, autocast_dtype, build_booster, build_optimizer, forward_backward, gradient_sync

LOSS_READ_LAG = 2  # steps the host may queue ahead of the GPU before it waits for a step's loss


def check_output_path(output_path):
    try:
        os.makedirs(output_path, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create --output_path {output_path}: {error.strerror}") from None
    if not os.access(output_path, os.W_OK):
        raise RunError(f"--output_path {output_path} is not writable; pass a directory you can write to")


def train_epoch(boosted, device_batches, state, criterion, steps_per_epoch, accumulation, writer, clock, save_every,
                save_checkpoint):
    """Trains on `device_batches`, the rest of epoch `state.epoch`, updating `state` as it goes: an optimizer step
    every `accumulation` batches, whose gradients add up (`criterion` divides each batch's loss by `accumulation`).

    A step's loss is read (which waits for the GPU to finish the step) only once LOSS_READ_LAG more steps are
    queued, so the GPU does not idle while the CPU prepares the next step, even when a step takes the CPU about as
    long to queue as the GPU to run. It is read from a copy made in its step (`loss.item()` would be queued behind
    the steps after it and wait for them all)."""
    topology = boosted.topology
    boosted.model.train()
    training_seconds = clock.stopwatch(excluding="checkpoint_seconds")  # the checkpoints written meanwhile left out
    train_seconds_before = state.train_seconds
    unread = deque()  # (loss, its copy's event, step, learning rate) of the steps not read yet

    def read(loss, copied, step, learning_rate):
        """Waits for step `step`'s loss, checks it and reports it."""
        if copied is not None:
            copied.synchronize()
        loss_value = loss.item() if topology.holds_output else 0.0
        if not math.isfinite(loss_value):
            raise RunError(f"training loss is {loss_value} at step {step} (epoch {state.epoch + 1}); lower "
                           "--learning_rate or check the data")
        state.epoch_loss_sum += loss_value
        state.train_seconds = train_seconds_before + training_seconds()
        images_per_second = state.images_trained / state.train_seconds
        bar.update()
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", img_per_s=f"{images_per_second:.1f}")
        if writer:
            for tag, value in (("train/loss", loss_value), ("train/learning_rate", learning_rate),
                               ("train/images_per_second", images_per_second)):
                writer.add_scalar(tag, value, step)

    def read_until(left):
        """Reads the queued steps' losses, oldest first, until `left` are still queued."""
        while len(unread) > left:
            read(*unread.popleft())

    with tqdm(total=steps_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}",
              disable=not topology.reports, dynamic_ncols=True) as bar:
        step_loss = None  # the sum of the (divided) losses of this optimizer step's batches so far
        for batch_number in itertools.count(1):
            fetch_start = time.perf_counter()
            pixel_values, labels, _ = next(device_batches, (None, None, None))
            if pixel_values is None:
                break
            state.epoch_data_wait += time.perf_counter() - fetch_start
            last_of_step = batch_number % accumulation == 0
            with gradient_sync(boosted, syncs=last_of_step):
                loss, _ = forward_backward(boosted, {"pixel_values": pixel_values, "labels": labels}, criterion,
                                           backward=True)
            state.images_trained += len(labels) * topology.dp_size
            step_loss = loss if (batch_number - 1) % accumulation == 0 else step_loss + loss
            if not last_of_step:
                continue
            boosted.optimizer.step()
            boosted.optimizer.zero_grad()
            boosted.lr_scheduler.step()
            state.step_in_epoch += 1
            state.global_step += 1
            unread.append((*copied_to_host(step_loss), state.global_step, boosted.lr_scheduler.get_last_lr()[0]))
            read_until(LOSS_READ_LAG)
            # the last step of an epoch is saved after the evaluation, with the epoch's results
            if save_every and state.global_step % save_every == 0 and state.step_in_epoch < steps_per_epoch:
                read_until(0)
                save_checkpoint()
        read_until(0)


def main():
    # Parse the flags, then load the libraries (startup.py: quietly, without what the example never uses)
    args = parse_demo_args()
    clock = reporting.Clock()
    if not args.verbose:
        startup.hide_library_noise()
    startup.import_libraries()
    from colossalai.nn.lr_scheduler import CosineAnnealingWarmupLR  # loaded by import_libraries
    clock.lap("imports")

    # Launch: one process per GPU, in a process group
    device = init_distributed(args.seed, args.max_gpu_memory_gib, args.verbose)
    is_first_rank = dist.get_rank() == 0
    check_output_path(args.output_path)
    resume_from = args.resume_from and checkpoint.resolve_resume(args.resume_from, args.output_path)
    clock.lap("distributed")

    # Data: the splits, their labels, and a random subset of each for a quick trial
    hub.check_reachable("dataset", args.dataset, "--dataset")
    splits = load_splits(args.dataset, args.image_column, args.label_column)
    names = label_names(splits, args.dataset)
    splits = random_subsets(splits, args.max_train_samples, args.max_eval_samples, args.seed)
    clock.lap("dataset")

    # Model: the pretrained image classifier with a new head for the dataset's labels
    hub.check_reachable("model", args.model_name_or_path, "--model_name_or_path")
    settings = plugin_settings(args)
    image_processor, model = load_model(args.model_name_or_path, names, settings, args.image_size,
                                        args.grad_checkpoint)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if is_first_rank:
        print(reporting.describe_run(args.model_name_or_path, type(model).__name__, args.dataset, splits, parameters,
                                     device, settings, args.output_path, dist.get_world_size()))
        if "test" not in splits:
            print(f"dataset {args.dataset} has no test split: skipping the test evaluation")
    clock.lap("model")

    with out_of_memory_named(args.model_name_or_path, parameters, args.batch_size, settings, args.grad_checkpoint,
                             args.max_gpu_memory_gib) as gpu_use:
        # Plugin and booster, set up while loader workers decode the images (a background thread collects them)
        plugin, booster = build_booster(model, settings, device)
        if args.lora_rank:
            model = with_lora(model, booster, args.lora_rank, args.lora_alpha, args.lora_dropout,
                              args.lora_target_modules or "query,value", args.lora_quantize,
                              autocast_dtype(settings))
        trained_parameters = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        topology = Topology(plugin)
        accumulation = args.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(splits["train"]) / topology.dp_size) // args.batch_size // accumulation
        if steps_per_epoch == 0:  # said before any image is decoded
            accumulated = f" x {accumulation} accumulated batches" if accumulation > 1 else ""
            raise RunError(f"--batch_size {args.batch_size}{accumulated} x {topology.dp_size} data-parallel ranks "
                           f"is larger than the {len(splits['train'])} training images; lower --batch_size" +
                           (" or --gradient_accumulation_steps" if accumulation > 1 else ""))
        announce = print if is_first_rank else (lambda line: None)
        images, fill_caches = device_images(splits, image_processor, device, announce, args.data_mode,
                                            args.cache_budget_gib, args.max_gpu_memory_gib, args.num_workers,
                                            args.skip_unreadable)
        if device.type == "cuda":
            gpu_use["cached_images_gib"] = sum(split.pixel_values.nbytes for split in images.values()
                                               if split.cached) / 2**30
        with ThreadPoolExecutor(max_workers=1) as background:
            decoding = background.submit(fill_caches)
            optimizer = build_optimizer(model, settings, args.learning_rate, args.weight_decay, args.verbose)
            total_steps = steps_per_epoch * args.num_epoch
            lr_scheduler = CosineAnnealingWarmupLR(optimizer, total_steps=total_steps,
                                                   warmup_steps=int(args.warmup_ratio * total_steps))
            model, optimizer, _, _, lr_scheduler = booster.boost(model, optimizer, lr_scheduler=lr_scheduler)
            boosted = Boosted(model, optimizer, lr_scheduler, booster, topology)
            clock.lap("booster")
            if topology.reports:  # the plots' and TensorBoard's libraries, used later, load meanwhile too
                reporting.load_libraries()
            decoding.result()
        clock.lap("images")

        # Resume from a checkpoint, if asked and there is one
        state = checkpoint.TrainingState()
        if resume_from:
            state = checkpoint.load_checkpoint(boosted, resume_from, args.lora_quantize)
            if is_first_rank:
                print(f"resuming from {resume_from}: epoch {state.epoch + 1}, step {state.step_in_epoch} "
                      f"of {steps_per_epoch}")
        elif args.resume_from and is_first_rank:
            print(f"no checkpoint under {checkpoint.checkpoint_root(args.output_path)} yet: starting from scratch")
        writer = reporting.tensorboard_writer(args.output_path, state.global_step) if topology.reports else None
        clock.lap("resume")

        # Train, evaluating on every image and checkpointing at the end of each epoch
        def criterion(outputs, inputs):  # an optimizer step's batches add up to the mean over all their images
            loss = F.cross_entropy(outputs.logits.float(), inputs["labels"], label_smoothing=args.label_smoothing)
            return loss / accumulation if accumulation > 1 else loss

        checkpoints = checkpoint.Checkpoints(boosted, args.output_path, args.keep_checkpoints, args.plugin)

        def save_checkpoint():  # written beside the next steps: training waits only while its state is copied
            clock.checkpoint_seconds += checkpoints.save(state)

        def epoch_pass(epoch, first_step=0):  # starts decoding a streamed epoch's images at once
            index_batches = training_index_batches(len(images["train"]), args.batch_size, topology.dp_rank,
                                                   topology.dp_size, args.seed, epoch)
            index_batches = index_batches[first_step * accumulation:steps_per_epoch * accumulation]
            batches = images["train"].device_batches(index_batches)
            if not args.augment:
                return batches
            return augmented(batches, index_batches, augmentation_draws(len(images["train"]), args.seed, epoch))

        upcoming = None  # the next epoch's pass: its streamed images decode while this epoch is evaluated
        for epoch in range(state.epoch, args.num_epoch):
            train_epoch(boosted, upcoming or epoch_pass(epoch, state.step_in_epoch), state, criterion,
                        steps_per_epoch, accumulation, writer, clock, args.save_every, save_checkpoint)
            upcoming = epoch_pass(epoch + 1) if epoch + 1 < args.num_epoch else None
            loss_sum, loss_count = sum_over_ranks([state.epoch_loss_sum, steps_per_epoch * topology.holds_output],
                                                  device)
            epoch_results = {"epoch": epoch + 1, "train_loss": loss_sum / loss_count,
                             "images_per_second": ((state.images_trained - state.epoch_start_images)
                                                   / (state.train_seconds - state.epoch_start_seconds)),
                             "data_wait_seconds": state.epoch_data_wait}
            with reporting.timed(state, "evaluation_seconds"):
                for split in ("validation", "test"):
                    if split in images:
                        epoch_results[split] = evaluate(boosted, images[split], device, args.batch_size, names)
            epoch_results["memory"] = peak_memory(device)
            state.epochs.append(epoch_results)
            state.unreadable = sorted(set(state.unreadable).union(*(split.unreadable for split in images.values())))
            state.start_epoch(epoch + 1)  # before the checkpoint: a run resumed from it starts the next epoch
            if topology.reports:
                reporting.report_epoch(epoch_results, len(state.unreadable), state.global_step, writer)
            save_checkpoint()

        # Save the model and its image processor, then what the run measured
        final = state.epochs[-1]
        if "test" in final and topology.reports:
            print(f"test: loss {final['test']['loss']:.4f}, accuracy {final['test']['accuracy']:.4f} on "
                  f"{final['test']['num_examples']} images")
        unreadable_on_ranks = [None] * dist.get_world_size()
        dist.all_gather_object(unreadable_on_ranks, state.unreadable)
        with checkpoint.write_errors_named(args.output_path):
            if args.lora_rank:  # the adapters as PEFT saves them, and the model with them merged in
                booster.save_lora_as_pretrained(model, os.path.join(args.output_path, "adapter"), use_safetensors=True)
                if is_first_rank:
                    save_merged(model, args.output_path)
            else:
                booster.save_model(model, args.output_path, shard=True, use_safetensors=True)
                if is_first_rank and settings.tp_size > 1:  # after the booster's own save, which rank 0 ends
                    save_unpadded_classifier(args.output_path, len(names))
            if is_first_rank:
                image_processor.save_pretrained(args.output_path)
            with reporting.timed(clock, "checkpoint_seconds"):
                checkpoints.finish()  # the last one's write, beside the model's save
            if topology.reports:
                writer.close()
                # the best epoch is chosen on validation accuracy alone (then loss); its test figures beside it
                best = max(state.epochs, key=lambda epoch: (epoch["validation"]["accuracy"],
                                                            -epoch["validation"]["loss"]))
                train_images = images["train"]
                results = {
                    "config": {**vars(args), "world_size": dist.get_world_size(),
                               "data_parallel_size": topology.dp_size, "device": str(device), "label_names": names,
                               "num_parameters": parameters, "num_trained_parameters": trained_parameters,
                               "num_train_examples": len(train_images)},
                    "data": {"mode": "cache" if train_images.cached else "stream",
                             "num_workers": train_images.num_workers,
                             "num_examples": {name: len(split_images) for name, split_images in images.items()},
                             "unreadable": sorted(set().union(*unreadable_on_ranks))},
                    "memory": peak_memory(device),
                    "epochs": state.epochs,
                    "test": final.get("test"),
                    "best_epoch": best,
                    "train_images_per_second": state.images_trained / state.train_seconds,
                    "checkpoints": checkpoints.written,
                    "seconds": clock.summary(state),
                }
                reporting.write_results(results, args.output_path)
    images.clear()  # stops the streaming loader's workers now, not when they find their parent gone
    # Every collective this rank queued has run on its GPU before the process ends (os._exit, below), so no rank
    # waits for data from a rank that is gone. Destroying the NCCL group would wait for the same, and take 0.2-0.8 s
    # more; a gloo group's destructor can deadlock (PyTorch 2.5, seen in CI).
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    exit_code = 0
    try:
        main()
    except RunError as error:  # every rank says it (a diverged loss may show on one rank only), in one write
        sys.stderr.write(f"error: {error}\n")
        exit_code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Every file is written and closed. The interpreter's own teardown of PyTorch's, CUDA's and the process
    # group's state writes nothing and takes seconds (benchmarks/results: end to end); after an error, other ranks
    # may wait in a collective that a clean shutdown of the process group would wait on.
    os._exit(exit_code)
