"""run_finetuning.sh's launchers on the CPU: colossalai run (the default for several processes) across two nodes,
torchrun, plain python (the default for one), paths with spaces through each, and what a user reads of a run that
works and of one that fails."""
import os
import re
import subprocess
import sys

import pytest

import loopback_ssh
from conftest import MODEL_DIR, ROOT, copy_beans, example_env
from test_end_to_end import run_finetuning

SETTINGS = {"PLUGIN": "torch_ddp", "BS": 6, "EPOCH": 2, "AUGMENT": 0, "LABEL_SMOOTHING": 0, "KEEP_CHECKPOINTS": 0}


@pytest.fixture(scope="module")
def spaced(tmp_path_factory):
    """A folder whose name has spaces, holding a small beans copy and a link to the model."""
    root = tmp_path_factory.mktemp("launch") / "my runs"
    copy_beans(root / "leaf images", per_label=12)
    os.symlink(MODEL_DIR, root / "small vit")
    return {"root": root, "DATASET": root / "leaf images", "MODEL": root / "small vit"}


def run_in(spaced, name, **variables):
    output_path = spaced["root"] / name
    return run_finetuning(output_path, **SETTINGS, DATASET=spaced["DATASET"], MODEL=spaced["MODEL"], **variables)


def check_output(run, processes):
    """stdout: the header, the data line, a line per epoch, the test line and the summary; stderr: progress bars."""
    lines = run.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines] == ["fine-tuning", "data:", "epoch", "epoch", "test:", "saved"], lines
    assert f", {processes} process{'es' * (processes > 1)} on cpu;" in lines[0]
    shown = [text for text in re.split(r"[\r\n]", run.stderr) if text.strip()]  # nothing but the example's own
    assert shown and all(text.startswith("epoch ") for text in shown), shown


