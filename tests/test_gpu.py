"""Every plugin on one GPU with the published settings: real beans, pretrained DeiT-tiny, all 133 validation images.

Skipped without a CUDA GPU. GPU_RESULTS_DIR, if set, receives each run's results.json as <plugin>.json.
"""
import os
import shutil

import pytest
import torch

from conftest import BEANS_DIR
from test_end_to_end import check_pipeline_classifies_test_split, check_schema, run_finetuning

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("plugin", ["torch_ddp", "torch_ddp_fp16", "low_level_zero", "gemini", "hybrid_parallel"])
def test_plugin_reaches_published_accuracy_on_one_gpu(tmp_path, plugin):
    output_path = tmp_path / "model"
    run, results = run_finetuning(output_path, PLUGIN=plugin, GPUNUM=1, DATASET=BEANS_DIR, BS=32, LR=1e-4,
                                  EPOCH=5, WEIGHT_DECAY=0.5, WARMUP_RATIO=0.3)
    if os.environ.get("GPU_RESULTS_DIR"):
        shutil.copy(output_path / "results.json", os.path.join(os.environ["GPU_RESULTS_DIR"], f"{plugin}.json"))
    check_schema(results, num_epoch=5)
    assert results["config"]["plugin"] == plugin and results["config"]["device"].startswith("cuda")
    validation = results["epochs"][-1]["validation"]
    assert validation["num_examples"] == 133 and validation["accuracy"] >= 0.96
    assert results["test"]["num_examples"] == 128
    check_pipeline_classifies_test_split(output_path, results, device=0)
