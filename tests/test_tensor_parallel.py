"""Tensor parallelism splits a classifier's outputs evenly across its ranks, so the example pads beans' 3 labels to 4
outputs for 2 ranks (models.pad_classifier): the padded model must compute what the unpadded one does, and the model
it saves must load as a 3-label classifier. Checked here on the CPU with real images and Colossal-AI's own save
(tensor parallelism itself needs GPUs: tests/test_gpu.py runs it on two)."""
import copy
import os
from datetime import timedelta
from unittest import mock

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from colossalai.testing import free_port

from conftest import BEANS_DIR, LABELS, MODEL_DIR
from plugins import PluginSettings


def save_through_booster(rank, model, output_path, port):
    """Saves `model` as the example does (the booster's sharded safetensors), then cuts its padding off."""
    import torch.distributed as dist
    from colossalai.booster import Booster
    from colossalai.booster.plugin import TorchDDPPlugin

    from models import save_unpadded_classifier

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1,
                            timeout=timedelta(minutes=2))
    booster = Booster(plugin=TorchDDPPlugin())
    boosted, *_ = booster.boost(model)
    booster.save_model(boosted, str(output_path), shard=True, use_safetensors=True)
    save_unpadded_classifier(str(output_path), len(LABELS))
    dist.barrier()
    os._exit(0)  # without the gloo group's destructor, which can hang on a 2-core machine (tests/test_evaluation.py)


def test_a_padded_classifier_trains_as_the_unpadded_one_and_saves_without_its_padding(tmp_path):
    from transformers import AutoModelForImageClassification
    from transformers.image_utils import load_image

    from data import labels_of, load_splits
    from models import load_model, pad_classifier

    torch.manual_seed(0)
    image_processor, model = load_model(str(MODEL_DIR), LABELS, PluginSettings("torch_ddp", "fp32"))
    padded = copy.deepcopy(model)
    pad_classifier(padded, 2)
    assert (model.classifier.out_features, padded.classifier.out_features) == (3, 4)

    validation = load_splits(str(BEANS_DIR))["validation"].select(range(0, 133, 11))
    inputs = image_processor([load_image(cell["path"]) for cell in validation["image"]], return_tensors="pt")
    labels = torch.tensor(labels_of(validation))
    logits, padded_logits = model(**inputs).logits, padded(**inputs).logits
    assert padded_logits.shape == logits.shape == (len(labels), 3)
    torch.testing.assert_close(padded_logits, logits)
    # label smoothing spreads its share over the 3 labels only, as without padding
    for network, network_logits in ((model, logits), (padded, padded_logits)):
        F.cross_entropy(network_logits, labels, label_smoothing=0.1).backward()
    torch.testing.assert_close(padded.classifier.weight.grad[:3], model.classifier.weight.grad)
    torch.testing.assert_close(padded.classifier.bias.grad[:3], model.classifier.bias.grad)
    assert not padded.classifier.weight.grad[3:].any() and not padded.classifier.bias.grad[3:].any()

    saved = tmp_path / "model"
    with mock.patch.dict(os.environ, CUDA_VISIBLE_DEVICES=""):
        mp.spawn(save_through_booster, args=(padded, saved, free_port()), nprocs=1)
    loaded = AutoModelForImageClassification.from_pretrained(saved)  # a size mismatch would raise
    assert loaded.classifier.out_features == 3 and list(loaded.config.id2label.values()) == LABELS
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**inputs).logits, logits)
