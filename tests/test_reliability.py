"""Interruption and failure on the CPU: 2 torch_ddp processes through run_finetuning.sh on a small real-beans copy.

36 training images, batch 3 per rank: 6 steps an epoch, 2 epochs, a checkpoint every 2 steps and at epoch ends.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import psutil
import pytest

from conftest import MODEL_DIR, ROOT, copy_beans, example_env
from data import load_splits
from images import training_index_batches

SETTINGS = {"PLUGIN": "torch_ddp", "GPUNUM": 2, "BS": 3, "EPOCH": 2, "LR": 1e-4, "WARMUP_RATIO": 0.1,
            "SAVE_EVERY": 2, "KEEP_CHECKPOINTS": 3}


def start_run(dataset, output_path, gpu=False, **overrides):
    env = example_env(gpu, MODEL=MODEL_DIR, DATASET=dataset, OUTPUT_PATH=output_path, **{**SETTINGS, **overrides})
    return subprocess.Popen(["bash", "run_finetuning.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def run_to_end(dataset, output_path, **overrides):
    returncode, output = finish(start_run(dataset, output_path, **overrides))
    assert returncode == 0, output[-4000:]
    return output, json.loads((output_path / "results.json").read_text())


def metrics(results):
    """Everything a run measured about the model (the process's timings and memory left out)."""
    epochs = [{name: value for name, value in epoch.items()
               if name not in ("images_per_second", "data_wait_seconds", "memory")}
              for epoch in results["epochs"]]
    return {"epochs": epochs, "test": results["test"]}


def wait_for(path_matches, process, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = path_matches()
        if found:
            return found
        assert process.poll() is None, "the run ended before the awaited checkpoint appeared"
        time.sleep(0.002)
    raise TimeoutError("checkpoint did not appear")


def kill_job(process):
    """SIGKILL to the launcher and every process under it (torchrun starts each rank in a session of its own)."""
    launcher = psutil.Process(process.pid)
    for member in [launcher, *launcher.children(recursive=True)]:
        member.kill()
    process.wait()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return copy_beans(tmp_path_factory.mktemp("data") / "beans", per_label=12)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    output_path = tmp_path_factory.mktemp("uninterrupted") / "model"
    return run_to_end(dataset, output_path)[1]


def test_two_runs_with_the_same_seed_give_identical_metrics(dataset, tmp_path, uninterrupted):
    output, again = run_to_end(dataset, tmp_path / "model", RESUME="latest")  # nothing to resume: from scratch
    assert f"no checkpoint under {tmp_path / 'model' / 'checkpoints'} yet: starting from scratch" in output
    assert metrics(again) == metrics(uninterrupted)
    assert again["epochs"][-1]["validation"]["num_examples"] == 36


def test_killed_mid_epoch_then_resumed_ends_like_an_uninterrupted_run(dataset, tmp_path, uninterrupted):
    output_path = tmp_path / "model"
    process = start_run(dataset, output_path)
    step_2 = output_path / "checkpoints" / "step_0000002"
    wait_for(step_2.exists, process)
    kill_job(process)  # during step 3 or 4 of the first epoch's 6
    assert not (output_path / "results.json").exists()
    output, resumed = run_to_end(dataset, output_path, RESUME="latest")
    assert f"resuming from {step_2}: epoch 1, step 2 of 6" in output
    assert metrics(resumed) == metrics(uninterrupted)


@pytest.mark.parametrize("variant", [{"GRAD_ACCUM": 2}, {"LORA_RANK": 4}], ids=["accumulating", "lora"])
def test_a_variant_killed_and_resumed_ends_like_its_uninterrupted_run(dataset, tmp_path, variant):
    """GRAD_ACCUM=2 (3 optimizer steps an epoch of 2 batches each: checkpoints fall between steps, and a resumed
    run goes on with the next step's first batch), or LoRA adapters (the frozen weights and the adapters restored)."""
    settings = {"SAVE_EVERY": 1, **variant}
    _, uninterrupted = run_to_end(dataset, tmp_path / "uninterrupted", **settings)
    output_path = tmp_path / "model"
    process = start_run(dataset, output_path, **settings)
    wait_for((output_path / "checkpoints" / "step_0000001").exists, process)
    kill_job(process)
    output, resumed = run_to_end(dataset, output_path, RESUME="latest", **settings)
    resumed_from = re.search(r"resuming from .*/step_(\d+): epoch \d, step \d of (\d)", output)
    assert resumed_from and int(resumed_from.group(1)) < 2 * int(resumed_from.group(2)), output  # mid-run
    assert metrics(resumed) == metrics(uninterrupted)
    assert len(uninterrupted["epochs"]) == 2


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(dataset, tmp_path, uninterrupted):
    output_path = tmp_path / "model"
    checkpoints = output_path / "checkpoints"
    process = start_run(dataset, output_path)
    wait_for((checkpoints / "step_0000002").exists, process)
    wait_for(lambda: list(checkpoints.glob("step_0000004.partial/*")), process)
    kill_job(process)
    assert (checkpoints / "step_0000004.partial").exists() and not (checkpoints / "step_0000004").exists()
    output, resumed = run_to_end(dataset, output_path, RESUME="latest")
    assert f"resuming from {checkpoints / 'step_0000002'}: epoch 1, step 2 of 6" in output
    assert metrics(resumed) == metrics(uninterrupted)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_0000008", "step_0000010", "step_0000012"]


HOST_COPY_REUSED = """
import sys
import threading
import torch
from benchmarks.step_benchmark import boosted_model, train_step
from checkpoint import Checkpoints, TrainingState, local_optimizer
from devices import init_distributed

device = init_distributed(seed=0)
boosted, image_size = boosted_model("torch_ddp", "tiny", False, device, torch.optim.lr_scheduler.ConstantLR)
images, labels = torch.randn(4, 3, image_size, image_size), torch.tensor([0, 1, 2, 0])
first_state = lambda: local_optimizer(boosted.optimizer).state_dict()["state"][0]  # the first weight's Adam state
checkpoints = Checkpoints(boosted, sys.argv[1], keep=2, plugin="torch_ddp")
stepped, save = threading.Event(), torch.save
def save_once_training_has_stepped(*arguments, **options):  # the writer thread's torch.save
    if threading.current_thread() is not threading.main_thread():
        stepped.wait()
    save(*arguments, **options)
torch.save = save_once_training_has_stepped
assert checkpoints.preparing is None  # the optimizer has no state to copy yet
train_step(boosted, images, labels)  # its first step: the host memory is taken beside the next steps
checkpoints.preparing.join()
host_copy = [tensor.data_ptr() for tensor in checkpoints.host_copy]
for step in (1, 2):
    stepped.clear()
    checkpoints.save(TrainingState(global_step=step))
    at_checkpoint = {name: tensor.clone() for name, tensor in first_state().items()}
    train_step(boosted, images, labels)  # changes the state before it is written
    stepped.set()
    checkpoints.finish()
    saved = torch.load(f"{sys.argv[1]}/checkpoints/step_{step:07d}/state_rank0.pt", weights_only=True)
    saved = saved["optimizer"]["state"][0]
    assert saved.keys() == at_checkpoint.keys() and "exp_avg" in saved
    assert all(torch.equal(saved[name], at_checkpoint[name]) for name in saved)
    assert not torch.equal(first_state()["exp_avg"], saved["exp_avg"])
    assert [tensor.data_ptr() for tensor in checkpoints.host_copy] == host_copy
print("host copy reused:", len(host_copy), "tensors")
"""


def test_each_checkpoint_holds_its_own_steps_state_written_from_the_host_copy_taken_once(tmp_path):
    """The host memory a checkpoint's state is copied into is taken after the optimizer's first step and reused by
    every checkpoint, each of which still writes the state of its own step while training changes it."""
    run = subprocess.run([sys.executable, "-c", HOST_COPY_REUSED, str(tmp_path)], cwd=ROOT, env=example_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert re.search(r"host copy reused: \d+ tensors", run.stdout), run.stdout


def test_a_run_started_afresh_replaces_the_later_checkpoints_of_the_run_before(dataset, tmp_path):
    """A new run in the output path of a longer one (twice the batch: half the steps) keeps its own checkpoints,
    not the run before's later steps, which RESUME=latest would otherwise go back to."""
    output_path = tmp_path / "model"
    checkpoints = output_path / "checkpoints"
    run_to_end(dataset, output_path, EPOCH=1)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]
    run_to_end(dataset, output_path, EPOCH=1, BS=6)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_0000002", "step_0000003"]


def test_one_rank_dying_ends_the_whole_job_quickly_and_non_zero(dataset, tmp_path):
    process = start_run(dataset, tmp_path / "model")
    wait_for((tmp_path / "model" / "checkpoints" / "step_0000002").exists, process)
    def of_rank_1(process):
        return "vit_train_demo.py" in " ".join(process.cmdline()) and process.environ().get("RANK") == "1"

    workers = [child for child in psutil.Process(process.pid).children(recursive=True)  # not its loader workers
               if of_rank_1(child) and not of_rank_1(child.parent())]
    assert len(workers) == 1
    killed_at = time.monotonic()
    workers[0].kill()
    returncode, output = finish(process, timeout=120)
    assert returncode != 0 and time.monotonic() - killed_at < 60
    assert "Signal 9 (SIGKILL) received" in output or "exitcode  : -9" in output


def test_non_finite_loss_stops_the_run_with_its_step(dataset, tmp_path):
    # after one step at this rate the weights are ~1e30 and the next forward pass overflows
    returncode, output = finish(start_run(dataset, tmp_path / "model", LR=1e30, WARMUP_RATIO=0))
    assert returncode != 0
    assert "error: training loss is nan at step 2 (epoch 1); lower --learning_rate or check the data" in output


def test_resume_from_a_folder_that_is_no_checkpoint_is_named(dataset, tmp_path):
    returncode, output = finish(start_run(dataset, tmp_path / "model", RESUME=tmp_path))
    assert returncode != 0
    assert f"error: --resume_from {tmp_path} is not a complete checkpoint" in output


def mount_namespace_command():
    """unshare with a mount namespace of this test's own: as root, else inside a user namespace where it is root."""
    for command in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    pytest.skip("needs mount namespaces: root, or a kernel that lets users have user namespaces")


def test_full_disk_is_reported_with_the_path(dataset, tmp_path):
    # a 20 MB file system of our own (a private mount namespace): the first checkpoint, ~66 MB, does not fit
    unshare = mount_namespace_command()
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    output_path = mount_point / "model"
    command = (f"mount -t tmpfs -o size=20m tmpfs {mount_point} && exec {sys.executable} vit_train_demo.py "
               f"--plugin torch_ddp --dataset {dataset} --model_name_or_path {MODEL_DIR} --output_path {output_path} "
               "--num_epoch 1 --batch_size 6")
    run = subprocess.run([*unshare, "sh", "-c", command], cwd=ROOT, capture_output=True, text=True,
                         env=example_env(), timeout=300)
    assert run.returncode == 1
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: cannot write {output_path}/checkpoints/step_0000006.partial: ")
    assert "No space left on device" in last_line and "Traceback" not in run.stderr


@pytest.fixture(scope="module")
def streamed(dataset, tmp_path_factory):
    """The uninterrupted run again, its images streamed because they do not fit a tiny cache budget."""
    output, results = run_to_end(dataset, tmp_path_factory.mktemp("streamed") / "model", CACHE_BUDGET_GIB=0.001,
                                 NUM_WORKERS=1)
    assert "data: streaming 108 images through 1 loader worker (0.02 GiB as uint8, over the 0.00 GiB budget " \
           "(--cache_budget_gib))" in output
    return results


def test_streamed_run_over_two_processes_measures_what_the_cached_run_does(streamed, uninterrupted):
    assert streamed["data"]["mode"] == "stream" and uninterrupted["data"]["mode"] == "cache"
    assert streamed["config"]["world_size"] == 2
    for cached_epoch, streamed_epoch in zip(uninterrupted["epochs"], streamed["epochs"]):
        for split in ("validation", "test"):
            cached_split, streamed_split = cached_epoch[split], streamed_epoch[split]
            assert streamed_split["num_examples"] == cached_split["num_examples"] == 36
            assert streamed_split["confusion_matrix"] == cached_split["confusion_matrix"]
            assert streamed_split["loss"] == pytest.approx(cached_split["loss"], rel=1e-6)
        assert streamed_epoch["train_loss"] == pytest.approx(cached_epoch["train_loss"], rel=1e-6)


def test_streamed_run_killed_mid_epoch_then_resumed_ends_like_an_uninterrupted_streamed_run(dataset, tmp_path,
                                                                                            streamed):
    output_path = tmp_path / "model"
    process = start_run(dataset, output_path, DATA_MODE="stream")
    step_2 = output_path / "checkpoints" / "step_0000002"
    wait_for(step_2.exists, process)
    kill_job(process)
    output, resumed = run_to_end(dataset, output_path, RESUME="latest", DATA_MODE="stream")
    assert f"resuming from {step_2}: epoch 1, step 2 of 6" in output
    assert metrics(resumed) == metrics(streamed)


def break_image_met_at_step(dataset, step, batch_size):
    """Overwrites the training image that one process meets first at `step` (1-based) of the first epoch."""
    train = load_splits(str(dataset))["train"]
    position = training_index_batches(len(train), batch_size, 0, 1, seed=42, epoch=0)[step - 1][0]
    broken = train[position]["image"]["path"]
    with open(broken, "wb") as file:
        file.write(b"<html>not a picture</html>")
    return broken


def test_unreadable_image_met_while_streaming_stops_the_run_naming_it_or_is_skipped_and_counted(tmp_path):
    dataset = copy_beans(tmp_path / "beans", per_label=12)
    broken = break_image_met_at_step(dataset, step=4, batch_size=6)
    settings = {"GPUNUM": 1, "BS": 6, "DATA_MODE": "stream", "EPOCH": 1}
    returncode, output = finish(start_run(dataset, tmp_path / "stopped", **settings))
    assert returncode == 1
    assert output.strip().splitlines()[-1] == (f"error: cannot read image {broken}: cannot identify image file "
                                               f"'{broken}'; replace or remove it, or pass --skip_unreadable to go "
                                               "on without it")
    assert "Traceback" not in output
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_0000002"]  # whole, the last before it
    assert (checkpoints / "step_0000002" / "state_rank0.pt").exists()
    output, results = run_to_end(dataset, tmp_path / "skipped", **settings, SKIP_UNREADABLE=1)
    assert results["data"]["unreadable"] == [f"{broken}: cannot identify image file '{broken}'"]
    assert re.search(r"s for data; peak memory host [0-9.]+ GiB; left out 1 unreadable image\n", output)
    assert results["epochs"][0]["validation"]["num_examples"] == 36


def test_streamed_run_holds_no_more_memory_on_a_dataset_eight_times_larger(tmp_path):
    small = copy_beans(tmp_path / "small", per_label=40)
    large = tmp_path / "large"  # every image of the small one, eight times over under other names
    for image in small.glob("*/*/*.jpg"):
        (large / image.parent.parent.name / image.parent.name).mkdir(parents=True, exist_ok=True)
        for copy in range(8):
            os.link(image, large / image.parent.parent.name / image.parent.name / f"{copy}_{image.name}")
    settings = {"GPUNUM": 1, "BS": 16, "DATA_MODE": "stream", "NUM_WORKERS": 1, "KEEP_CHECKPOINTS": 0, "SAVE_EVERY": 0}
    peaks = {}
    # as many steps and evaluated images on each (8 epochs of the small one, 1 of the large): a process's heap
    # drifts by a few hundredths of a GiB over a run, more the longer it runs
    for name, dataset, epochs in (("small", small, 8), ("large", large, 1)):
        _, results = run_to_end(dataset, tmp_path / f"model_{name}", EPOCH=epochs, **settings)
        assert results["data"]["mode"] == "stream" and results["data"]["num_examples"]["train"] == \
            {"small": 120, "large": 960}[name]
        peaks[name] = results["memory"]["peak_host_gib"]
    # caching the 2520 extra images would take 2520 x 3 x 224 x 224 bytes, 0.35 GiB; streaming takes a third of
    # that at most
    cache_growth = 2520 * 3 * 224 * 224 / 2**30
    assert peaks["large"] - peaks["small"] < cache_growth / 3, peaks


class RunsCode:
    """Unpickling this runs a shell command: what a tampered checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_state_file_that_would_run_code_is_refused(dataset, tmp_path):
    import torch

    tampered = tmp_path / "checkpoints" / "step_0000002"
    tampered.mkdir(parents=True)
    marker = tmp_path / "code_ran"
    torch.save({"progress": RunsCode(marker), "rng": None, "world_size": 1}, tampered / "state_rank0.pt")
    returncode, output = finish(start_run(dataset, tmp_path / "model", GPUNUM=1, RESUME=tampered))
    assert returncode == 1 and not marker.exists()
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {tampered / 'state_rank0.pt'} holds more than tensors and plain values, "
                                "and loading it could run code (posix.system)")
    assert last_line.endswith("resume only from checkpoints this example wrote") and "Traceback" not in output


def test_checkpoint_of_another_number_of_processes_is_named(dataset, tmp_path, uninterrupted):
    from checkpoint import complete_checkpoints

    written = complete_checkpoints(uninterrupted["config"]["output_path"])[-1]
    returncode, output = finish(start_run(dataset, tmp_path / "model", GPUNUM=1, RESUME=written))
    assert returncode == 1 and "Traceback" not in output
    assert output.strip().splitlines()[-1] == (f"error: {written} was written by 2 processes, this run has 1; resume "
                                               "with the GPUNUM it was written with")


def test_checkpoint_of_another_version_is_named(dataset, tmp_path, uninterrupted):
    import torch

    from checkpoint import complete_checkpoints

    older = tmp_path / "step_older"
    shutil.copytree(complete_checkpoints(uninterrupted["config"]["output_path"])[-1], older)
    for state_file in older.glob("state_rank*.pt"):  # as written before the state kept where its epoch started,
        state = torch.load(state_file, weights_only=True)  # and the optimizer's state (saved through the booster)
        del state["progress"]["epoch_start_images"], state["optimizer"]
        torch.save(state, state_file)
    returncode, output = finish(start_run(dataset, tmp_path / "model", RESUME=older))
    assert returncode == 1 and "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        f"error: {older} was written by another version of this example (its state has no epoch_start_images, "
        "optimizer); resume it with that version, or start afresh in another output path")
