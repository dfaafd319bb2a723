"""Resumable training checkpoints, written beside training and made visible only once complete.

A checkpoint is a folder `<output_path>/checkpoints/step_<global step>/` holding the model (saved through the
booster, sharded as each plugin saves it), the learning-rate scheduler, and one `state_rank<r>.pt` per process with
its optimizer's state (its own share, as its PyTorch optimizer holds it), the training state (TrainingState), its
random-number-generator states, PyTorch AMP's loss scale where it has one and, for the plugins that would rebuild
them from the 16-bit model, its share of the fp32 master weights. It is written under a `.partial` name and renamed
when every process has written its files, so a run killed while saving leaves the previous checkpoint as the latest.
"""
import dataclasses
import glob
import os
import pickle
import re
import shutil
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch.utils._pytree import tree_flatten, tree_unflatten

from devices import available_host_bytes
from errors import RunError
from plugins import PLUGINS

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


def local_optimizer(optimizer):
    """The PyTorch optimizer under Colossal-AI's wrappers. It steps this rank's share of the trained weights (the fp32
    master weights, where the plugin keeps them), and its state_dict() is this rank's state, exact, gathered from no
    other rank (Colossal-AI 0.5.0's gemini IO pickles every state tensor to gather it, even on one GPU: 44 of the 80
    seconds a ViT-G/14 checkpoint took with OFFLOAD=all on an H200)."""
    from colossalai.interface import OptimizerWrapper
    while isinstance(optimizer, OptimizerWrapper):
        optimizer = optimizer.optim
    return optimizer


def master_weights(optimizer):
    """The fp32 weights the optimizer steps, this rank's share (the 16-bit plugins' master weights)."""
    return [parameter for group in local_optimizer(optimizer).param_groups for parameter in group["params"]]


def grad_scaler(optimizer):
    """PyTorch AMP's loss scaler (torch_ddp_fp16), which Colossal-AI 0.5.0's checkpoint IO leaves out: restarted at
    its initial scale, a resumed run would skip other steps than the uninterrupted one. None for other plugins."""
    return getattr(optimizer, "scaler", None)


def folder_gib(folder):
    """The GiB of the files under `folder`."""
    return sum(os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(folder)
               for name in names) / 2**30


def fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Checkpoints:
    """Writes checkpoints of `boosted` (plugins.Boosted, trained with `plugin`) into <output_path>/checkpoints,
    keeping the `keep` newest (none with 0), training waiting as little as it can.

    Training waits while the model is saved through the booster and this rank's state (its optimizer's, and
    TrainingState) is copied to host memory; a thread writes that copy beside the next steps. Once every rank's
    thread has written and synced its files (a barrier of their own process group, which training's collectives
    never meet), the checkpoint is renamed from .partial and the older ones removed. Where host memory has no room
    for the copy, the state is written from where it lies while training waits. The next checkpoint, and finish(),
    wait for the write before.

    The host memory the copy goes into is taken once, beside training, as soon as the optimizer has its state (at
    once when resumed, else after its first step), and kept for every checkpoint: memory a process has not written
    yet is several times slower to fill (on the machines measured, 4 GiB took 5-7 s the first time, 0.3 s again)."""

    def __init__(self, boosted, output_path, keep, plugin):
        self.boosted, self.output_path, self.keep, self.plugin = boosted, output_path, keep, plugin
        self.written = []  # each checkpoint's step, seconds training waited, seconds writing and GiB (reporting rank)
        self.writing = None  # the thread writing the newest checkpoint
        self.failure = None  # what stopped it
        self.writers = dist.new_group(backend="gloo") if keep else None
        self.host_copy = None  # host tensors shaped as the state's, every page written, kept between checkpoints
        self.preparing = None  # the thread taking them
        if keep:
            optimizer = local_optimizer(boosted.optimizer)
            if optimizer.state:
                self._prepare_host_copy()
            else:
                self.first_step = optimizer.register_step_post_hook(self._prepare_host_copy)

    def _rank_state(self, state):
        """What this rank's state file holds: references to the live tensors."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        masters = (master_weights(self.boosted.optimizer) if PLUGINS[self.plugin].master_weights_rebuilt_from_model
                   else None)
        scaler = grad_scaler(self.boosted.optimizer)
        return {"progress": dataclasses.asdict(state), "rng": rng, "world_size": dist.get_world_size(),
                "optimizer": local_optimizer(self.boosted.optimizer).state_dict(), "master_weights": masters,
                "grad_scaler": scaler.state_dict() if scaler else None}

    def _prepare_host_copy(self, *step_hook_arguments):
        if step_hook_arguments:
            self.first_step.remove()
        tensors = [leaf for leaf in tree_flatten(self._rank_state(TrainingState()))[0] if torch.is_tensor(leaf)]
        self.preparing = threading.Thread(target=self._take_host_copy, args=(tensors,), daemon=True)
        self.preparing.start()

    def _take_host_copy(self, tensors):
        """Takes host tensors shaped as `tensors` as the host copy, where host memory has room for them and 2 GiB
        more for the rest of the run (none where it has not). Zeroed: every page written once, here."""
        self.host_copy = None  # the last layout's, given back before the room is counted
        if sum(tensor.nbytes for tensor in tensors) + 2 * 2**30 < available_host_bytes():
            self.host_copy = [torch.zeros(tensor.shape, dtype=tensor.dtype) for tensor in tensors]

    def _copied_to_host(self, rank_state):
        """`rank_state` with its tensors copied into the host copy, or None where host memory has no room."""
        if self.preparing:
            self.preparing.join()
            self.preparing = None
        leaves, layout = tree_flatten(rank_state)
        tensors = [leaf for leaf in leaves if torch.is_tensor(leaf)]
        shapes = [(tensor.shape, tensor.dtype) for tensor in tensors]
        if self.host_copy is None or shapes != [(tensor.shape, tensor.dtype) for tensor in self.host_copy]:
            self._take_host_copy(tensors)
        if self.host_copy is None:
            return None
        copies = iter(self.host_copy)
        return tree_unflatten([next(copies).copy_(leaf.detach()) if torch.is_tensor(leaf) else leaf
                               for leaf in leaves], layout)

    def save(self, state):
        """Starts checkpoint step_<state.global_step>; returns the seconds training waited for it."""
        if not self.keep:
            return 0.0
        start = time.perf_counter()
        self.finish()
        booster, rank = self.boosted.booster, dist.get_rank()
        final = os.path.join(checkpoint_root(self.output_path), f"step_{state.global_step:07d}")
        partial = final + PARTIAL
        with write_errors_named(partial):
            if rank == 0:
                for stale in glob.glob(os.path.join(checkpoint_root(self.output_path), "*" + PARTIAL)):
                    shutil.rmtree(stale)
                os.makedirs(partial)
            dist.barrier()
            booster.save_model(self.boosted.model, os.path.join(partial, "model"), shard=True, use_safetensors=True)
            booster.save_lr_scheduler(self.boosted.lr_scheduler, os.path.join(partial, "lr_scheduler.pt"))
        rank_state = self._rank_state(state)
        copied = self._copied_to_host(rank_state)  # which training may change the originals of
        beside_training = copied is not None
        if beside_training:
            rank_state = copied
        cost = {"step": state.global_step, "seconds": None, "write_seconds": None, "gib": None,
                "beside_training": beside_training}
        self.written.append(cost)
        write = (rank_state, os.path.join(partial, f"state_rank{rank}.pt"), final, cost, time.perf_counter())
        if beside_training:
            self.writing = threading.Thread(target=self._write, args=write, daemon=True)
            self.writing.start()
        else:
            self._write(*write)
            self.finish()
        cost["seconds"] = time.perf_counter() - start
        return cost["seconds"]

    def _write(self, rank_state, state_file, final, cost, start):
        partial = os.path.dirname(state_file)
        try:
            with write_errors_named(partial):
                torch.save(rank_state, state_file)
                fsync(state_file)
                dist.barrier(group=self.writers)  # every rank's files are written
                if dist.get_rank() == 0:
                    for folder, _, names in os.walk(partial):  # the booster's files too, before the rename
                        for name in names:
                            fsync(os.path.join(folder, name))
                    self._commit(partial, final)
                dist.barrier(group=self.writers)
            cost["write_seconds"] = time.perf_counter() - start
            if self.boosted.topology.reports:  # once: no need for every rank of a large job to walk the folder
                cost["gib"] = folder_gib(final)
        except Exception as failure:  # raised in the training thread by finish()
            self.failure = failure

    def _commit(self, partial, final):
        shutil.rmtree(final, ignore_errors=True)  # written before, by a run resumed from an older checkpoint
        os.rename(partial, final)
        fsync(os.path.dirname(final))
        written = complete_checkpoints(self.output_path)
        # later steps were written by a run this one replaced (started afresh here, or resumed from before them):
        # left, the newest of them would be taken for this run's by the pruning and by RESUME=latest
        replaced = [path for path in written if step_of(path) > step_of(final)]
        for old in replaced + [path for path in written if path not in replaced][:-self.keep]:
            shutil.rmtree(old)

    def finish(self):
        """Waits until the newest checkpoint is written and renamed; raises what stopped it."""
        if self.writing:
            self.writing.join()
            self.writing = None
        if self.failure:
            raise self.failure


def resolve_resume(resume_from, output_path):
    """The checkpoint folder to resume from, or None to start afresh ('latest' with no checkpoint yet)."""
    if resume_from == "latest":
        found = complete_checkpoints(output_path)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(resume_from, "state_rank0.pt")):
        raise RunError(f"--resume_from {resume_from} is not a complete checkpoint (no state_rank0.pt); "
                       f"pass one of {checkpoint_root(output_path)}/step_* or 'latest'")
    return resume_from


def load_checkpoint(boosted, checkpoint, quantized=False):
    """Restores `boosted` (plugins.Boosted, its frozen weights in 4 bits if `quantized`) and this process's RNG
    states; returns the TrainingState."""
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
    missing += ["optimizer"] * ("optimizer" not in state)  # saved through the booster before
    if missing:
        raise RunError(f"{checkpoint} was written by another version of this example (its state has no "
                       f"{', '.join(missing)}); resume it with that version, or start afresh in another output path")
    # 4-bit weights are saved with their quantization statistics, which PyTorch's loading does not take: the
    # model quantized again at start-up from the same weights already holds the same ones
    boosted.booster.load_model(boosted.model, os.path.join(checkpoint, "model"), strict=not quantized)
    local_optimizer(boosted.optimizer).load_state_dict(state["optimizer"])
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
