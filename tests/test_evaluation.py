"""Evaluation over several data-parallel ranks counts every image exactly once and matches one process."""
import json
import os
from datetime import timedelta
from unittest import mock

import pytest
import torch
import torch.multiprocessing as mp
from colossalai.testing import free_port

from conftest import BEANS_DIR, MODEL_DIR
from plugins import PluginSettings

TORCH_DDP = PluginSettings("torch_ddp", "fp32")


def evaluate_on_ranks(rank, world_size, port, batch_size, result_file):
    import torch.distributed as dist
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin

    from data import label_names, load_splits
    from evaluation import evaluate
    from images import Decoder
    from plugins import Boosted, Topology
    from test_data import decoded
    from models import load_model

    # a bounded timeout: a rank that never arrives fails the test in two minutes instead of hanging CI
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(minutes=2))
    torch.manual_seed(0)  # the same new classification head in every run
    splits = load_splits(str(BEANS_DIR))
    names = label_names(splits, str(BEANS_DIR))
    image_processor, model = load_model(str(MODEL_DIR), names, TORCH_DDP)
    device = torch.device("cpu")
    validation = decoded({"validation": splits["validation"]}, Decoder(image_processor), device, cached=True,
                         num_workers=0, skip_unreadable=False)["validation"]
    plugin = TorchDDPPlugin()
    booster = Booster(plugin=plugin)
    model, *_ = booster.boost(model)
    metrics = evaluate(Boosted(model, None, None, booster, Topology(plugin)), validation, device, batch_size, names)
    if rank == 0:
        result_file.write_text(json.dumps(metrics))
    # every rank is past its last collective: leave without running the gloo group's destructor, which can hang
    # joining its threads on a 2-core machine (seen in CI with 3 ranks, whether the group was destroyed or not)
    dist.barrier()
    os._exit(0)


def run_evaluation(world_size, batch_size, tmp_path):
    result_file = tmp_path / f"metrics_{world_size}_{batch_size}.json"
    with mock.patch.dict(os.environ, CUDA_VISIBLE_DEVICES=""):  # the CPU's ranks, on a machine with a GPU too
        mp.spawn(evaluate_on_ranks, args=(world_size, free_port(), batch_size, result_file), nprocs=world_size)
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run_evaluation(1, 32, tmp_path_factory.mktemp("one"))


@torch.no_grad()
def test_one_process_measures_what_the_model_does_on_every_validation_image(one_process):
    """The metrics of the booster's evaluation are those of the same model (the new head from seed 0) run plainly on
    what the image processor makes of each file."""
    import torch.nn.functional as F
    from transformers.image_utils import load_image

    from data import label_names, labels_of, load_splits
    from models import load_model

    splits = load_splits(str(BEANS_DIR))
    torch.manual_seed(0)
    image_processor, model = load_model(str(MODEL_DIR), label_names(splits, str(BEANS_DIR)), TORCH_DDP)
    validation = splits["validation"]
    inputs = image_processor([load_image(cell["path"]) for cell in validation["image"]], return_tensors="pt")
    logits, labels = model.eval()(**inputs).logits, torch.tensor(labels_of(validation))
    confusion = torch.bincount(labels * 3 + logits.argmax(dim=-1), minlength=9).view(3, 3)
    assert one_process["num_examples"] == 133
    assert one_process["confusion_matrix"] == confusion.tolist()
    assert one_process["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert 0 < one_process["accuracy"] < 1  # a random new head: far from perfect, so a wrong count would show


# 133 images: 2 ranks get 67 and 66 (the second pads one uncounted copy), 3 ranks get 45, 44 and 44, and with batch
# 33 the shards end in batches of different sizes.
@pytest.mark.parametrize("world_size, batch_size", [(2, 32), (3, 33)])
def test_ranks_count_each_image_once_and_agree_with_one_process(tmp_path, one_process, world_size, batch_size):
    metrics = run_evaluation(world_size, batch_size, tmp_path)
    assert metrics["num_examples"] == 133
    assert metrics["confusion_matrix"] == one_process["confusion_matrix"]
    assert metrics["accuracy"] == pytest.approx(one_process["accuracy"], abs=1e-12)
    assert metrics["loss"] == pytest.approx(one_process["loss"], rel=1e-5)
