"""Resumable training checkpoints, written through the booster and made visible only once complete.

A checkpoint is a folder `<output_path>/checkpoints/step_<global step>/` holding the model and optimizer (sharded
as each plugin saves them), the learning-rate scheduler, and one `state_rank<r>.pt` per process with the training
state (TrainingState), that process's random-number-generator states, PyTorch AMP's loss scale where it has one
and, for the plugins that would rebuild them from the 16-bit model, its share of the fp32 master weights. It is
written under a `.partial` name and renamed when every process has finished, so a run killed while saving leaves
the previous checkpoint as the latest.
"""
import dataclasses
import glob
import os
import pickle
import re
import shutil
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from errors import RunError
from plugins import PLUGINS, restore_optimizer

PARTIAL = ".partial"


@dataclasses.dataclass
class TrainingState:
    """Where training stands and what it has measured: what a checkpoint holds beside the weights, so that a resumed
    run goes on and reports as the uninterrupted one would."""
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0
    global_step: int = 0
    images_trained: int = 0  # by all data-parallel ranks together
    train_seconds: float = 0.0  # training steps only: checkpoints and evaluations left out
    evaluation_seconds: float = 0.0
    epoch_start_images: int = 0  # images_trained and train_seconds when this epoch started
    epoch_start_seconds: float = 0.0
    epoch_loss_sum: float = 0.0  # this epoch's, on this rank
    epoch_data_wait: float = 0.0  # seconds this epoch's steps waited for their images
    epochs: list = dataclasses.field(default_factory=list)  # each finished epoch's results
    unreadable: list = dataclasses.field(default_factory=list)  # images left out (--skip_unreadable)

    def start_epoch(self, epoch):
        self.epoch, self.step_in_epoch, self.epoch_loss_sum, self.epoch_data_wait = epoch, 0, 0.0, 0.0
        self.epoch_start_images, self.epoch_start_seconds = self.images_trained, self.train_seconds


def checkpoint_root(output_path):
    return os.path.join(output_path, "checkpoints")


def step_of(checkpoint):
    return int(os.path.basename(checkpoint)[len("step_"):])


def complete_checkpoints(output_path):
    """Complete checkpoint folders, oldest first."""
    found = [path for path in glob.glob(os.path.join(checkpoint_root(output_path), "step_*"))
             if re.fullmatch(r"step_\d+", os.path.basename(path))]
    return sorted(found, key=step_of)


@contextmanager
def write_errors_named(path):
    """Turns a failed write (a full disk, a read-only folder) into a one-line error naming `path`."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise RunError(f"cannot write {path}: {reason}; free some disk space or pass another --output_path") from None


def master_weights(optimizer):
    """The fp32 weights the optimizer steps, this rank's share (the 16-bit plugins' master weights)."""
    return [parameter for group in optimizer.optim.param_groups for parameter in group["params"]]


def grad_scaler(optimizer):
    """PyTorch AMP's loss scaler (torch_ddp_fp16), which Colossal-AI 0.5.0's checkpoint IO leaves out: restarted at
    its initial scale, a resumed run would skip other steps than the uninterrupted one. None for other plugins."""
    return getattr(optimizer, "scaler", None)


def save_checkpoint(boosted, state, output_path, keep, plugin):
    """Writes `boosted` (plugins.Boosted, trained with `plugin`) and `state` as checkpoint step_<global step>,
    keeping the `keep` newest. Returns what it cost: its step, the seconds training waited for it, and on the rank
    that reports, its size."""
    start = time.perf_counter()
    booster = boosted.booster
    final = os.path.join(checkpoint_root(output_path), f"step_{state.global_step:07d}")
    partial = final + PARTIAL
    rank = dist.get_rank()
    with write_errors_named(partial):
        if rank == 0:
            for stale in glob.glob(os.path.join(checkpoint_root(output_path), "*" + PARTIAL)):
                shutil.rmtree(stale)
            os.makedirs(partial)
        dist.barrier()
        booster.save_model(boosted.model, os.path.join(partial, "model"), shard=True, use_safetensors=True)
        # Colossal-AI 0.5.0 loads a sharded optimizer with a synchronize() that only CUDA has
        booster.save_optimizer(boosted.optimizer, os.path.join(partial, "optimizer"), shard=torch.cuda.is_available())
        booster.save_lr_scheduler(boosted.lr_scheduler, os.path.join(partial, "lr_scheduler.pt"))
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        masters = ([weight.detach().cpu() for weight in master_weights(boosted.optimizer)]
                   if PLUGINS[plugin].master_weights_rebuilt_from_model else None)
        scaler = grad_scaler(boosted.optimizer)
        torch.save({"progress": dataclasses.asdict(state), "rng": rng, "world_size": dist.get_world_size(),
                    "master_weights": masters, "grad_scaler": scaler.state_dict() if scaler else None},
                   os.path.join(partial, f"state_rank{rank}.pt"))
        dist.barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)  # written before, by a run resumed from an older checkpoint
            os.rename(partial, final)
            written = complete_checkpoints(output_path)
            # later steps were written by a run this one replaced (started afresh here, or resumed from before
            # them): left, the newest of them would be taken for this run's by the pruning and RESUME=latest
            replaced = [path for path in written if step_of(path) > state.global_step]
            for old in replaced + [path for path in written if path not in replaced][:-keep]:
                shutil.rmtree(old)
    dist.barrier()
    seconds = time.perf_counter() - start
    # the size is reported once: no need for every rank of a large job to walk the folder
    size = (sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(final) for name in names)
            if boosted.topology.reports else None)
    return {"step": state.global_step, "seconds": seconds, "gib": None if size is None else size / 2**30}


def resolve_resume(resume_from, output_path):
    """The checkpoint folder to resume from, or None to start afresh ('latest' with no checkpoint yet)."""
    if resume_from == "latest":
        found = complete_checkpoints(output_path)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from, "state_rank0.pt")):
        raise RunError(f"--resume_from {resume_from} is not a complete checkpoint (no state_rank0.pt); "
                       f"pass one of {checkpoint_root(output_path)}/step_* or 'latest'")
    return resume_from


def load_checkpoint(boosted, checkpoint, plugin, quantized=False):
    """Restores `boosted` (plugins.Boosted, trained with `plugin`, its frozen weights in 4 bits if `quantized`) and
    this process's RNG states; returns the TrainingState."""
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
    missing = [field.name for field in dataclasses.fields(TrainingState) if field.name not in state["progress"]]
    if missing:
        raise RunError(f"{checkpoint} was written by another version of this example (its progress has no "
                       f"{', '.join(missing)}); resume it with that version, or start afresh in another output path")
    # 4-bit weights are saved with their quantization statistics, which PyTorch's loading does not take: the
    # model quantized again at start-up from the same weights already holds the same ones
    boosted.booster.load_model(boosted.model, os.path.join(checkpoint, "model"), strict=not quantized)
    restore_optimizer(boosted.booster, boosted.optimizer, os.path.join(checkpoint, "optimizer"), plugin)
    if state.get("master_weights") is not None:  # over the ones rebuilt from the 16-bit model: resume is exact
        with torch.no_grad():
            for weight, saved in zip(master_weights(boosted.optimizer), state["master_weights"], strict=True):
                weight.copy_(saved)
    if state.get("grad_scaler"):
        grad_scaler(boosted.optimizer).load_state_dict(state["grad_scaler"])
    boosted.booster.load_lr_scheduler(boosted.lr_scheduler, os.path.join(checkpoint, "lr_scheduler.pt"))
    torch.set_rng_state(state["rng"]["cpu"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return TrainingState(**state["progress"])
