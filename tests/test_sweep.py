"""experiments/run_sweep.sh on the CPU: one run per batch size and learning rate, and the table made of their
results."""
import json
import subprocess


from conftest import MODEL_DIR, ROOT, copy_beans, example_env


def test_sweep_runs_every_pair_and_tabulates_each_final_epoch(tmp_path):
    dataset = copy_beans(tmp_path / "beans", per_label=6)
    env = example_env(BS_LIST="4 6", LR_LIST="1e-4", EPOCH=1, PLUGIN="torch_ddp", LAUNCHER="python", DATASET=dataset,
                      MODEL=MODEL_DIR, OUTPUT_PATH=tmp_path / "sweep")
    run = subprocess.run(["bash", "experiments/run_sweep.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 4
    for line, batch_size in zip(table[2:], (4, 6)):
        results = json.loads((tmp_path / "sweep" / f"bs{batch_size}_lr1e-4" / "results.json").read_text())
        final = results["epochs"][-1]
        assert results["config"]["batch_size"] == batch_size and results["config"]["augment"] is False
        assert line == (f"| {batch_size} | 0.0001 | {final['train_loss']:.4f} | {final['validation']['loss']:.4f} | "
                        f"{final['validation']['accuracy']:.4f} | {final['test']['loss']:.4f} | "
                        f"{final['test']['accuracy']:.4f} |")