def test_two_nodes_train_the_same_model_as_one_node_with_two_processes(spaced, tmp_path):
    # two nodes on this machine: this one, and "127.0.0.2", an SSH server of the test's own (on 127.0.0.1), which
    # colossalai run reaches over SSH as it would another machine; the torchrun on each rendezvous as two machines'
    # would. That node sees no GPU either: colossalai run passes on no empty variable, so not CUDA_VISIBLE_DEVICES=""
    # (on a GPU machine its worker would take the GPU and NCCL while the first took the CPU and gloo, and both wait)
    sent_over_ssh = loopback_ssh.start("127.0.0.2", tmp_path / "home", env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1\n127.0.0.2\n")
    one_node_run, one_node = run_in(spaced, "one node", GPUNUM=2)
    two_nodes_run, two_nodes = run_in(spaced, "two nodes", GPUNUM=1, HOSTFILE=hostfile, HOME=tmp_path / "home")
    assert any("torchrun" in command and "--node_rank=1" in command for command in sent_over_ssh), sent_over_ssh
    assert one_node["config"]["world_size"] == two_nodes["config"]["world_size"] == 2
    for one, two in zip(one_node["epochs"], two_nodes["epochs"], strict=True):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
        assert two["validation"]["loss"] == pytest.approx(one["validation"]["loss"], rel=1e-5)
        assert two["validation"]["confusion_matrix"] == one["validation"]["confusion_matrix"]
    check_output(one_node_run, processes=2)
    check_output(two_nodes_run, processes=2)


@pytest.mark.parametrize("launcher, processes", [("torchrun", 2), ("colossalai", 1), ("auto", 1)])
def test_each_launcher_runs_with_spaces_in_every_path(spaced, launcher, processes):
    run, results = run_in(spaced, f"{launcher} run", LAUNCHER=launcher, GPUNUM=processes)
    assert results["config"]["world_size"] == processes
    assert results["config"]["dataset"] == str(spaced["DATASET"])
    check_output(run, processes)


@pytest.mark.parametrize("launcher", ["colossalai", "torchrun"])
def test_a_bad_input_on_two_processes_is_said_once_and_last(tmp_path, launcher):
    run = subprocess.run(["bash", "run_finetuning.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=example_env(**SETTINGS, LAUNCHER=launcher, GPUNUM=2, MODEL=MODEL_DIR,
                                         DATASET="/no/such/beans", OUTPUT_PATH=tmp_path / "model"))
    assert run.returncode == 1
    shown = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(shown) == 1, shown  # nothing but the error, once: no launcher traceback, no library chatter
    assert shown[0].startswith("error: dataset directory /no/such/beans does not exist; pass a hub id")
    assert "Traceback" not in run.stderr and run.stdout.strip() == ""


@pytest.mark.parametrize("variables, message", [
    ({"LAUNCHER": "mpirun"}, "error: LAUNCHER=mpirun is not a launcher; choose auto, colossalai, torchrun or python"),
    ({"LAUNCHER": "python", "GPUNUM": "2"}, "error: LAUNCHER=python starts one process, not GPUNUM=2"),
    ({"LAUNCHER": "torchrun", "HOSTFILE": "hosts"}, "error: HOSTFILE needs LAUNCHER=colossalai"),
])
def test_a_launcher_setting_that_cannot_work_is_refused_in_one_line(variables, message):
    run = subprocess.run(["bash", "run_finetuning.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=example_env(PLUGIN="torch_ddp", **variables))
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(message)


@pytest.mark.parametrize("variables, message", [
    ({"LAUNCHER": "python"}, "error: colossalai is not installed: run 'pip install -r requirements.txt' first"),
    ({"LAUNCHER": "torchrun", "GPUNUM": "2"}, "error: torchrun is not installed: run 'pip install -r requirements.txt'"),
])
def test_a_machine_without_the_packages_is_told_to_install_them_in_one_line(tmp_path, variables, message):
    # on PATH: the system's tools less its Pythons and the packages' commands (wherever they are installed), and
    # this Python without its site-packages (no torch, no colossalai)
    for folder in ("/bin", "/usr/bin"):
        for tool in os.listdir(folder):
            if not (tool.startswith("python") or tool in ("torchrun", "colossalai") or (tmp_path / tool).exists()):
                os.symlink(os.path.join(folder, tool), tmp_path / tool)
    (tmp_path / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    (tmp_path / "python3").chmod(0o755)
    run = subprocess.run(["bash", "run_finetuning.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env=example_env(PATH=tmp_path, PLUGIN="torch_ddp", **variables))
    assert run.returncode == 1
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith(message), run.stderr
    assert run.stdout == ""


def test_importing_any_module_of_the_example_changes_nothing():
    """Importing the example's modules defines things and nothing else: no exit, no environment or warning-filter
    change, no library patched, Colossal-AI not loaded (startup.import_libraries loads it, from main)."""
    modules = sorted(path.stem for path in ROOT.glob("*.py")) + ["benchmarks.step_benchmark", "tools.tidy_launch"]
    check = ("import os, sys, warnings; import torch, datasets, transformers.pipelines; "  # they add warning filters
             "import transformers.utils.import_utils as utils; "
             "environment, filters, sklearn = dict(os.environ), list(warnings.filters), utils._sklearn_available; "
             f"[__import__(module) for module in {modules!r}]; "
             "assert dict(os.environ) == environment, 'environment changed'; "
             "assert warnings.filters == filters, 'warning filters changed'; "
             "assert 'colossalai.booster' not in sys.modules, 'Colossal-AI loaded'; "
             "assert utils._sklearn_available == sklearn, 'transformers patched'; "
             "print('imported', len(sys.argv))")
    run = subprocess.run([sys.executable, "-c", check, "--verbose"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout == "imported 2\n", run.stderr[-2000:]
    assert {"vit_train_demo", "data", "args", "startup", "plugins", "images"} <= set(modules)


def test_starting_leaves_pytorch_s_compiler_unloaded_and_enabled():
    """Colossal-AI's import of bitsandbytes does not pull in PyTorch's inductor (seconds of every start), and
    torch.compile still compiles what the user asks it to afterwards."""
    check = ("import os, sys, torch, startup; startup.import_libraries(); "
             "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor imported'; "
             "assert 'bitsandbytes' in sys.modules, 'bitsandbytes not imported: nothing was tested'; "
             "compiled = torch.compile(lambda x: x + 1); "
             "assert hasattr(compiled, '_torchdynamo_orig_callable'), 'torch.compile disabled'; "
             "print(os.environ.get('TORCHDYNAMO_DISABLE'))")
    for setting in (None, "0"):  # the user's own setting, or none, is what is left
        env = {key: value for key, value in os.environ.items() if key != "TORCHDYNAMO_DISABLE"}
        env.update({"TORCHDYNAMO_DISABLE": setting} if setting else {})
        run = subprocess.run(["python3", "-c", check], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == str(setting)


def test_a_second_job_on_the_machine_runs_alone_or_is_told_which_port_to_change(spaced, tmp_path, default_port_taken):
    """Another job holds the default rendezvous port: one process needs none and trains; several stop in one line."""
    for processes in (1, 2):
        env = example_env(**{**SETTINGS, "EPOCH": 1}, GPUNUM=processes, DATASET=spaced["DATASET"], MODEL=MODEL_DIR,
                          OUTPUT_PATH=tmp_path / f"model_{processes}")
        del env["MASTER_PORT"]
        run = subprocess.run(["bash", "run_finetuning.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        if processes == 1:
            assert run.returncode == 0, run.stderr[-3000:]
            assert (tmp_path / "model_1" / "results.json").exists()
        else:
            assert run.returncode == 1 and run.stdout == ""
            assert run.stderr == (f"error: port {default_port_taken} on 127.0.0.1 is taken, by another job perhaps; "
                                  "set MASTER_PORT to a free one\n")


def test_the_launchers_note_about_a_missing_cuda_runtime_is_not_passed_on():
    """colossalai run, where no GPU is visible, says it found no CUDA runtime (newer PyTorch with its log prefix)."""
    noise = ("No CUDA runtime is found, using CUDA_HOME='/usr/local/cuda'\n"
             "W1202 22:44:09.664000 1311 torch/utils/cpp_extension.py:140] No CUDA runtime is found, using CUDA_HOME="
             "'/usr/local/cuda'\n")
    run = subprocess.run([sys.executable, "tools/tidy_launch.py", "sh", "-c", f'printf "{noise}" >&2; echo trained'],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == "trained\n" and run.stderr == ""
