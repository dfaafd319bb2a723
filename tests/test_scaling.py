"""The GPU count alone changes nothing but speed, nor does accumulating gradients over several batches: 1, 2 and 4
torch_ddp processes on the CPU at the same global batch, whole or accumulated, see the same batches in the same order
(the one shuffled order dealt out rank by rank), each image cropped and flipped the same way (its augmentation is
drawn from the seed and the epoch, not from a rank's random stream), so they train the same model up to the order of
floating-point sums."""
import pytest

from conftest import copy_beans
from test_end_to_end import run_finetuning

GLOBAL_BATCH = 12


@pytest.fixture(scope="module")
def small_beans(tmp_path_factory):
    return copy_beans(tmp_path_factory.mktemp("beans"), per_label=24, splits=("train", "validation"))


@pytest.fixture(scope="module")
def single_process(small_beans, tmp_path_factory):
    return run_with(1, small_beans, tmp_path_factory.mktemp("processes_1"))


def run_with(processes, dataset, output_root, accumulation=1):
    _, results = run_finetuning(output_root / "model", PLUGIN="torch_ddp", GPUNUM=processes, DATASET=dataset,
                                BS=GLOBAL_BATCH // processes // accumulation, GRAD_ACCUM=accumulation, EPOCH=2,
                                LR=3e-4, WARMUP_RATIO=0.1, AUGMENT=1, LABEL_SMOOTHING=0, KEEP_CHECKPOINTS=0)
    return results


@pytest.mark.parametrize("processes, accumulation", [(2, 1), (4, 1), (1, 4), (2, 2)])
def test_more_processes_at_the_same_global_batch_train_the_same_model(single_process, small_beans, tmp_path,
                                                                      processes, accumulation):
    results = run_with(processes, small_beans, tmp_path, accumulation)
    assert results["config"]["data_parallel_size"] == processes
    assert results["config"]["gradient_accumulation_steps"] == accumulation
    for one, many in zip(single_process["epochs"], results["epochs"]):
        assert many["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
        assert many["validation"]["loss"] == pytest.approx(one["validation"]["loss"], rel=1e-3)
        assert abs(many["validation"]["accuracy"] - one["validation"]["accuracy"]) <= 1 / 72
    assert single_process["epochs"][-1]["validation"]["accuracy"] > 0.5  # it learned: chance is 1/3
