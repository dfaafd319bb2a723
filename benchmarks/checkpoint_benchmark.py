"""How long a training checkpoint stalls training, how long its write goes on beside it, and where the time goes.

Writes the example's own checkpoint (checkpoint.Checkpoints, as the training script does at each epoch's end) of a
ViT of random weights, --repeats times, for a configuration of the step benchmark
(`plugin[:offload[:fraction]]`, the example's settings), the first after the training steps each rank takes to
take the host memory for the state's copy (as in a run, whose first checkpoint comes after an epoch; a step before
that is what makes the optimizer's state), and prints for each the seconds training waited, the
seconds its write took until it was renamed complete (beside training where host memory had room for a copy of
the state), its GiB, and the seconds a training step took while the write went on beside it, with the
seconds a step takes alone (measured right after, as many steps). --profile N also prints the N functions that took
the most time (cProfile, cumulative) while training waited for the last checkpoint. Then, as the peer, the same state
saved by Colossal-AI's own checkpoint IO (the booster's save_model, save_optimizer and save_lr_scheduler, sharded,
while training waits: how the example saved before).
Launch from the example's folder as `torchrun --standalone --nproc_per_node N -m benchmarks.checkpoint_benchmark`.
"""
import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import shutil
import tempfile
import time

import colossalai
import torch
import torch.distributed as dist

from benchmarks.step_benchmark import (SIZES, boosted_model, in_millions_or_billions, parameter_count,
                                       parse_configuration, train_step)
from checkpoint import Checkpoints, TrainingState, folder_gib
from devices import init_distributed


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configuration", default="torch_ddp",
                        help="a plugin, with what it offloads if anything: torch_ddp, gemini:all, low_level_zero:optimizer")
    parser.add_argument("--model_size", default="B/16", help=f"one of {', '.join(SIZES)}")
    parser.add_argument("--batch_size", type=int, default=8, help="of the one training step before the checkpoints")
    parser.add_argument("--repeats", type=int, default=2, help="checkpoints written, one after another")
    parser.add_argument("--output_path", default=None, help="where they are written (default: a temporary folder)")
    parser.add_argument("--max_gpu_memory_gib", type=float, default=None)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N functions that took longest in the last checkpoint")
    parser.add_argument("--json", default=None, help="where the figures are also written")
    args = parser.parse_args()
    if args.model_size not in SIZES:
        parser.error(f"unknown --model_size {args.model_size}; choose from {', '.join(SIZES)}")
    return args


