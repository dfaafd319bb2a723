"""Resumable training checkpoints, written through the booster and made visible only once complete.

A checkpoint is a folder `<output_path>/checkpoints/step_<global step>/` holding the model and optimizer (sharded
as each plugin saves them), the learning-rate scheduler, and one `state_rank<r>.pt` per process with the training
progress and that process's random-number-generator states. It is written under a `.partial` name and renamed
when every process has finished, so a run killed while saving leaves the previous checkpoint as the latest.
"""
import glob
import os
import pickle
import re
import shutil
from contextlib import contextmanager

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from data import RunError

PARTIAL = ".partial"


def checkpoint_root(output_path):
    return os.path.join(output_path, "checkpoints")


def complete_checkpoints(output_path):
    """Complete checkpoint folders, oldest first."""
    found = [path for path in glob.glob(os.path.join(checkpoint_root(output_path), "step_*"))
             if re.fullmatch(r"step_\d+", os.path.basename(path))]
    return sorted(found, key=lambda path: int(os.path.basename(path)[len("step_"):]))


@contextmanager
def write_errors_named(path):
    """Turns a failed write (a full disk, a read-only folder) into a one-line error naming `path`."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise RunError(f"cannot write {path}: {reason}; free some disk space or pass another --output_path") from None


def save_checkpoint(booster, model, optimizer, lr_scheduler, progress, output_path, keep):
    final = os.path.join(checkpoint_root(output_path), f"step_{progress['global_step']:07d}")
    partial = final + PARTIAL
    rank = dist.get_rank()
    with write_errors_named(partial):
        if rank == 0:
            for stale in glob.glob(os.path.join(checkpoint_root(output_path), "*" + PARTIAL)):
                shutil.rmtree(stale)
            os.makedirs(partial)
        dist.barrier()
        booster.save_model(model, os.path.join(partial, "model"), shard=True, use_safetensors=True)
        # Colossal-AI 0.5.0 loads a sharded optimizer with a synchronize() that only CUDA has
        booster.save_optimizer(optimizer, os.path.join(partial, "optimizer"), shard=torch.cuda.is_available())
        booster.save_lr_scheduler(lr_scheduler, os.path.join(partial, "lr_scheduler.pt"))
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        torch.save({"progress": progress, "rng": rng, "world_size": dist.get_world_size()},
                   os.path.join(partial, f"state_rank{rank}.pt"))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)  # written before, by a run resumed from an older checkpoint
            os.rename(partial, final)
            for old in complete_checkpoints(output_path)[:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def resolve_resume(resume_from, output_path):
    """The checkpoint folder to resume from, or None to start afresh ('latest' with no checkpoint yet)."""
    if resume_from == "latest":
        found = complete_checkpoints(output_path)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from, "state_rank0.pt")):
        raise RunError(f"--resume_from {resume_from} is not a complete checkpoint (no state_rank0.pt); "
                       f"pass one of {checkpoint_root(output_path)}/step_* or 'latest'")
    return resume_from


def load_checkpoint(booster, model, optimizer, lr_scheduler, checkpoint, fresh_progress):
    """Restores the model, optimizer, scheduler and this process's RNG states; returns the training progress,
    which must hold everything `fresh_progress` (a new run's) does."""
    state_file = os.path.join(checkpoint, f"state_rank{dist.get_rank()}.pt")
    if not os.path.isfile(state_file):
        raise RunError(f"{checkpoint} was written by another number of processes (no {os.path.basename(state_file)}); "
                       "resume with the GPUNUM it was written with")
    try:  # tensors and plain values only: a checkpoint folder from elsewhere cannot run code when it is loaded
        state = torch.load(state_file, weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise RunError(f"{state_file} holds more than tensors and plain values, and loading it could run code "
                       f"({named.group(1) if named else 'not a torch.save file'}); resume only from checkpoints "
                       "this example wrote") from None
    if state["world_size"] != dist.get_world_size():
        raise RunError(f"{checkpoint} was written by {state['world_size']} processes, this run has "
                       f"{dist.get_world_size()}; resume with the GPUNUM it was written with")
    missing = sorted(set(fresh_progress) - set(state["progress"]))
    if missing:
        raise RunError(f"{checkpoint} was written by another version of this example (its progress has no "
                       f"{', '.join(missing)}); resume it with that version, or start afresh in another output path")
    booster.load_model(model, os.path.join(checkpoint, "model"))
    booster.load_optimizer(optimizer, os.path.join(checkpoint, "optimizer"))
    # Colossal-AI 0.5.0 restores the step counts of low_level_zero's and hybrid_parallel's optimizers on the CPU;
    # PyTorch's fused AdamW takes them only beside their parameters
    for parameter, parameter_state in optimizer.optim.state.items():
        if torch.is_tensor(parameter_state.get("step")):
            parameter_state["step"] = parameter_state["step"].to(parameter.device)
    booster.load_lr_scheduler(lr_scheduler, os.path.join(checkpoint, "lr_scheduler.pt"))
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["progress"]