def trained_one_step(configuration, size, batch_size, device):
    """The example's booster, model, optimizer and scheduler for `configuration` after one training step, and a
    function that takes another."""
    from colossalai.nn.lr_scheduler import CosineAnnealingWarmupLR
    boosted, image_size = boosted_model(configuration, size, True, device,
                                        lambda optimizer: CosineAnnealingWarmupLR(optimizer, total_steps=10**6,
                                                                                  warmup_steps=1))
    batch = (torch.randn(batch_size, 3, image_size, image_size, device=device),
             torch.randint(0, 3, (batch_size,), device=device))

    def step():
        train_step(boosted, *batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    step()
    return boosted, step


def step_seconds(step, steps=None, beside=None, group=None):
    """Seconds a training step takes: over `steps` steps, or over the steps taken as long as any rank's thread
    `beside()` is still at work (the ranks agreeing through `group`); returns them (None if none was taken) and the
    steps."""
    taken, start = 0, time.perf_counter()
    while True:
        if beside is not None:
            thread = beside()
            working = torch.tensor(float(bool(thread and thread.is_alive())))
            dist.all_reduce(working, op=dist.ReduceOp.MAX, group=group)  # every rank steps as long
            if not working.item():
                break
        elif taken == steps:
            break
        step()
        taken += 1
    return ((time.perf_counter() - start) / taken if taken else None), taken


def booster_save(boosted, folder, reporting):
    """Seconds Colossal-AI's booster takes to save the model, optimizer and scheduler into `folder` (sharded where
    its IO can: its sharded optimizer save needs a GPU), and the GiB written (None off the reporting rank)."""
    booster, sharded = boosted.booster, torch.cuda.is_available()
    start = time.perf_counter()
    booster.save_model(boosted.model, os.path.join(folder, "model"), shard=True, use_safetensors=True)
    booster.save_optimizer(boosted.optimizer, os.path.join(folder, "optimizer" if sharded else "optimizer.pt"),
                           shard=sharded)
    booster.save_lr_scheduler(boosted.lr_scheduler, os.path.join(folder, "lr_scheduler.pt"))
    dist.barrier()
    took = time.perf_counter() - start
    gib = folder_gib(folder) if reporting else None
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(folder)
    return took, gib


def seconds(value):
    return "-" if value is None else f"{value:.3f}"


def main():
    args = parse_args()
    device = init_distributed(seed=0, max_gpu_memory_gib=args.max_gpu_memory_gib)
    boosted, step = trained_one_step(args.configuration, args.model_size, args.batch_size, device)
    plugin = parse_configuration(args.configuration).plugin
    reporting = boosted.topology.reports  # the rank that holds the checkpoint sizes
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = Checkpoints(boosted, args.output_path or scratch, keep=1, plugin=plugin)
        # as in a run, whose first checkpoint comes after an epoch: the host memory for its copy taken beside steps
        _, steps_before = step_seconds(step, beside=lambda: checkpoints.preparing, group=checkpoints.writers)
        state = TrainingState()
        steps_timed = []  # per checkpoint: seconds a step took beside its write, alone, and the steps beside it
        for repeat in range(args.repeats):
            state.global_step = repeat + 1
            last = repeat == args.repeats - 1 and args.profile
            if last:
                profiler.enable()
            checkpoints.save(state)
            if last:
                profiler.disable()
            beside_write, steps = step_seconds(step, beside=lambda: checkpoints.writing, group=checkpoints.writers)
            checkpoints.finish()
            steps_timed.append((beside_write, step_seconds(step, steps=steps)[0], steps))
        booster_seconds, booster_gib = booster_save(boosted, os.path.join(args.output_path or scratch,
                                                                          "colossalai_booster"), reporting)
    if not reporting:
        return
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{device_name} x {dist.get_world_size()}, torch {torch.__version__}, colossalai {colossalai.__version__}: "
          f"{args.configuration}, ViT-{args.model_size} ({in_millions_or_billions(parameter_count(args.model_size))} "
          "parameters)\n")
    print(f"steps before the first checkpoint, while each rank took the host memory for its copy: {steps_before}\n")
    print("| checkpoint at step | seconds training waited | seconds writing | GiB | written beside training | "
          "steps beside the write | seconds a step beside it | seconds a step alone |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for cost, (beside_write, alone, steps) in zip(checkpoints.written, steps_timed, strict=True):
        cost.update(steps_beside_write=steps, step_seconds_beside_write=beside_write, step_seconds_alone=alone)
        print(f"| {cost['step']} | {cost['seconds']:.2f} | {cost['write_seconds']:.2f} | {cost['gib']:.2f} | "
              f"{'yes' if cost['beside_training'] else 'no'} | {steps} | {seconds(beside_write)} | {seconds(alone)} |")
    print(f"\nColossal-AI's booster, the same state (save_model, save_optimizer, save_lr_scheduler), training waiting: "
          f"{booster_seconds:.2f} s, {booster_gib:.2f} GiB")
    if args.profile:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(args.profile)
        print("\nwhile training waited for the last checkpoint, by cumulative time:\n" + text.getvalue())
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"configuration": args.configuration, "model": args.model_size,
                       "parameters": parameter_count(args.model_size), "device": device_name,
                       "gpus": dist.get_world_size(), "torch": torch.__version__,
                       "colossalai": colossalai.__version__, "date": datetime.date.today().isoformat(),
                       "steps_before_first_checkpoint": steps_before, "checkpoints": checkpoints.written,
                       "colossalai_booster_save": {"seconds": booster_seconds, "gib": booster_gib}}, file, indent=2)


if __name__ == "__main__":
    main()
